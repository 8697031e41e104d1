"""How a model samples: one settings object for the training sample grids, ``generate()`` and
``predict_diff.py`` (``conf/sampling/{fast,paper}.yaml``).

``solver`` and ``steps`` pick the diffusion solver (:mod:`stedm.diffusion.solvers`), ``spacing``
its timesteps; ``cfg_scale``, ``rescale`` and ``guidance_mode`` the style guidance
(:mod:`stedm.diffusion.guidance`); ``batched_guidance`` and ``shared_trunk`` how the guided pair of
predictions is computed (all three ways give the same images).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from stedm.diffusion.guidance import GUIDANCE_MODES
from stedm.diffusion.solvers import SOLVERS, sample

log = logging.getLogger(__name__)

#: the command-line aliases of ``predict_diff.py`` (the seeds' ``cfg_scale=1.5``, the README's
#: ``sampler=ddim steps=128``): top-level key -> field
ALIASES = {"sampler": "solver", "steps": "steps", "spacing": "spacing", "cfg_scale": "cfg_scale",
           "rescale": "rescale", "guidance_mode": "guidance_mode", "batched_guidance": "batched_guidance",
           "shared_trunk": "shared_trunk"}


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings, checked on construction (errors name ``where.<field>``)."""

    solver: str = "dpm_solver"
    steps: int = 8
    spacing: str | None = None  # None: the solver's default (ddim: paper; dpm_solver: logsnr)
    cfg_scale: float = 1.5  # style guidance; 1 = none
    rescale: float = 0.7  # guidance rescale phi, 0 = plain CFG
    guidance_mode: str = "stedm"  # stedm | diffusers
    batched_guidance: bool = True
    shared_trunk: bool = True
    name: str | None = None  # the conf/sampling preset it came from (informative only)
    #: where the settings come from, for messages: ``where.<field>``, or the alias a field was given as
    where: str = dataclasses.field(default="sampling", compare=False, repr=False)
    given_as: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False, repr=False)

    def key(self, field: str) -> str:
        """The name a message gives ``field``: the alias it was given as, or ``where.field``."""
        return dict(self.given_as).get(field, f"{self.where}.{field}")

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"{self.key('solver')}={self.solver}: choose one of {', '.join(SOLVERS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"{self.key('steps')}={self.steps}: give a positive number of sampling steps")
        if self.guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"{self.key('guidance_mode')}={self.guidance_mode}: choose one of "
                             f"{', '.join(GUIDANCE_MODES)}")
        for key, low, high in (("cfg_scale", 0.0, math.inf), ("rescale", 0.0, 1.0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise ValueError(f"{self.key(key)}={value}: give a finite number in [{low}, {high}]"
                                 + (" (1 = no guidance, 0 = unconditional)" if key == "cfg_scale" else ""))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | SamplingOptions | None, where: str = "sampling"
                    ) -> SamplingOptions:
        """From a mapping (a ``conf/sampling`` entry); unknown keys are refused by name."""
        if isinstance(config, SamplingOptions):
            return config
        config = dict(config or {})
        known = set(cls().to_dict())
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**config, where=where)

    def replace(self, **changes: Any) -> SamplingOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("where", "given_as")}

    def check_schedule(self, scheduler) -> None:  # noqa: ANN001 - a diffusers scheduler
        """Refuse a ``solver``/``steps``/``spacing`` the model's training schedule cannot take (the
        solver runs over a 1-pixel latent with a zero network: its timesteps are checked, nothing
        is computed)."""
        try:
            sample(lambda x, t: torch.zeros_like(x), torch.zeros(1, 1, 1, 1), scheduler, self.solver, self.steps,
                   self.spacing)
        except ValueError as err:
            raise ValueError(f"{self.key('solver')}={self.solver} {self.key('steps')}={self.steps} "
                             f"{self.key('spacing')}={self.spacing}: {err}") from None


def run_options(cfg: Mapping[str, Any]) -> SamplingOptions:
    """The sampling options of a ``predict_diff.py`` run: its ``sampling`` entry with the top-level
    aliases that are given (not null) applied, each logged."""
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    options = SamplingOptions.from_config(resolved.get("sampling"))
    given = {alias: field for alias, field in ALIASES.items() if resolved.get(alias) is not None}
    for alias, field in given.items():
        log.info("%s=%s -> sampling.%s", alias, resolved[alias], field)
    if not given:
        return options
    return options.replace(**{field: resolved[alias] for alias, field in given.items()},
                           given_as=tuple((field, alias) for alias, field in given.items()))
