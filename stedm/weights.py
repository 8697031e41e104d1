"""``python -m stedm.weights``: commands for weights files.

``convert IN OUT --trust-pickle``
    Unpickle ``IN`` fully (only with ``--trust-pickle``: unpickling runs any code stored in the
    file) and write ``OUT``, which STEDM reads without running code: ``OUT.safetensors`` holds the
    state dict (e.g. for ``diffusion.denoiser.weights_path``); ``OUT.ckpt`` a copy of a whole
    checkpoint with plain values and tensors only (e.g. for ``predict_diff.py +ckpt_name``).
    Prints the output's sha256.
"""

from __future__ import annotations

import argparse
import sys

from stedm.models.weights import convert_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stedm.weights", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    convert = verbs.add_parser("convert", help="rewrite a pickled weights file as one that loads without running code")
    convert.add_argument("source", help="the .pt/.pth/.bin/.ckpt file to read")
    convert.add_argument("target", help="OUT.safetensors (state dict only) or OUT.ckpt (whole checkpoint, plain values)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="you trust the file's origin: unpickle it fully (this can run code stored in it)")
    args = parser.parse_args(argv)
    try:
        path, digest, dropped = convert_weights(args.source, args.target, args.trust_pickle)
    except (PermissionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for entry in dropped:
        print(f"dropped (not a tensor or plain value): {entry}", file=sys.stderr)
    print(f"wrote {path}\nsha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
