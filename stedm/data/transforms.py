"""Albumentations pipelines; image and mask (and instance map) are always transformed together."""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

from stedm.metrics.stain import hed_draw, hed_perturb


class HEDJitter(A.ImageOnlyTransform):
    """Tellez et al.'s HED stain jitter of the image (the demo's stain simulation, one draw per
    patch): each stain channel ``s -> alpha * s + beta``, ``alpha ~ U(1 - sigma, 1 + sigma)``,
    ``beta ~ U(-sigma, sigma)`` (:func:`stedm.metrics.stain.hed_draw`, :func:`stedm.metrics.stain.hed_perturb`)."""

    def __init__(self, sigma: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.sigma = float(sigma)

    def get_params_dependent_on_data(self, params, data):
        alpha, beta = hed_draw(self.random_generator, self.sigma)
        return {"alpha": alpha, "beta": beta}

    def apply(self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params) -> np.ndarray:
        return hed_perturb(img, alpha, beta)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma",)


def train_transform(patch_size: int, flips: bool = True, rotate90: bool = True, color_jitter: float = 0.0,
                    blur: float = 0.0, hed_jitter: float = 0.0) -> A.Compose:
    """Random ``patch_size`` crop (reflect-padded when the image is smaller) + light augmentation.

    Orientation, each choice equally likely (image, mask and instances get the same one):

    - ``flips`` and ``rotate90``: one of the 8 symmetries of the square (4 rotations, 4 mirrors);
    - ``flips`` only: one of identity, horizontal flip, vertical flip, both (= rotation by 180°);
    - ``rotate90`` only: a rotation by 0°, 90°, 180° or 270° (never a mirror image);
    - neither: the patch keeps its orientation.

    ``color_jitter`` and ``blur`` are probabilities of image-only photometric changes
    (GenSelfDiff's fine-tuning uses both); masks only see the geometric ones. ``hed_jitter`` is
    the sigma of a HED stain jitter of every patch (:class:`HEDJitter`; 0.2 = Tellez et al.'s
    "HED-strong", the demo's lab-to-lab stain shift; 0 = off), the stain-augmentation baseline. Seed the pipeline
    with :func:`seed_transform`, which keeps its random steps independent of each other.
    """
    steps = [
        A.PadIfNeeded(min_height=patch_size, min_width=patch_size, border_mode=cv2.BORDER_REFLECT_101),
        A.RandomCrop(height=patch_size, width=patch_size),
    ]
    if flips and rotate90:
        steps.append(A.SquareSymmetry(p=1.0))
    elif flips:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    elif rotate90:
        steps.append(A.RandomRotate90(p=1.0))
    if color_jitter > 0:
        steps.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=color_jitter))
    if blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=blur))
    if hed_jitter < 0:
        raise ValueError(f"data.augment.hed_jitter={hed_jitter}: the HED jitter's sigma must be >= 0 (0 = off)")
    if hed_jitter > 0:
        steps.append(HEDJitter(hed_jitter))
    return A.Compose(steps)


def seed_transform(transform: A.Compose, seed: int) -> None:
    """Seed every random step of ``transform`` from ``seed``: reproducible and mutually independent.

    albumentations' ``Compose.set_random_seed`` gives each step its *own* generator started from
    the same seed, so all steps draw the same numbers: every ``p=0.5`` decision fires together
    and the crop position follows them. Here all steps share one pair of generators and draw in
    turn. The generators come from a child of ``seed``'s ``SeedSequence``, so they are also
    independent of ``np.random.default_rng(seed)`` (which the style source uses).
    """
    child = np.random.SeedSequence(seed).spawn(1)[0]
    transform.set_random_state(np.random.default_rng(child), random.Random(int(child.generate_state(1)[0])))
