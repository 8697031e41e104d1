"""``python -m stedm.weights``: commands for weights files.

``list``
    The weights ``fetch`` knows, where each URL is published, its licence, the sha256 where the
    source publishes one, and whether the weights cache (``$STEDM_WEIGHTS_DIR``) holds it.

``fetch NAME [--sha256 HEX] [--file LOCAL --trust] [--force]``
    Download NAME (resuming an interrupted download with HTTP Range), verify its sha256 (the
    published one, ``--sha256``, or the one the first fetch recorded), convert it with our
    converter and write ``NAME.safetensors`` plus its model card into the cache, atomically.
    ``--file`` takes an already downloaded file instead (unpickled only with ``--trust``).
    Nothing in STEDM downloads anything but this command.

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
from stedm.models.cards import read_card


def list_weights() -> None:
    from stedm import weights_cache

    print(f"weights cache: {weights_cache.cache_dir()} (STEDM_WEIGHTS_DIR)")
    for name, known in weights_cache.KNOWN.items():
        entry = weights_cache.entry_path(name)
        card = read_card(entry) if entry.is_file() else None
        state = f"in the cache (sha256 {card['weights']['sha256'][:12]}...)" if card else "not fetched"
        published = known.sha256 or (f"prefix {known.sha256_prefix} (in the file name)" if known.sha256_prefix
                                     else "none published: recorded on first fetch, verified on every use")
        print(f"\n{name}: {known.description}\n  for      {known.use}\n  url      {known.url}\n"
              f"  from     {known.published_at}\n  licence  {known.licence}\n  sha256   {published}\n  status   {state}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stedm.weights", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    convert = verbs.add_parser("convert", help="rewrite a pickled weights file as one that loads without running code")
    convert.add_argument("source", help="the .pt/.pth/.bin/.ckpt file to read")
    convert.add_argument("target", help="OUT.safetensors (state dict only) or OUT.ckpt (whole checkpoint, plain values)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="you trust the file's origin: unpickle it fully (this can run code stored in it)")
    verbs.add_parser("list", help="the weights fetch knows, their sources, licences and cache status")
    get = verbs.add_parser("fetch", help="download, verify and convert known weights into the weights cache")
    get.add_argument("name", help="a name from 'list'")
    get.add_argument("--sha256", help="the sha256 the download must have (refused otherwise)")
    get.add_argument("--file", help="an already downloaded file to take instead of downloading")
    get.add_argument("--trust", action="store_true", help="with --file: you trust it; it is unpickled fully")
    get.add_argument("--force", action="store_true", help="fetch again although the cache holds it")
    get.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.verb == "list":
        list_weights()
        return 0
    if args.verb == "fetch":
        from stedm.weights_cache import fetch

        try:
            fetch(args.name, sha256=args.sha256, source_file=args.file, trust=args.trust, force=args.force,
                  progress=not args.no_progress)
        except (KeyError, PermissionError, FileNotFoundError, ValueError, ConnectionError) as err:
            print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
            return 2
        return 0
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
