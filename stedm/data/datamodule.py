"""The one DataModule: registry entries -> mixed training stream + whole-image evaluation sets.

``data.dataset`` maps entry names to ``_target_`` configs (``conf/data/dataset/``), in list
order; ``data.ratios`` pairs with them (``null`` = 1.0 each). Training draws
``int(data.samples * ratio)`` items per entry per epoch (:class:`MixedEpochSampler`), each
item's random draws seeded by its place in the epoch (:class:`SeededItems`), so the stream
resumes exactly from a checkpoint (:meth:`StedmDataModule.state_dict`); validation and test
use the first entry with ``split=val`` / ``split=test``, unaugmented and whole (the evaluator
slides a window over them). Every dataset is built, and its first item
checked against the sample contract, when the DataModule is created, so configuration
mistakes surface before any training starts: so are counts that are not positive, an epoch
too short to fill one batch (:func:`check_epoch`; again per process once the trainer is known)
and files that cannot be read in full (:func:`stedm.data.verify.verify_files`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate

from stedm.cluster import ignore_scheduler_signals
from stedm.data.contract import check_sample
from stedm.data.mixing import MixedEpochSampler, epoch_counts, items_per_process
from stedm.data.style_sources import StyleSource, check_compatible
from stedm.data.transforms import train_transform
from stedm.data.verify import verify_files


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation over the keys every sample has: optional keys (``style``,
    ``instances``, dataset-specific ``meta`` fields) drop out of batches that mix datasets."""
    def common(dicts: list[dict[str, Any]]) -> list[str]:
        keys = set(dicts[0]).intersection(*dicts[1:])
        return [k for k in dicts[0] if k in keys]

    batch = {k: default_collate([s[k] for s in samples]) for k in common(samples) if k != "meta"}
    metas = [s["meta"] for s in samples]
    batch["meta"] = {k: default_collate([m[k] for m in metas]) for k in common(metas)}
    return batch


def entry_ratios(data: DictConfig) -> list[float]:
    names = list(data.dataset.keys())
    if not names:
        raise ValueError("no dataset entries: choose some with data/dataset=[entry,...]")
    ratios = data.get("ratios")
    if ratios is None:
        return [1.0] * len(names)
    ratios = list(ratios)
    if len(ratios) != len(names):
        raise ValueError(f"data.ratios has {len(ratios)} values but data/dataset lists {len(names)} entries "
                         f"{names}; give one ratio per entry, in the same order")
    if any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"data.ratios={ratios} must be non-negative with a positive sum")
    return [float(r) for r in ratios]


def check_counts(data: DictConfig, batch_size: int, batch_mul: int | None = None) -> None:
    """Refuse counts that are not positive, naming the key (``batch_mul``: ``location.batch_mul``,
    when the caller knows it), and entries whose ratio gives them no item per epoch."""
    values = {"data.samples": data.samples, "data.patch_size": data.patch_size,
              "data.batch_base": data.get("batch_base"), "location.batch_mul": batch_mul}
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value <= 0 or value != int(value)):
            raise ValueError(f"{key}={value} must be a positive whole number")
    if batch_size <= 0:
        raise ValueError(f"the batch size (data.batch_base x location.batch_mul) is {batch_size}; "
                         "it must be positive")
    ratios = entry_ratios(data)
    for name, ratio, count in zip(data.dataset.keys(), ratios, epoch_counts(int(data.samples), ratios)):
        if ratio > 0 and count == 0:
            raise ValueError(f"entry '{name}' has ratio {ratio} in data.ratios, but int(data.samples={data.samples} "
                             f"x {ratio}) = 0 items per epoch; raise data.samples to at least "
                             f"{math.ceil(1 / ratio)}, raise its ratio, or give it ratio 0 to leave it out")


def check_epoch(data: DictConfig, batch_size: int, world_size: int = 1) -> None:
    """Refuse an epoch whose share per process cannot fill one batch: the training loader drops
    incomplete batches, so the run would train nothing (and exit as if it had)."""
    ratios = entry_ratios(data)
    counts = epoch_counts(int(data.samples), ratios)
    share = items_per_process(counts, world_size)
    if share < batch_size:
        over = f" shared by {world_size} processes = {share} per process" if world_size > 1 else ""
        raise ValueError(
            f"data.samples={data.samples} x data.ratios={ratios} gives {sum(counts)} training items per epoch"
            f"{over}, fewer than one batch of {batch_size} (data.batch_base x location.batch_mul); incomplete "
            "batches are dropped, so nothing would be trained: raise data.samples or lower data.batch_base "
            "or location.batch_mul")


def build_dataset(data: DictConfig, name: str, split: str, transform=None, style_source=None) -> Dataset:
    """Instantiate registry entry ``name`` for ``split``; errors name the entry."""
    entry = data.dataset[name]
    if entry is None or "_target_" not in entry:
        raise ValueError(f"data.dataset.{name} has no _target_; entries live in conf/data/dataset/{name}.yaml")
    # Called directly rather than through hydra's instantiate, so the dataset's own error
    # (naming the file or key) reaches the user unwrapped.
    kwargs = OmegaConf.to_container(entry, resolve=True)
    dataset_class = get_class(kwargs.pop("_target_"))
    dataset = dataset_class(**kwargs, name=name, split=split, num_classes=data.num_classes,
                            transform=transform, style_source=style_source)
    if len(dataset) == 0:
        raise ValueError(f"dataset entry '{name}' (split {split}) is empty; check its paths and filters")
    if style_source is not None:
        check_compatible(style_source, dataset, name)
    check_sample(dataset[0], data.num_classes)
    return dataset


def train_dataset(data: DictConfig, name: str, style_source: StyleSource | None = None) -> Dataset:
    """Registry entry ``name`` as training data: random ``data.patch_size`` crops augmented by
    ``data.augment`` (:func:`stedm.data.transforms.train_transform`), styles from ``style_source``."""
    augment = OmegaConf.to_container(data.get("augment") or {}, resolve=True)
    return build_dataset(data, name, "train", train_transform(int(data.patch_size), **augment), style_source)


def check_label_spaces(data: DictConfig, names: list[str], datasets: list[Dataset]) -> None:
    """Refuse a ``*_syn`` entry whose pairs were drawn in another label space than the real
    (first) entry's masks: ``data.num_classes`` classes, or 2 where the model merges every
    foreground class (``data.mask_classes`` = 2, e.g. a ``segmenter.binary`` segmenter)."""
    merged = data.get("mask_classes") == 2
    real = 2 if merged else int(data.num_classes)
    for name, dataset in zip(names, datasets):
        drawn = getattr(dataset, "layout_classes", None)
        if drawn is None or (2 if merged else int(drawn)) == real:
            continue
        raise ValueError(
            f"data/dataset entry '{name}': the pairs in {dataset.folder} are drawn in a {drawn}-class layout "
            f"({'background vs any foreground' if drawn == 2 else 'every class'}, as predict_diff.py recorded in its "
            f"settings), "
            f"but the real entry '{names[0]}' has {real} classes (data.num_classes={data.num_classes}"
            f"{', data.mask_classes=' + str(data.mask_classes) if data.get('mask_classes') is not None else ''}); "
            "mixing them trains on contradicting labels: write the pairs with the data setting's "
            "data.binary_layout, or train a binary segmenter (segmenter.binary=true segmenter.classes=2)")


class SeededItems(Dataset):
    """A dataset addressed by ``(index, seed)`` pairs (:class:`MixedEpochSampler` with ``item_seeds``).

    Every random draw of an item (the one the dataset takes from torch's generator to seed its
    augmentation and style sampling) then follows from the pair alone: a batch does not depend
    on which worker loads it, on the number of workers, or on whether the run was resumed. The
    caller's generator state is left untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class StedmDataModule(pl.LightningDataModule):
    """Loaders for every stage. ``eval_splits`` picks which of val/test are built."""

    def __init__(self, data: DictConfig, batch_size: int, num_workers: int = 0, seed: int = 0,
                 style_source: StyleSource | None = None, eval_splits: Sequence[str] = ("val", "test"),
                 pin_memory: bool = False, cache_dir: str | Path | None = None, batch_mul: int | None = None) -> None:
        """``cache_dir`` remembers the files already read in full (:mod:`stedm.data.verify`);
        ``batch_mul`` is ``location.batch_mul``, named when it is not positive."""
        super().__init__()
        check_counts(data, int(batch_size), batch_mul)
        check_epoch(data, int(batch_size))
        self.data = data
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pin_memory = pin_memory
        self.style_source = style_source
        self.names = list(data.dataset.keys())
        self.ratios = entry_ratios(data)
        self.train_sets = [train_dataset(data, n, style_source) for n in self.names]
        check_label_spaces(data, self.names, self.train_sets)
        self.eval_sets = {s: build_dataset(data, self.names[0], s) for s in eval_splits}
        verify_files([*self.train_sets, *self.eval_sets.values()], cache_dir)
        self.cache_dir = cache_dir
        self.latent_store = None  # data.cache_latents: built at setup("fit") (stedm.data.latent_cache)
        self.sampler: MixedEpochSampler | None = None
        self._pending_state: dict | None = None

    # -- training stream ------------------------------------------------------------------------
    def epoch_mix(self) -> dict[str, int]:
        """Items each entry contributes per epoch."""
        return dict(zip(self.names, epoch_counts(int(self.data.samples), self.ratios)))

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def setup(self, stage: str) -> None:
        if stage == "fit":  # now the number of processes is known
            check_epoch(self.data, self.batch_size, self._rank_world()[1])
            if self.data.get("cache_latents") and self.latent_store is None:
                from stedm.data.latent_cache import attach

                attach(self, self.trainer)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        self.sampler = MixedEpochSampler([len(d) for d in self.train_sets], self.ratios, int(self.data.samples),
                                         seed=self.seed, rank=rank, world_size=world, item_seeds=True)
        if self._pending_state is not None:
            self.sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        train_sets = self.train_sets
        if self.latent_store is not None:
            from stedm.data.latent_cache import WithLatents

            train_sets = [WithLatents(d, self.latent_store) for d in train_sets]
        return DataLoader(SeededItems(ConcatDataset(train_sets)), batch_size=self.batch_size,
                          sampler=self.sampler, num_workers=self.num_workers, collate_fn=collate,
                          pin_memory=self.pin_memory, drop_last=True, persistent_workers=self.num_workers > 0,
                          generator=_loader_generator(), worker_init_fn=ignore_scheduler_signals)

    # -- evaluation -----------------------------------------------------------------------------
    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.eval_sets:
            raise RuntimeError(f"no {split} data was built; pass eval_splits including '{split}'")
        # Whole images of varying size: one unit per batch. Each rank takes every world-th unit,
        # without the padding duplicates a DistributedSampler would add to the metrics.
        # A rank left without a unit (fewer units than processes) repeats one, so that every rank
        # takes part in the metrics' collective gather; the evaluator counts each unit once.
        rank, world = self._rank_world()
        size = len(self.eval_sets[split])
        units = list(range(rank, size, world)) or [rank % size]
        return DataLoader(self.eval_sets[split], batch_size=1, sampler=units, num_workers=self.num_workers,
                          collate_fn=collate, pin_memory=self.pin_memory, generator=_loader_generator(),
                          worker_init_fn=ignore_scheduler_signals)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # -- resumable position ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the training stream stands. Lightning checkpoints between batches (the current
        batch processed, not yet counted completed) and resumes after the batches it counted
        processed, so that is the position recorded."""
        if self.sampler is None or self.trainer is None:
            return {}
        processed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        finished = processed >= self.trainer.num_training_batches
        return {"sampler": self.sampler.state_dict(consumed=processed * self.batch_size, epoch_finished=finished)}

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = state.get("sampler")


def _loader_generator() -> torch.Generator:
    """A loader's own generator: creating its iterator then draws the workers' base seed from it,
    not from the global generator, whose state the checkpoint restores for training."""
    return torch.Generator().manual_seed(0)
