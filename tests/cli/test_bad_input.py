"""Every bad option, number or input file ends in one line `conca CMD: error: ...` and exit 1:
no traceback, no NaN result reported as success, no config.yaml or new --out directory left by a
run that failed validation, and no non-finite dictionary or checkpoint written."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conca.cli import main
from conca.config import build_options
from conca.dictionaries.base import create
from conca.errors import ConfigError
from conca.experiments.pipeline import HarvestOptions, TrainOptions
from conca.fileio import atomic_write_json
from conca.training.checkpoint import load_checkpoint


def error_line(capsys, argv: list[str], match: str) -> str:
    """Run `conca argv`; check exit 1 and a stderr of exactly one `conca CMD: error:` line matching `match`."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from inside main
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"conca {argv[0]}: error: "), err
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


def matrix(path: Path, values: np.ndarray | None = None) -> Path:
    if values is None:
        values = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    np.save(path, values)
    return path


def train_argv(tmp_path: Path, *extra: str, activations: Path | None = None, steps: str | None = "5") -> list[str]:
    source = activations or matrix(tmp_path / "x.npy")
    return ["train", "--activations", str(source), "--out", str(tmp_path / "out"), "--batch-size", "64",
            "--progress", "false", *(["--steps", steps] if steps else []), *extra]


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists(), "a run refused before training must not create --out"


# --- non-finite numbers -------------------------------------------------------------------
def test_huge_lr_stops_at_the_diverging_step_and_saves_no_nan_dictionary(tmp_path, capsys):
    line = error_line(capsys, train_argv(tmp_path, "--lr", "1e10"), "non-finite")
    assert "at step 2 of 5" in line and "lr=1e+10" in line and "nothing was saved" in line
    assert not (tmp_path / "out" / "dictionary").exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    line = error_line(capsys, train_argv(tmp_path, "--lr", "1e10", "--checkpoint-every", "1"), "non-finite")
    assert "last finite checkpoint (step 1)" in line
    state = load_checkpoint(tmp_path / "out" / "checkpoint.json")
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in state["dictionaries"]["dictionary"].values())


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_lr_flag_is_refused(tmp_path, capsys, value):
    error_line(capsys, train_argv(tmp_path, f"--lr={value}"), "--lr must be a finite number")
    assert_nothing_written(tmp_path)


def test_non_finite_lr_in_yaml_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: .inf\n")
    error_line(capsys, train_argv(tmp_path, "--config", str(tmp_path / "c.yaml")), "--lr must be a finite number")
    assert_nothing_written(tmp_path)


def test_inputs_whose_squares_overflow_float32_are_refused(tmp_path, capsys):
    huge = matrix(tmp_path / "huge.npy", np.full((512, 8), 1e30, dtype=np.float32))
    error_line(capsys, train_argv(tmp_path, activations=huge), "too large")
    assert_nothing_written(tmp_path)


def test_json_outputs_are_strict_with_nan_and_inf_as_null(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"fvu": float("nan"), "history": [{"l0": float("inf")}, 1.5]})

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    assert data == {"fvu": None, "history": [{"l0": None}, 1.5]}


# --- no silent substitution ---------------------------------------------------------------
def test_zero_latents_is_refused_not_replaced_by_the_default_width(tmp_path, capsys):
    error_line(capsys, train_argv(tmp_path, "--n-latents", "0"), "--n-latents must be >= 1")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("tokens", ["0", "-5"])
def test_harvest_of_no_tokens_is_refused_before_the_model_loads(tmp_path, capsys, tokens):
    # the model named does not exist: the option check must come first
    error_line(capsys, ["harvest", "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "out"),
                        "--tokens", tokens], "--tokens must be >= 1")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("yaml_text, match", [("steps: true\n", "--steps must be an integer, got True"),
                                              ("steps: 20.9\n", "--steps must be an integer, got 20.9"),
                                              ("normalize_input: maybe\n", "--normalize-input must be true or false")])
def test_yaml_values_of_the_wrong_type_are_refused(tmp_path, capsys, yaml_text, match):
    (tmp_path / "c.yaml").write_text(yaml_text)
    error_line(capsys, train_argv(tmp_path, "--config", str(tmp_path / "c.yaml"), steps=None), match)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("values", [np.arange(4096).reshape(512, 8), np.ones((512, 8), dtype=bool),
                                    np.ones((512, 8), dtype=np.complex64), np.full((16, 8), "a")],
                         ids=["int", "bool", "complex", "string"])
def test_npy_that_is_not_float_is_refused_not_cast(tmp_path, capsys, values):
    source = matrix(tmp_path / "m.npy", values)
    error_line(capsys, train_argv(tmp_path, activations=source), f"holds {values.dtype} values")
    assert_nothing_written(tmp_path)


def test_option_types_are_strict_for_every_command():
    opts = build_options(TrainOptions, {"steps": "1e1", "batch_size": 64.0, "lr": "0.5", "normalize_input": "no"})
    assert (opts.steps, opts.batch_size, opts.lr, opts.normalize_input) == (10, 64, 0.5, False)
    for key, bad in [("steps", True), ("steps", 20.9), ("steps", "abc"), ("lr", False), ("lr", "nan"),
                     ("normalize_input", 2), ("normalize_input", "maybe"), ("method", True), ("k", [1])]:
        with pytest.raises(ConfigError, match=f"--{key.replace('_', '-')} must"):
            build_options(TrainOptions, {key: bad})
    with pytest.raises(ConfigError, match="--split must be one of train, heldout, all"):
        build_options(HarvestOptions, {"split": "test"})
    with pytest.raises(ConfigError, match="--heldout-fraction must be < 1"):
        build_options(HarvestOptions, {"heldout_fraction": 1})


def test_method_config_fields_are_checked_against_their_types():
    assert create("topk", d_in=4, n_latents=8, k="3").config.k == 3
    with pytest.raises(ConfigError, match="topk option k must be an integer, got True"):
        create("topk", d_in=4, n_latents=8, k=True)
    with pytest.raises(ConfigError, match="relu_l1 option l1_coeff must be a finite number"):
        create("relu_l1", d_in=4, n_latents=8, l1_coeff=float("inf"))


# --- no tracebacks ------------------------------------------------------------------------
def test_npz_archive_named_npy_is_refused(tmp_path, capsys):
    with open(tmp_path / "a.npy", "wb") as f:
        np.savez(f, a=np.zeros((4, 4)))
    error_line(capsys, train_argv(tmp_path, activations=tmp_path / "a.npy"), "is an .npz archive")
    assert_nothing_written(tmp_path)


def test_all_zero_activations_are_refused(tmp_path, capsys):
    zeros = matrix(tmp_path / "z.npy", np.zeros((512, 8), dtype=np.float32))
    error_line(capsys, train_argv(tmp_path, activations=zeros), "all zero")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("flag", ["--eval-every", "--checkpoint-every"])
def test_zero_step_intervals_are_refused(tmp_path, capsys, flag):
    error_line(capsys, train_argv(tmp_path, flag, "0"), f"{flag} must be >= 1, got 0")
    assert_nothing_written(tmp_path)


def test_context_of_one_token_is_refused(tmp_path, capsys):
    error_line(capsys, ["harvest", "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "out"),
                        "--ctx-len", "1"], "--ctx-len must be >= 2")
    assert_nothing_written(tmp_path)


@pytest.fixture
def no_loader_bars():
    """transformers draws its own bar while loading weights; off, so stderr holds only conca's line."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def test_context_longer_than_the_model_is_refused_before_the_forward(tmp_path, capsys, tiny_model_dirs, text_file,
                                                                     no_loader_bars):
    model = tiny_model_dirs["gpt2"]  # 128 positions
    error_line(capsys, ["harvest", "--model", str(model), "--text", str(text_file), "--out", str(tmp_path / "out"),
                        "--ctx-len", "129", "--progress", "false"], "longer than the context")
    assert_nothing_written(tmp_path)
    create("topk", d_in=32, n_latents=64, k=4).save(tmp_path / "dict")
    error_line(capsys, ["evaluate", "--dictionary", str(tmp_path / "dict"), "--model", str(model), "--site", "final",
                        "--text", str(text_file), "--ctx-len", "4096", "--out", str(tmp_path / "out")], "(128 positions)")
    assert_nothing_written(tmp_path)


def test_width_that_cannot_fit_in_memory_is_refused(tmp_path, capsys):
    error_line(capsys, train_argv(tmp_path, "--n-latents", "1e12"), "GiB of weights, more than this machine")
    assert_nothing_written(tmp_path)


def test_negative_aux_k_is_refused(tmp_path, capsys):
    error_line(capsys, train_argv(tmp_path, "--aux-k", "-1"), "--aux-k must be >= 1")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("method, options, match", [
    ("topk", "k=abc", "topk option k must be an integer"),
    ("relu_l1", "l1_coeff=abc", "relu_l1 option l1_coeff must be a number"),
    ("topk", "k=[1,2", "bad option 'k=[1,2'"),
])
def test_bad_dict_options_name_the_option(tmp_path, capsys, method, options, match):
    error_line(capsys, train_argv(tmp_path, "--method", method, "--dict-options", options), match)
    assert_nothing_written(tmp_path)


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("not a directory")
    error_line(capsys, train_argv(tmp_path), "is a file, not a directory")
    assert (tmp_path / "out").read_text() == "not a directory"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_parent_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        argv = train_argv(tmp_path)
        argv[argv.index("--out") + 1] = str(locked / "run")
        error_line(capsys, argv, "no write permission")
    finally:
        locked.chmod(0o755)
    assert not (locked / "run").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/sys/kernel").is_dir(),
                    reason="needs Linux sysfs")
def test_out_where_the_os_refuses_to_create_it_names_the_path(tmp_path, capsys):
    # sysfs refuses new directories even to root: the OSError net (or the permission check) names the path
    argv = train_argv(tmp_path)
    argv[argv.index("--out") + 1] = "/sys/conca-test-out"
    error_line(capsys, argv, "/sys")


def test_unknown_flag_and_unparsable_number_are_one_line(tmp_path, capsys):
    error_line(capsys, train_argv(tmp_path, "--stepz", "3"), "unrecognized arguments: --stepz 3")
    error_line(capsys, train_argv(tmp_path, "--steps", "abc"), "--steps must be an integer, got 'abc'")
    assert_nothing_written(tmp_path)


def test_refused_resume_keeps_the_earlier_config(tmp_path, capsys):
    assert main(train_argv(tmp_path)) == 0
    before = (tmp_path / "out" / "config.yaml").read_text()
    capsys.readouterr()
    error_line(capsys, train_argv(tmp_path, "--lr", "0.01"), "another configuration")
    assert (tmp_path / "out" / "config.yaml").read_text() == before


def test_help_shows_each_options_declared_range(capsys):
    # The range is declared once (the option's metadata): build_options checks it and --help states it.
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1000; >= 1)" in text and "(default: 0.0004; > 0)" in text and "one of none, bf16" in text


@pytest.mark.parametrize("argv, match", [
    (["harvest", "--preset", "huge"], "--preset"),
    (["train", "--preset", "small", "--activations", "x.npy"], "--preset"),
    (["harvest", "--forward-dtype", "fp8"], "--forward-dtype"),
    (["harvest", "--compile", "maybe"], "--compile"),
    (["harvest", "--max-norm-ratio", "-1"], "--max-norm-ratio"),
])
def test_bad_scale_options_are_refused_in_one_line(tmp_path, capsys, argv, match):
    error_line(capsys, [*argv, "--out", str(tmp_path / "o")], match)
    assert not (tmp_path / "o").exists()


def test_a_ratio_between_zero_and_one_is_refused_before_the_model_loads(tmp_path, capsys):
    error_line(capsys, ["harvest", "--max-norm-ratio", "0.5", "--out", str(tmp_path / "o")], "max_norm_ratio")
    assert not (tmp_path / "o").exists()
