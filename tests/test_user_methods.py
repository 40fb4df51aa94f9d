"""A method is one file: a method written outside conca, named in CONCA_METHODS (or declared as a
`conca.methods` entry point), is listed, trains from the command line, sweeps, meets the contract
suite, and `conca export` says in one line that it has no SAELens counterpart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import test_method_contract as contract
from conca.cli import main
from conca.dictionaries import load_dictionary, methods, registry
from conca.experiments.sweep import SweepOptions, build_family

USER_METHOD = '''
"""The smallest complete method: a ReLU SAE with an L1 penalty, in one file outside conca."""
from dataclasses import dataclass

import torch
from torch import nn

from conca.dictionaries import Dictionary, DictionaryConfig, SparsityGrid, register


@dataclass
class PlainReLUConfig(DictionaryConfig):
    l1_coeff: float = 0.05


@register
class PlainReLU(Dictionary):
    name = "user_plain_relu"
    Config = PlainReLUConfig
    sparsity_grid = SparsityGrid("l1_coeff", (0.5, 2.0), relative=True)
    unit_norm_decoder = True

    def __init__(self, config):
        super().__init__(config)
        rows = torch.randn(config.n_latents, config.out_dim)
        self.W_dec = nn.Parameter(rows / rows.norm(dim=1, keepdim=True))
        self.W_enc = nn.Parameter(torch.randn(config.d_in, config.n_latents) / config.d_in ** 0.5)
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(config.out_dim))

    def encode(self, x):
        self.check_input(x)
        return ((x if self.is_transcoder else x - self.b_dec) @ self.W_enc + self.b_enc).relu()

    def loss_terms(self, x, target=None):
        target = x if target is None else target
        z = self.encode(x)
        return {"recon": (self.decode(z) - target).pow(2).sum(-1).mean(), "l1": self.config.l1_coeff * z.sum(-1).mean()}

    def fold_input_scale(self, scale):
        with __import__("torch").no_grad():
            self.b_enc /= scale
            self.b_dec /= scale
'''
NAME = "user_plain_relu"


@pytest.fixture
def user_method(tmp_path, monkeypatch):
    """The method file in tmp_path, named in CONCA_METHODS; unregistered again afterwards."""
    path = tmp_path / "plain_relu.py"
    path.write_text(USER_METHOD)
    monkeypatch.setenv(registry.ENV_VAR, str(path))
    yield path
    cls = registry.REGISTRY.pop(NAME, None)
    registry._user_loaded.discard(str(path))
    if cls is not None:
        sys.modules.pop(cls.__module__, None)


def _run_methods(env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "conca.cli", "methods"], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_method_in_conca_methods_is_listed_in_a_fresh_process(tmp_path):
    path = tmp_path / "plain_relu.py"
    path.write_text(USER_METHOD)
    done = _run_methods({registry.ENV_VAR: str(path)})
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split()
    assert NAME in listed and "topk" in listed and len(listed) == len(methods()) + 1


def test_a_method_declared_as_an_entry_point_is_listed(tmp_path):
    (tmp_path / "plain_relu_plugin.py").write_text(USER_METHOD)
    dist = tmp_path / "plain_relu_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plain-relu-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[conca.methods]\nplain_relu = plain_relu_plugin\n")
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    done = _run_methods({"PYTHONPATH": pythonpath, registry.ENV_VAR: ""})
    assert done.returncode == 0, done.stderr
    assert NAME in done.stdout.split()


def test_a_user_method_trains_sweeps_and_is_refused_by_export_in_one_line(user_method, tmp_path, capsys):
    assert NAME in methods()
    assert main(["methods"]) == 0 and NAME in capsys.readouterr().out.split()

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", (rng.normal(size=(2000, 4)) @ rng.normal(size=(4, 12))).astype(np.float32))
    assert main(["train", "--method", NAME, "--activations", str(tmp_path / "x.npy"), "--out", str(tmp_path / "run"),
                 "--n-latents", "24", "--steps", "60", "--batch-size", "200", "--lr", "3e-3", "--warmup-steps", "5",
                 "--progress", "false"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == NAME and metrics["fvu"] < 1
    assert load_dictionary(tmp_path / "run" / "dictionary").name == NAME

    family = build_family(SweepOptions(methods=NAME, steps=30), d=12)  # what `conca sweep --methods NAME` trains
    assert list(family) == [f"{NAME}@l1_coeff=0.025", f"{NAME}@l1_coeff=0.1"]
    assert any(name.startswith(NAME) for name in build_family(SweepOptions(methods="all", expansion=8), d=12))

    capsys.readouterr()
    assert main(["export", "--dictionary", str(tmp_path / "run" / "dictionary"), "--out", str(tmp_path / "sl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("conca export: error:") and "no SAELens counterpart" in err[0]
    assert not (tmp_path / "sl").exists()


def test_a_user_method_meets_the_contract(user_method, tmp_path):
    contract.test_encode_and_decode_give_the_declared_shapes_and_dtypes(NAME)
    contract.test_save_and_load_give_identical_encodings(NAME, tmp_path)
    contract.test_a_short_training_lowers_the_reconstruction_loss(NAME)
    contract.test_transcoder_mode_works_where_declared(NAME)
    contract.test_the_unit_norm_decoder_constraint_holds_where_declared(NAME)
    contract.test_saelens_round_trip_where_mapped(NAME, tmp_path)
    contract._TRAINED.pop(NAME, None)


def test_a_bad_conca_methods_entry_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path / "missing.py"))
    assert main(["methods"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CONCA_METHODS" in err[0] and "missing.py" in err[0]
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path / "broken.py"))
    assert main(["methods"]) == 1
    assert "cannot load" in capsys.readouterr().err and Path(tmp_path / "broken.py").exists()
