"""Reading images and masks from disk, with errors that name the file; writing a PNG atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from stedm.fileio import write_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_image(path: str | Path, intensity_range: Sequence[float] | None = None) -> np.ndarray:
    """RGB uint8 ``H x W x 3``; grey and RGBA inputs are converted.

    Pixels of more than 8 bits (16-bit PNG or TIFF, 32-bit integer, float) are scaled linearly
    to 0..255: from ``intensity_range = (lo, hi)`` when given (``lo`` -> 0, ``hi`` -> 255, clipped;
    applied to 8-bit files too), else by the bit depth (16-bit: 0..65535). Float pixels need
    ``intensity_range``.
    """
    try:
        array = _read_pixels(Path(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as err:  # PIL raises several types for broken files
        raise ValueError(f"cannot read image {path}: {err}") from err
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image {path} has pixel array shape {array.shape}; expected H x W grey, RGB or RGBA")
    return to_uint8(array[..., :3], intensity_range, str(path))


def _read_pixels(path: Path) -> np.ndarray:
    """The file's pixels in their own type (8-bit files in any PIL mode come as RGB)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                if page.dtype is not None and page.dtype != np.uint8:  # PIL would cut these to 8 bits
                    array = page.asarray()
                    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
                        array = np.moveaxis(array, 0, -1)  # planar
                    return array
        except tifffile.TiffFileError:
            pass  # not a TIFF after all: let PIL say what it is
    with Image.open(path) as im:
        if im.mode in ("I", "F") or im.mode.startswith("I;16"):
            return np.array(im)
        return np.array(im.convert("RGB"))  # a writable copy


def to_uint8(array: np.ndarray, intensity_range: Sequence[float] | None, where: str) -> np.ndarray:
    """Scale pixels to uint8 by ``intensity_range`` or the bit depth (see :func:`read_image`)."""
    if intensity_range is None:
        if array.dtype == np.uint8:
            return np.ascontiguousarray(array)
        if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 65535:
            intensity_range = (0, 65535)
        else:
            raise ValueError(
                f"image {where} has {array.dtype} pixels in {array.min():g}..{array.max():g}, beyond 16 bits; "
                "give the range that maps to 0..255 as intensity_range=[lo, hi] "
                "(folder data: data.intensity_range=[lo,hi])")
    lo, hi = (float(v) for v in intensity_range)
    scaled = (array.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


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
    """Write a PNG atomically (:func:`stedm.fileio.write_atomic`)."""
    write_atomic(path, lambda fh: Image.fromarray(array).save(fh, format="PNG"))
