"""The slide table: which slides exist, their case, split and subtype, and which are labelled.

Slides come from a CSV (``slide`` column, paths relative to ``slides_dir`` or absolute; optional
``case``, ``split`` and a subtype column such as ``subtype`` or ``score``) or, without a CSV,
from every slide file in ``slides_dir`` (case = file stem). Without a ``split`` column, cases
are split with ``val_fraction`` / ``test_fraction`` (sorted, seeded), never cutting a case.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from stedm.data.base import SPLITS
from stedm.data.datasets.folder import assign_splits, split_labelled

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi")


@dataclass(frozen=True)
class SlideInfo:
    path: Path
    case: str
    split: str
    subtype: str  # "" when the table has none


def read_slide_table(slides_dir: Path, csv_path: str | Path | None, subtype_column: str | None,
                     val_fraction: float, test_fraction: float, seed: int, where: str) -> list[SlideInfo]:
    if csv_path is None:
        files = sorted(p for p in slides_dir.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"{where}: no slides ({', '.join(SLIDE_SUFFIXES)}) in {slides_dir}")
        rows = [{"slide": f.name, "case": f.stem} for f in files]
        subtype_column = None
    else:
        rows = read_csv_rows(Path(csv_path), subtype_column, where)
    slides = []
    for row in rows:
        path = Path(row["slide"])
        path = path if path.is_absolute() else slides_dir / path
        if not path.is_file():
            raise FileNotFoundError(f"{where}: slide {path} listed in {csv_path} does not exist")
        slides.append((path, row.get("case") or path.stem, row.get("split") or "",
                       str(row.get(subtype_column) or "") if subtype_column else ""))
    given = [s for s in slides if s[2]]
    if given and len(given) != len(slides):
        missing = [s[0].name for s in slides if not s[2]][:5]
        raise ValueError(f"{where}: {csv_path} gives a split for some slides but not for {missing}")
    if not given:
        by_case = assign_splits([s[1] for s in slides], val_fraction, test_fraction, seed)
        slides = [(p, c, by_case[c], t) for p, c, _, t in slides]
    return [SlideInfo(p, str(c), s, t) for p, c, s, t in slides]


def read_csv_rows(path: Path, subtype_column: str | None, where: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{where}: slide table not found: {path} (csv_path)")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    header = set(rows[0]) if rows else set()
    if "slide" not in header:
        raise ValueError(f"{path}: needs a header with a 'slide' column (and optionally case, split, subtype)")
    if subtype_column and subtype_column not in header:
        raise ValueError(f"{path}: no '{subtype_column}' column (subtype_column); add it or set subtype_column: null")
    for i, row in enumerate(rows, start=2):
        if row.get("split") and row["split"] not in SPLITS:
            raise ValueError(f"{path}:{i}: split '{row['split']}' must be one of {SPLITS}")
    return rows


def select_labelled(slides: Iterable[SlideInfo], k: int | None, seed: int, annotated: set[Path]) -> set[Path]:
    """Annotated training slides of ``k`` cases per subtype (all when ``k`` is None), sorted then seeded."""
    candidates = [s for s in slides if s.split == "train" and s.path in annotated]
    by_subtype: dict[str, list[str]] = defaultdict(list)
    for s in candidates:
        by_subtype[s.subtype].append(s.case)
    chosen: set[str] = set()
    for subtype in sorted(by_subtype):
        chosen |= split_labelled(by_subtype[subtype], k, seed)
    return {s.path for s in candidates if s.case in chosen}
