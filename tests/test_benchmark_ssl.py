"""benchmarks/ssl_pretrain.py: the reference path it compares against is the config's, and its
``compare`` (called by the lead's speed table) returns a well-formed comparison. No timing is asserted."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from benchmarks import harness as H
from benchmarks import ssl_pretrain as bench


def test_reference_path_is_selected_by_config_and_the_fast_path_is_the_default():
    paths = {"reference": bench.build_module("tiny", bench.REFERENCE_OVERRIDES),
             "default": bench.build_module("tiny")}
    expected = {"reference": (AttnProcessor, False, None, "32-true"), "default": (AttnProcessor2_0, True, True, "auto")}
    for name, (module, cfg) in paths.items():
        attention, ema_foreach, fused, precision = expected[name]
        optimizer = module.configure_optimizers()
        assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"] is fused, name
        assert not optimizer.defaults["foreach"], name  # the reference: torch's for-loop Adam on CPU
        assert type(module.net.mid_attn.processor) is attention, name
        assert module.ema.foreach is ema_foreach and cfg.location.precision == precision, name
        assert not cfg.location.compile and cfg.model.sample_every_n_epochs == 0, name


@pytest.mark.e2e  # two fresh processes, each importing torch and Lightning
def test_compare_returns_one_well_formed_comparison():
    [row] = bench.compare("cpu", 1, H.Repeats(1, 1), quick=True, preset="tiny", batch=1, size=16)
    assert (row.unit, row.target, row.memory_target) == ("step", 2.5, 1.1)
    assert "fused Adam" in row.default_label and "batch 1, 16² px" in row.what
    for measured in (row.reference, row.default):
        assert len(measured.times) == 1 and measured.seconds > 0
        assert measured.flops > 0 and measured.peak_mib > 0
    assert row.reference.flops == pytest.approx(row.default.flops, rel=0.01)  # same work, two ways
    assert H.comparison_table([row], 1.0, "peak RSS (MiB)").count("\n") == 2
