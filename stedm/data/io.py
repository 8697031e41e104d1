"""Reading images and masks from disk, with errors that name the file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 ``H x W x 3``; grey and RGBA inputs are converted."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as err:  # PIL raises several types for broken files
        raise ValueError(f"cannot read image {path}: {err}") from err


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding pixels."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def read_mask(path: str | Path, palette: Mapping[int, Sequence[int]] | None = None) -> np.ndarray:
    """Class-id mask ``H x W`` (int64).

    Without ``palette`` the file holds class ids directly (single channel; an RGB file whose
    three channels are equal is accepted). With ``palette`` (class id -> RGB colour) every pixel
    colour must be one of the palette's colours.
    """
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB") if palette is not None else im)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file not found: {path}") from None
    except Exception as err:
        raise ValueError(f"cannot read mask {path}: {err}") from err
    if palette is None:
        if array.ndim == 3:
            if not (np.all(array[..., 0] == array[..., 1]) and np.all(array[..., 0] == array[..., 2])):
                raise ValueError(f"mask {path} is a colour image: give the colours of each class as "
                                 "a palette (data.dataset.<entry>.palette) or store class ids")
            array = array[..., 0]
        return array.astype(np.int64)
    mask = np.full(array.shape[:2], -1, dtype=np.int64)
    for class_id, colour in palette.items():
        mask[np.all(array == np.asarray(colour, dtype=array.dtype), axis=-1)] = int(class_id)
    if (mask < 0).any():
        unknown = np.unique(array[mask < 0].reshape(-1, 3), axis=0)[:5].tolist()
        raise ValueError(f"mask {path} has colours {unknown} that are not in the palette")
    return mask


def find_with_stem(folder: Path, stem: str) -> Path | None:
    """The image file in ``folder`` whose name without suffix is ``stem``, if any."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def list_images(folder: Path) -> list[Path]:
    """Image files in ``folder``, sorted by name (stable across file systems)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def require_dir(path: str | Path, what: str, key: str) -> Path:
    """Return ``path`` as a Path or raise naming the config key to change."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path} (set {key}, or put the data there)")
    return path


def write_png_atomic(array: np.ndarray, path: str | Path) -> None:
    """Write a PNG via a temporary file + rename, so a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
