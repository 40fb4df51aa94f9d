"""The conca command: help, config files, effective config, resumable jobs and clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conca.cli import main
from conca.config import build_options
from conca.dictionaries import methods
from conca.errors import ConfigError
from conca.experiments.pipeline import TrainOptions


@pytest.mark.parametrize("command", ["harvest", "train", "evaluate", "demo", "sweep", "export", "import", "concepts",
                                     "simulate", "reproduce concepts"])
def test_every_command_has_help_that_explains_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text and "--out" in text
    assert "(default:" in text or command == "import"  # import has only required options


def test_reproduce_without_a_target_shows_its_targets(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce"])
    assert "concepts" in capsys.readouterr().out


def test_methods_lists_one_name_per_line(capsys):
    assert main(["methods"]) == 0
    assert "topk" in capsys.readouterr().out.splitlines()


def test_config_file_then_flags_override(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 7\nbatch-size: 64\nk: 3\n")
    (tmp_path / "c.toml").write_text("steps = 9\nlr = 0.01\n")
    opts = build_options(TrainOptions, {"_config": str(tmp_path / "c.yaml"), "k": 5})
    assert (opts.steps, opts.batch_size, opts.k) == (7, 64, 5)
    opts = build_options(TrainOptions, {"_config": str(tmp_path / "c.toml")})
    assert (opts.steps, opts.lr) == (9, 0.01)
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown option.*stepz"):
        build_options(TrainOptions, {"_config": str(tmp_path / "bad.yaml")})


def _matrix(path, n=3000, d=12, seed=0):
    rng = np.random.default_rng(seed)
    np.save(path, (rng.normal(size=(n, 4)) @ rng.normal(size=(4, d))).astype(np.float32))
    return path


def test_train_on_npy_writes_metrics_and_effective_config(tmp_path, capsys):
    npy = _matrix(tmp_path / "x.npy")
    (tmp_path / "opts.yaml").write_text("n_latents: 48\nk: 4\nbatch_size: 256\n")
    code = main(["train", "--activations", str(npy), "--out", str(tmp_path / "run"), "--steps", "60",
                 "--config", str(tmp_path / "opts.yaml"), "--progress", "false", "--eval-every", "20"])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tokens_per_s"] > 0 and 0 <= metrics["fvu"] < 1
    printed = json.loads(capsys.readouterr().out)  # train prints just these two, as one JSON line
    assert printed == {"tokens_per_s": metrics["tokens_per_s"], "fvu": metrics["fvu"]}
    effective = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert effective["steps"] == 60 and effective["n_latents"] == 48 and effective["k"] == 4
    assert (tmp_path / "run" / "dictionary" / "weights.safetensors").exists()


def test_bad_inputs_fail_with_named_problem(tmp_path, capsys, tiny_model_dirs):
    np.save(tmp_path / "x.npy", np.ones((10, 3), dtype=np.float32))
    assert main(["train", "--activations", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o")]) == 1
    assert "activation file not found" in capsys.readouterr().err
    assert main(["train", "--method", "nope", "--activations", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o")]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main(["harvest", "--model", str(tiny_model_dirs["llama"]), "--text", str(tmp_path / "empty.txt"),
                 "--split", "all", "--out", str(tmp_path / "s")]) == 1
    assert "empty" in capsys.readouterr().err
    assert main(["harvest", "--model", str(tiny_model_dirs["llama"]), "--sites", "resid.9", "--out", str(tmp_path / "s2")]) == 1
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "s2" / "manifest.json").exists()  # nothing half-written for a bad site
    assert main(["harvest", "--model", "no-such/model", "--out", str(tmp_path / "s3")]) == 1
    assert "unknown model 'no-such/model'" in capsys.readouterr().err


def test_npy_of_wrong_width_for_a_dictionary(tmp_path, capsys):
    npy = _matrix(tmp_path / "x.npy", d=12)
    main(["train", "--activations", str(npy), "--out", str(tmp_path / "a"), "--n-latents", "24", "--k", "2",
          "--steps", "5", "--batch-size", "100", "--progress", "false"])
    wrong = _matrix(tmp_path / "w.npy", d=10)
    from conca.activations.stream import open_source
    from conca.dictionaries import load_dictionary
    from conca.errors import ShapeError

    dictionary = load_dictionary(tmp_path / "a" / "dictionary")
    with pytest.raises(ShapeError, match="width 10, but 12 is expected"):
        open_source(wrong, expected_dim=dictionary.config.d_in)


def test_harvest_train_evaluate_end_to_end_on_tiny_model(tmp_path, tiny_model_dirs, text_file):
    model = str(tiny_model_dirs["gpt2"])
    assert main(["harvest", "--model", model, "--text", str(text_file), "--split", "all", "--sites", "final,mlp_out.1",
                 "--tokens", "1500", "--ctx-len", "24", "--out", str(tmp_path / "store"), "--progress", "false"]) == 0
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_tokens"] >= 1500
    assert main(["train", "--activations", str(tmp_path / "store"), "--site", "mlp_out.1", "--out", str(tmp_path / "t"),
                 "--n-latents", "64", "--k", "4", "--steps", "40", "--batch-size", "128", "--progress", "false"]) == 0
    assert main(["evaluate", "--dictionary", str(tmp_path / "t" / "dictionary"), "--model", model, "--text", str(text_file),
                 "--split", "all", "--site", "mlp_out.1", "--tokens", "300", "--ctx-len", "24",
                 "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]
    for key in ("explained_variance", "l0", "ce_loss_recovered", "kl_div", "dead_fraction", "mse_sum", "mse_mean"):
        assert key in metrics
    assert metrics["l0"] <= 4


def test_dict_options_reach_the_method_and_bad_ones_are_named(tmp_path, capsys):
    from conca.config import parse_key_values

    assert parse_key_values("a=1, b=x,c=[1,2]") == {"a": 1, "b": "x", "c": [1, 2]}
    npy = _matrix(tmp_path / "x.npy")
    args = ["train", "--activations", str(npy), "--n-latents", "48", "--steps", "5", "--batch-size", "256",
            "--progress", "false"]
    assert main(args + ["--out", str(tmp_path / "a"), "--dict-options", "aux_coeff=0.5,k=6"]) == 0
    saved = json.loads((tmp_path / "a" / "dictionary" / "config.json").read_text())["config"]
    assert saved["k"] == 6 and saved["aux_coeff"] == 0.5  # --dict-options wins over --k's default
    assert main(args + ["--out", str(tmp_path / "b"), "--dict-options", "l1_coef=3"]) == 1
    assert "unknown options for topk: l1_coef" in capsys.readouterr().err


def test_transcoder_from_two_sites_of_a_store(tmp_path, tiny_model_dirs, text_file):
    model = str(tiny_model_dirs["llama"])
    assert main(["harvest", "--model", model, "--text", str(text_file), "--split", "all", "--sites", "mlp_in.1,mlp_out.1",
                 "--tokens", "1200", "--ctx-len", "24", "--out", str(tmp_path / "store"), "--progress", "false"]) == 0
    assert main(["train", "--activations", str(tmp_path / "store"), "--site", "mlp_in.1", "--target-site", "mlp_out.1",
                 "--out", str(tmp_path / "t"), "--n-latents", "64", "--k", "8", "--steps", "200", "--batch-size", "128", "--lr", "3e-3",
                 "--progress", "false"]) == 0
    config = json.loads((tmp_path / "t" / "dictionary" / "config.json").read_text())["config"]
    assert config["d_in"] == 32 and config["d_out"] == 32
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["fvu"] < 1.0  # measured against the MLP output, not the input


@pytest.mark.parametrize("method", methods())
def test_train_accepts_every_registered_method(method, tmp_path):
    from conca.dictionaries import load_dictionary

    npy = _matrix(tmp_path / "x.npy", n=2000, d=12)
    assert main(["train", "--method", method, "--activations", str(npy), "--out", str(tmp_path / "run"), "--n-latents", "48",
                 "--k", "4", "--steps", "20", "--batch-size", "200", "--progress", "false", "--eval-every", "10"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["tokens_per_s"] > 0 and np.isfinite(metrics["fvu"])
    assert load_dictionary(tmp_path / "run" / "dictionary").name == method


def test_methods_command_lists_the_whole_registry(capsys):
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == methods() and len(listed) >= 22  # every method module of conca.dictionaries registers


def test_export_and_import_saelens_from_the_command_line(tmp_path, capsys):
    import torch

    from conca.dictionaries import create, load_dictionary

    torch.manual_seed(0)
    sae = create("topk", d_in=8, n_latents=32, k=3)
    sae.save(tmp_path / "d")
    assert main(["export", "--dictionary", str(tmp_path / "d"), "--out", str(tmp_path / "sl"),
                 "--hook-name", "blocks.1.hook_resid_post"]) == 0
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3
    assert capsys.readouterr().out == f"wrote {tmp_path / 'sl'}\n"
    assert main(["import", "--path", str(tmp_path / "sl"), "--out", str(tmp_path / "back")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'back'}\n"
    x = torch.randn(10, 8)
    assert torch.equal(load_dictionary(tmp_path / "back").encode(x), sae.encode(x))


# --- the command table, light options, list-valued options -----------------------------------------------


def test_help_needs_neither_torch_nor_transformers():
    # The parser is built from light options modules and a command's module is imported only when it
    # runs, so `conca --help` and `conca CMD --help` answer without loading torch (seconds).
    script = ("import sys\nfrom conca.cli import main\n"
              "for argv in (['--help'], ['train', '--help'], ['reproduce', 'concepts', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: conca train" in done.stdout and "usage: conca reproduce concepts" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_every_command_of_the_table_is_in_the_parser_and_resolves():
    from conca.cli import COMMANDS, _parser

    parser = _parser()
    for command in COMMANDS:
        sub = parser
        for word in command.name.split():
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
        assert sub.get_default("_command") is command
        assert callable(command.result)
        if command.options is None:
            continue
        light, runner = command.options_class(), command.runner_options_class()
        assert sub.get_default("_options") is light
        assert issubclass(runner, light)  # the same fields, hence the same flags, as what the runner takes
        assert [f.name for f in dataclasses.fields(runner)] == [f.name for f in dataclasses.fields(light)]


def test_light_copies_of_choices_match_their_torch_homes():
    from conca.activations import store
    from conca.dictionaries import align as align_dictionary
    from conca.experiments import lab_options, options
    from conca.interop import saelens, saelens_options
    from conca.interventions import swap

    assert options.STORE_DTYPES == tuple(store.DTYPES)
    assert saelens_options.SAELENS_DTYPES == tuple(saelens.DTYPES)
    assert lab_options.ALIGN_ACTIVATIONS == align_dictionary.ACTIVATIONS
    assert lab_options.ALIGN_LOSS_NAMES == align_dictionary.ALIGN_LOSSES
    assert lab_options.SWAP_METHODS == swap.SWAP_METHODS


def test_every_comma_separated_option_is_marked_as_a_list():
    # A config file may give these as YAML/TOML lists only if they are marked: check the help's word
    # "comma-separated" against the mark, so a new list option cannot be forgotten.
    from conca.cli import COMMANDS

    unmarked = [f"{command.name} --{f.name}" for command in COMMANDS if command.options
                for f in dataclasses.fields(command.options_class())
                if "comma-separate" in f.metadata.get("help", "") and not f.metadata.get("listed")]
    assert not unmarked


def test_config_file_lists_are_the_same_as_comma_strings(tmp_path):
    from conca.experiments.options import HarvestOptions, SteerOptions
    from conca.experiments.lab_options import AlignOptions

    (tmp_path / "c.yaml").write_text("sites: [final, resid.15]\nheldout_fraction: 0.2\n")
    (tmp_path / "c.toml").write_text('sites = ["final", "resid.15"]\n')
    from_flag = build_options(HarvestOptions, {"sites": "final,resid.15"})
    assert from_flag.sites == "final,resid.15"
    assert build_options(HarvestOptions, {"_config": str(tmp_path / "c.yaml")}).sites == from_flag.sites
    assert build_options(HarvestOptions, {"_config": str(tmp_path / "c.toml")}).sites == from_flag.sites
    # Numbers become their text, as on the command line.
    (tmp_path / "n.yaml").write_text("ablate: [3, 7]\nclamp: ['12=5.0', '40=-1']\n")
    steer = build_options(SteerOptions, {"_config": str(tmp_path / "n.yaml")})
    assert (steer.ablate, steer.clamp) == ("3,7", "12=5.0,40=-1")
    align = build_options(AlignOptions, {"alphas": [0.5, 2, 1e-3], "layers": []})
    assert (align.alphas, align.layers) == ("0.5,2,0.001", "")
    # The flag's comma text is unchanged, spaces included (the commands strip each item).
    assert build_options(HarvestOptions, {"sites": "final, resid.1"}).sites == "final, resid.1"


def test_bad_config_lists_are_named(tmp_path, capsys):
    from conca.experiments.options import HarvestOptions

    with pytest.raises(ConfigError, match=r"--sites\[1\] must be text or a number"):
        build_options(HarvestOptions, {"sites": ["final", ["resid.1"]]})
    with pytest.raises(ConfigError, match=r"--sites\[0\] must be text or a number"):
        build_options(HarvestOptions, {"sites": [True]})
    with pytest.raises(ConfigError, match="--model must be text"):  # not a list option: a list is refused
        build_options(HarvestOptions, {"model": ["a", "b"]})
    (tmp_path / "bad.yaml").write_text("sites: [final, {resid: 1}]\n")
    assert main(["harvest", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["conca harvest: error: --sites[1] must be text or a number, got {'resid': 1}"]
    assert not (tmp_path / "s").exists()
