"""Stain statistics in HED optical-density space: the one home of colour deconvolution and the
HED stain perturbation (the demo's stain simulation, the HED-jitter augmentation, the QC's
style fidelity).

Ruifrok & Johnston colour deconvolution with scikit-image's H/E/DAB matrices
(``skimage.color.hed_from_rgb`` / ``rgb_from_hed``, the ones ``rgb2hed``/``hed2rgb`` use), in
optical densities with the natural logarithm (the scale scikit-image < 0.19 returned and the HED
jitter of Tellez et al. 2018 was defined on; newer ``rgb2hed`` divides by ln(1e6) and clips
negative amounts, which would not invert exactly).
"""

from __future__ import annotations

import numpy as np

STAINS = ("hematoxylin", "eosin", "dab")


def optical_density(image: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB -> H x W x 3 float optical density of hematoxylin, eosin, DAB."""
    from skimage.color import hed_from_rgb

    rgb = np.maximum(np.asarray(image)[..., :3].astype(np.float64) / 255, 1e-6)
    return -np.log(rgb) @ hed_from_rgb


def from_optical_density(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`optical_density`: H x W x 3 uint8 RGB."""
    from skimage.color import rgb_from_hed

    return (np.clip(np.exp(-(od @ rgb_from_hed)), 0, 1) * 255).round().astype(np.uint8)


def hed_draw(rng: np.random.Generator, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """One draw of Tellez et al.'s HED perturbation at strength ``sigma``: ``(alpha, beta)`` with
    ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-sigma, sigma)`` per stain channel."""
    return rng.uniform(1 - sigma, 1 + sigma, 3), rng.uniform(-sigma, sigma, 3)


def hed_perturb(image: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Tellez et al.'s HED perturbation: each stain channel ``s`` becomes ``alpha * s + beta``."""
    od = optical_density(image)
    return from_optical_density(od * np.asarray(alpha, dtype=float) + np.asarray(beta, dtype=float))


def mean_optical_density(image: np.ndarray) -> np.ndarray:
    """Per-image stain statistics: the mean optical density of H, E and DAB (3 floats)."""
    return optical_density(image).reshape(-1, 3).mean(axis=0)
