#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.py on the GPU machine (Python 3.12, manylinux x86-64, no network):
# exactly the packages in benchmarks/gpu_wheels.txt, no dependencies pulled in.
#   benchmarks/gpu_wheels.sh --list      # print the list (name==version), download nothing
#   benchmarks/gpu_wheels.sh [DIR]       # download into DIR (default .whl; add /.whl/ to .git/info/exclude)
# On the machine: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#                 && PYTHONPATH=/tmp/site python -m benchmarks.gpu_check   (from the repository root)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
list() { grep -v '^\s*#' "$here/gpu_wheels.txt" | grep -v '^\s*$'; }
if [[ "${1:-}" == "--list" ]]; then list | awk '{print $1}'; exit 0; fi
dir="${1:-.whl}"
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  platforms+=(--platform "$p")
done
list | while read -r spec kind; do
  if [[ "$kind" == "sdist" ]]; then
    python3 -m pip wheel -q --no-deps --no-binary=:all: -w "$dir" "$spec"
  else
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dir" "$spec"
  fi
done
du -sh "$dir"
