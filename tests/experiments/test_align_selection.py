"""Best-slot-accuracy checkpoint selection of AlignSAE training (conca.experiments.align.selection)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conca.dictionaries import load_dictionary
from conca.experiments.align import AlignOptions, fit_alignsae
from conca.experiments.align.selection import _better, selection_score

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = AlignOptions(batch_size=16, lr=0.01, pretrain_fraction=0.25, value_coeff=0.0, progress=False)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated clusters in 8 dimensions: a slot can bind each."""
    g = torch.Generator().manual_seed(seed)
    concepts = torch.arange(n) % 3
    centres = torch.eye(8)[:3] * 4.0
    return centres[concepts] + 0.3 * torch.randn(n, 8, generator=g), concepts


def test_the_kept_weights_are_the_best_scored_step_not_the_last(tmp_path):
    x, c = _blobs(96, 0)
    sel_x, sel_c = _blobs(30, 1)
    # Selection labels that contradict the training labels: the more the slots learn, the worse they
    # score, so the best step is an early one and keeping the last would be visibly wrong.
    wrong = (sel_c + 1) % 3
    sae, _, choice = fit_alignsae(x, c, c, ["a", "b", "c"], [], OPTS, n_free=6, steps=80, out_dir=tmp_path / "run",
                                  site="resid.0", select=(sel_x, wrong))
    scored = choice["candidates"]
    assert len(scored) >= 3 and all(s["step"] > 0.25 * 80 for s in scored)  # stage 2 only
    best = max(scored, key=lambda s: (s["diagonal_accuracy"], -s["fvu"]))
    assert choice["step"] == best["step"] and choice["step"] != scored[-1]["step"]
    assert choice["last"] == scored[-1]
    # The returned (scale-folded) weights reproduce the chosen step's score on the raw rows ...
    assert selection_score(sae, sel_x, wrong)["diagonal_accuracy"] == pytest.approx(best["diagonal_accuracy"])
    # ... and so do the saved ones, whose metadata names the step.
    saved = load_dictionary(tmp_path / "run" / "align")
    assert selection_score(saved, sel_x, wrong)["diagonal_accuracy"] == pytest.approx(best["diagonal_accuracy"])
    meta = json.loads((tmp_path / "run" / "align" / "config.json").read_text())
    assert meta["checkpoint_selection"]["step"] == choice["step"]


def test_without_selection_rows_the_last_step_is_kept(tmp_path):
    x, c = _blobs(96, 0)
    _, history, choice = fit_alignsae(x, c, c, ["a", "b", "c"], [], OPTS, 6, 40, tmp_path / "run", "resid.0")
    assert choice is None and history[-1]["step"] == 40
    _, _, empty = fit_alignsae(x, c, c, ["a", "b", "c"], [], OPTS, 6, 40, tmp_path / "run2", "resid.0",
                               select=(x[:0], c[:0]))
    assert empty is None


def test_a_finished_run_rerun_in_place_keeps_the_same_choice(tmp_path):
    x, c = _blobs(96, 0)
    sel_x, sel_c = _blobs(30, 1)
    args = (x, c, c, ["a", "b", "c"], [], OPTS, 6, 60, tmp_path / "run", "resid.0")
    first, _, choice = fit_alignsae(*args, select=(sel_x, (sel_c + 1) % 3))
    again, _, choice_again = fit_alignsae(*args, select=(sel_x, (sel_c + 1) % 3))
    assert choice_again["step"] == choice["step"] and choice_again["candidates"] == choice["candidates"]
    assert torch.allclose(first.W_enc, again.W_enc)


def test_ties_go_to_the_lower_fvu():
    old = {"diagonal_accuracy": 1.0, "fvu": 0.2}
    assert _better({"diagonal_accuracy": 1.0, "fvu": 0.1}, old)
    assert not _better({"diagonal_accuracy": 1.0, "fvu": 0.3}, old)
    assert not _better({"diagonal_accuracy": 0.9, "fvu": 0.0}, old)
    assert _better({"diagonal_accuracy": 0.0, "fvu": 9.0}, None)


def test_select_fraction_is_checked():
    from conca.errors import ConfigError
    from conca.experiments.align import validate

    with pytest.raises(ConfigError, match="select_fraction"):
        validate(replace(AlignOptions(), select_fraction=1.0))


def test_by_default_no_rows_are_held_out_and_the_last_step_is_kept():
    from conca.experiments.align.biographies import _split_questions
    from conca.synthetic.biographies import make_biography_world
    opts = AlignOptions()
    assert opts.select_fraction == 0
    splits = _split_questions(make_biography_world(20, 0), opts)
    assert splits["select"] == [] and splits["train"]
    held = _split_questions(make_biography_world(20, 0), replace(opts, select_fraction=0.2))
    assert held["select"] and len(held["train"]) < len(splits["train"])
