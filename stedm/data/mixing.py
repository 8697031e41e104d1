"""Epoch mixing: the training sampler, ratio-mixed, with replacement, distributed and resumable.

Each epoch, entry ``j`` (of size ``n_j``) contributes ``int(samples * ratios[j])`` indices drawn
uniformly *with replacement* (``ratios`` sets both epoch length and mix; docs/method.md, 3 Data).
The draws of all entries are concatenated (as offsets into a ``ConcatDataset``) and shuffled.
The epoch's order depends only on ``(seed, epoch)``, so every rank computes the same list and
takes the disjoint share ``order[rank::world_size]`` (the list is first cut to a multiple of the
world size, so shares are equal and nothing is counted twice).

With ``item_seeds=True`` every position of the epoch also gets its own seed, and the sampler
yields ``(index, seed)`` pairs: the item's random draws (crop, flips, style images) then come
from that seed alone (:class:`stedm.data.datamodule.SeededItems`), so a batch is the same
whatever the worker that loads it and whether the run was interrupted.

``len()`` is always the length of this rank's whole share: Lightning counts an epoch's batches
from it and, when it resumes mid-epoch, continues its own batch counter where it stopped.
``state_dict`` records the epoch and how many indices this rank has handed out; a sampler
restored from it yields the rest of that epoch, then whole epochs again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

SEED_RANGE = 2**31 - 1


def epoch_counts(samples: int, ratios: Sequence[float]) -> list[int]:
    """Items each entry contributes per epoch."""
    return [int(samples * r) for r in ratios]


def items_per_process(counts: Sequence[int], world_size: int) -> int:
    """Items of one process's share of an epoch: the epoch cut to a multiple of the world size."""
    return sum(counts) // world_size


class MixedEpochSampler(Sampler):
    def __init__(self, sizes: Sequence[int], ratios: Sequence[float], samples: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, item_seeds: bool = False) -> None:
        if len(sizes) != len(ratios):
            raise ValueError(f"{len(ratios)} ratios for {len(sizes)} datasets")
        if any(n <= 0 for n in sizes):
            raise ValueError(f"every dataset needs at least one item, got sizes {list(sizes)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sizes = list(sizes)
        self.counts = epoch_counts(samples, ratios)
        if sum(self.counts) < world_size:
            raise ValueError(f"data.samples x ratios gives {sum(self.counts)} items per epoch, fewer than "
                             f"the {world_size} processes; raise data.samples")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.item_seeds = item_seeds
        self.epoch = 0
        self.start = 0  # indices of this rank's share already handed out in this epoch

    def _epoch_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole epoch's shuffled ConcatDataset indices and one seed per position (identical on
        every rank), cut to a multiple of the world size."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        offsets = torch.tensor([0] + self.sizes[:-1]).cumsum(0).tolist()
        parts = [torch.randint(n, (k,), generator=g) + off for n, k, off in zip(self.sizes, self.counts, offsets)]
        total = sum(self.counts)
        order = torch.cat(parts)[torch.randperm(total, generator=g)]
        seeds = torch.randint(SEED_RANGE, (total,), generator=g)
        keep = total - total % self.world_size
        return order[:keep], seeds[:keep]

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The whole epoch's shuffled list of ConcatDataset indices (identical on every rank)."""
        return self._epoch_draws(epoch)[0]

    def share_length(self) -> int:
        return items_per_process(self.counts, self.world_size)

    def __len__(self) -> int:
        return self.share_length()

    def __iter__(self) -> Iterator:
        order, seeds = (t[self.rank::self.world_size].tolist() for t in self._epoch_draws(self.epoch))
        start, self.start = self.start, 0  # a resumed position applies to one pass only
        for position in range(start, len(order)):
            yield (order[position], seeds[position]) if self.item_seeds else order[position]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def state_dict(self, consumed: int, epoch_finished: bool = False) -> dict:
        """State after ``consumed`` indices of this rank's share of the current epoch; a finished
        epoch (all of its share, or all the batches the trainer takes from it) continues with the
        next one."""
        epoch, consumed = (self.epoch + 1, 0) if epoch_finished or consumed >= self.share_length() else \
            (self.epoch, int(consumed))
        return {"epoch": epoch, "consumed": consumed, "seed": self.seed,
                "world_size": self.world_size, "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or list(state["counts"]) != self.counts or state["world_size"] != self.world_size:
            raise ValueError("the checkpoint's data stream differs from this run's (seed, data.samples, "
                             "data.ratios or number of processes changed); resume with the same settings")
        self.epoch, self.start = int(state["epoch"]), int(state["consumed"])
