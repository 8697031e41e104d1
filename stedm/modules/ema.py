"""The exponential moving average of a module's weights, for both diffusion modules.

One :class:`ParameterEMA` wraps diffusers' :class:`~diffusers.training_utils.EMAModel` over the
parameters a module trains: it follows them to their device (Lightning moves a module after
construction and checkpoints load on the CPU; the EMA is no submodule), steps once per optimizer
step, swaps its weights in for sampling, bakes them in for inference, and travels in the
checkpoint under ``"ema"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from diffusers.training_utils import EMAModel
from torch import Tensor, nn

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "ema"

NamedParameters = Callable[[], Iterable[tuple[str, nn.Parameter]]]


class ParameterEMA(EMAModel):
    """EMA over ``named_parameters()`` (a callable: the set is read anew, on its current device).

    ``on_missing`` says what loading a checkpoint without EMA weights does: ``"warn"`` (start
    the EMA from the checkpoint's weights) or ``"raise"``. Still an :class:`EMAModel`
    (``shadow_params``, ``optimization_step``, ``copy_to``, ...).
    """

    def __init__(self, named_parameters: NamedParameters, decay: float, foreach: bool = True,
                 on_missing: str = "warn") -> None:
        if on_missing not in ("warn", "raise"):
            raise ValueError(f"on_missing must be 'warn' or 'raise', got {on_missing!r}")
        self.named_parameters, self.on_missing = named_parameters, on_missing
        super().__init__([p for _, p in named_parameters()], decay=decay, foreach=foreach)

    def tracked(self) -> list[nn.Parameter]:
        """The tracked parameters, with the EMA moved to their device."""
        params = [p for _, p in self.named_parameters()]
        if self.shadow_params[0].device != params[0].device:
            self.to(device=params[0].device)
        return params

    def update(self) -> None:
        """One EMA step; call once per real optimizer step (after gradient accumulation)."""
        self.step(self.tracked())

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the module for the duration of the block, then the live ones again."""
        params = self.tracked()
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    def bake(self) -> None:
        """Copy the EMA weights into the module for good (inference only)."""
        self.copy_to(self.tracked())

    def averaged(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` (a state dict) with every tracked parameter replaced by its EMA value."""
        state = dict(state)
        for (name, _), shadow in zip(self.named_parameters(), self.shadow_params, strict=True):
            state[name] = shadow
        return state

    def save(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.state_dict()

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Take the EMA weights of ``checkpoint`` (refusing ones of another architecture)."""
        if CHECKPOINT_KEY not in checkpoint:
            if self.on_missing == "raise":
                raise KeyError("checkpoint has no 'ema' state; it was not written by this module")
            log.warning("the checkpoint holds no EMA weights; the EMA starts from the checkpoint's weights")
            state = checkpoint["state_dict"]
            EMAModel.__init__(self, [state[name] for name, _ in self.named_parameters()], decay=self.decay,
                              foreach=self.foreach)
            return
        shadow = checkpoint[CHECKPOINT_KEY]["shadow_params"]
        if [tuple(s.shape) for s in shadow] != [tuple(p.shape) for _, p in self.named_parameters()]:
            raise ValueError("the checkpoint's EMA weights do not match this model's trainable parameters; "
                             "build the model with the config the checkpoint was trained with")
        self.load_state_dict(checkpoint[CHECKPOINT_KEY])
        self.tracked()
