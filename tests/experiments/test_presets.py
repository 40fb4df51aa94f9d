"""`--preset medium|paper`: named sizes under the config file and the flags."""

from __future__ import annotations

import dataclasses

import pytest

from conca.config import build_options
from conca.errors import ConfigError
from conca.experiments import presets
from conca.experiments.options import DemoOptions, HarvestOptions, ReproduceConceptsOptions, SweepOptions, TrainFields

CLASSES = [HarvestOptions, TrainFields, DemoOptions, SweepOptions, ReproduceConceptsOptions]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", presets.PRESET_NAMES)
def test_every_preset_names_real_options_with_valid_values(cls, name):
    assert set(cls.PRESETS[name]) <= {f.name for f in dataclasses.fields(cls)}
    opts = build_options(cls, {"preset": name, "out": "x", "activations": "y"} if cls is TrainFields
                         else {"preset": name, "out": "x"})
    for key, value in cls.PRESETS[name].items():
        assert getattr(opts, key) == value


def test_medium_harvests_at_least_two_million_final_tokens():
    opts = build_options(HarvestOptions, {"preset": "medium", "out": "x"})
    assert opts.tokens >= 2_000_000 and opts.sites == "final" and opts.text == "pydoc+docstrings"
    assert opts.dtype == "bf16" and opts.forward_dtype == "auto"


def test_paper_is_the_papers_training_recipe():
    opts = build_options(TrainFields, {"preset": "paper", "out": "x", "activations": "y"})
    assert (opts.n_latents, opts.k, opts.steps, opts.batch_size, opts.lr, opts.warmup_steps) == \
        (32768, 32, 20000, 10000, 1e-4, 200)


def test_flags_and_the_config_file_override_the_preset(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 4\n")
    opts = build_options(HarvestOptions, {"preset": "medium", "out": "x", "tokens": "1000", "_config": str(config)})
    assert opts.tokens == 1000 and opts.batch_size == 4 and opts.dtype == "bf16"


def test_a_preset_in_the_config_file_applies_under_the_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("preset: medium\n")
    opts = build_options(HarvestOptions, {"out": "x", "dtype": "fp16", "_config": str(config)})
    assert opts.tokens == presets.MEDIUM_TOKENS and opts.dtype == "fp16"


def test_no_preset_leaves_the_defaults():
    assert build_options(HarvestOptions, {"out": "x"}) == HarvestOptions(out="x")


def test_an_unknown_preset_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="preset"):
        build_options(HarvestOptions, {"preset": "huge", "out": "x"})


def test_medium_reproduction_has_three_seeds_and_no_short_run_ablations():
    opts = build_options(ReproduceConceptsOptions, {"preset": "medium", "out": "x"})
    assert opts.seeds == 3 and opts.train_tokens >= 2_000_000
    assert opts.exp_clamps == "" and opts.ablation is False
