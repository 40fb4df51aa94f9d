"""`conca align` end to end at tiny sizes: outputs, resumption, options that change the run, and the
default-model section on a tiny local model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conca.cli import main
from conca.dictionaries import load_dictionary
from conca.errors import ConfigError
from conca.experiments.align import AlignOptions, fit_alignsae, lm_config, run_align, run_default_model, validate


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "out"
    code = main(["align", "--out", str(out), "--quick", "true", "--default-model", "false", "--two-hop", "false",
                 "--select-fraction", "0.1", "--progress", "false"])
    assert code == 0
    return out


@pytest.mark.slow  # whole `conca align --quick` runs
def test_align_writes_results_and_a_report_beside_the_paper(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    for key in ("slot_accuracy_ood", "diagonal_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    best = results["swap_success"]
    assert set(best) == {"swap_success", "alpha", "layer", "method"} and best["layer"] in ("resid.0", "resid.1")
    bio = results["biographies"]
    assert list(bio["layers"]) == ["resid.0", "resid.1"]  # quick: a 2-block LM, every layer
    for metrics in bio["layers"].values():
        assert set(metrics["swap_success"]) == {"latent_decode", "decoder_column"}
        assert all(set(row) == {"1.0", "10.0"} for row in metrics["swap_success"].values())
        assert {"slot_accuracy_train", "slot_accuracy_id", "slot_accuracy_ood", "diagonal_accuracy", "fragmentation",
                "baseline", "confusion"} <= set(metrics)
        assert len(metrics["fragmentation"]["effective_features"]) == 6
        # The kept checkpoint is named, and it is the best scored step on the selection persons.
        scored = metrics["checkpoint_candidates"]
        assert metrics["checkpoint"]["step"] == max(scored, key=lambda s: (s["diagonal_accuracy"], -s["fvu"]))["step"]
    assert bio["n_swap_trials"] == 4 * 5
    # The headline is the best cell over every layer, method and alpha, and the comparison states it
    # with the right gap to the paper's best.
    cells = [(v, s, m, float(a)) for s, metrics in bio["layers"].items()
             for m, row in metrics["swap_success"].items() for a, v in row.items()]
    top = max(cells)[0]
    assert best["swap_success"] == top and (top, best["layer"], best["method"], best["alpha"]) in cells
    paper_best = results["paper"]["best_swap"]["swap_success"]
    gap = best["swap_success"] - paper_best
    headline = next(line for line in results["comparison"] if line.startswith("Best swap success"))
    assert f"ours {best['swap_success']:.3f} ({best['method']}" in headline
    assert f"AlignSAE's {paper_best:.3f}" in headline
    assert f"{'above' if gap > 0 else 'below'} theirs by {abs(gap):.3f}" in headline
    for metrics in bio["layers"].values():  # the same swaps through the unsupervised SAE's matched features
        assert set(metrics["baseline"]["swap_success"]) == {"latent_decode", "decoder_column"}
        assert all(0.0 <= v <= 1.0 for row in metrics["baseline"]["swap_success"].values() for v in row.values())
    assert bio["best_baseline"]["layer"] in bio["layers"] and bio["best_baseline"]["method"] in ("latent_decode",
                                                                                                  "decoder_column")
    assert any("Swaps through the unsupervised SAE" in line for line in results["comparison"])
    # The ceilings of any edit at the swapped position, one row per studied layer, scored on the swap trials.
    ceilings = bio["swap_ceilings"]
    assert ceilings["n_trials"] == bio["n_swap_trials"] and set(ceilings["layers"]) == {"resid.0", "resid.1"}
    for c in ceilings["layers"].values():
        assert 0 <= c["patch"] <= 1 and c["relation_step_best"] == max(c["relation_step"].values())
        assert c["variance_explained"]["additive"] <= c["variance_explained"]["cell"] + 1e-9
    assert any(line.startswith("Ceilings of the swap") for line in results["comparison"])
    html = (quick_run / "report.html").read_text()
    assert "question&#x27;s last token" in html or "question's last token" in html
    assert "swap_summary.csv" in html and html.count("data:image/png;base64,") == 7  # 2 methods x (AlignSAE, SAE)
    assert (quick_run / "lm" / "training.json").exists() and (quick_run / "config.yaml").exists()
    saved = load_dictionary(quick_run / "layers" / "resid.1" / "alignsae" / "align")
    assert saved.config.concepts[0] == "birth_date"
    assert json.loads((quick_run / "layers" / "resid.1" / "alignsae" / "align" / "config.json").read_text())["site"] == "resid.1"


@pytest.mark.slow  # whole `conca align --quick` runs
def test_rerun_resumes_and_recomputes_only_what_an_option_changed(quick_run):
    layer = quick_run / "layers" / "resid.1"
    lm_mtime = (quick_run / "lm" / "training.json").stat().st_mtime
    metrics_mtime = (layer / "metrics.json").stat().st_mtime
    column_mtime = (layer / "swaps_decoder_column.json").stat().st_mtime
    baseline_column_mtime = (layer / "baseline_swaps_decoder_column.json").stat().st_mtime
    quick = AlignOptions(out=str(quick_run), quick=True, default_model=False, two_hop=False, progress=False,
                         select_fraction=0.1).sized()
    opts = replace(quick, quick=False, layers="1", swap_methods="latent_decode", swap_error_term=True, alphas="1,10,100")
    results = run_align(opts)
    assert list(results["biographies"]["layers"]) == ["resid.1"]
    assert list(results["biographies"]["layers"]["resid.1"]["swap_success"]) == ["latent_decode"]
    assert (quick_run / "lm" / "training.json").stat().st_mtime == lm_mtime
    assert (layer / "metrics.json").stat().st_mtime == metrics_mtime
    assert (layer / "swaps_decoder_column.json").stat().st_mtime == column_mtime
    assert (layer / "baseline_swaps_decoder_column.json").stat().st_mtime == baseline_column_mtime
    stored = json.loads((layer / "swaps_latent_decode.json").read_text())
    assert stored["identity"]["swap"][:2] == ["latent_decode", True] and set(stored["value"]) == {"1.0", "10.0", "100.0"}
    stored = json.loads((layer / "baseline_swaps_latent_decode.json").read_text())
    assert stored["identity"]["swap"][:2] == ["latent_decode", True] and set(stored["value"]) == {"1.0", "10.0", "100.0"}
    without = run_align(replace(opts, baseline_swaps=False))["biographies"]
    assert without["best_baseline"] is None and "swap_success" not in without["layers"]["resid.1"]["baseline"]


@pytest.mark.slow  # whole `conca align --quick` runs
def test_world_and_sampling_options_change_the_run(quick_run, tmp_path):
    results = json.loads((quick_run / "results.json").read_text())
    n = results["biographies"]["n_questions"]
    assert n["train"] + n["select"] + n["id"] == 16 * 6 * 2 and n["ood"] == 16 * 6 * 2
    assert n["train"] + n["select"] == round(0.8 * 16) * 12 and n["select"] == round(0.1 * 13) * 12
    cfg = lm_config(AlignOptions(lm_layers=3, lm_width=48, lm_heads=3, lm_steps=70, lm_batch_size=5, lm_lr=0.01,
                                 lm_target_accuracy=0.5, lm_eval_every=7, seed=4))
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.steps, cfg.batch_size, cfg.lr, cfg.target_accuracy,
            cfg.eval_every, cfg.seed) == (3, 48, 3, 70, 5, 0.01, 0.5, 7, 4)


def test_dictionary_options_reach_the_alignsae(tmp_path):
    opts = AlignOptions(activation="topk", k=5, align_loss="ce", recon_coeff=2.0, sparse_coeff=0.01, align_coeff=3.0,
                        indep_coeff=0.2, ortho_coeff=0.3, value_coeff=0.7, pretrain_fraction=0.5, pretrain_sparsity=True,
                        batch_size=16, lr=0.005, progress=False)
    x = torch.randn(64, 8)
    concepts = torch.arange(64) % 3
    sae, history, _ = fit_alignsae(x, concepts, concepts, ["a", "b", "c"], ["u", "v", "w"], opts, n_free=12, steps=20,
                                out_dir=tmp_path / "run", site="resid.0")
    c = sae.config
    assert (c.n_free, c.activation, c.k, c.align_loss, c.recon_coeff, c.sparse_coeff, c.align_coeff, c.indep_coeff,
            c.ortho_coeff, c.value_coeff, c.pretrain_fraction, c.pretrain_sparsity) == \
        (12, "topk", 5, "ce", 2.0, 0.01, 3.0, 0.2, 0.3, 0.7, 0.5, True)
    meta = json.loads((tmp_path / "run" / "align" / "config.json").read_text())
    assert meta["train_config"]["batch_size"] == 16 and meta["train_config"]["lr"] == 0.005
    assert meta["train_config"]["steps"] == 20 and history[-1]["step"] == 20
    no_heads, _, _ = fit_alignsae(x, concepts, concepts, ["a", "b", "c"], ["u"], replace(opts, value_coeff=0.0), 12, 20,
                               tmp_path / "run2", "resid.0")
    assert no_heads.value_heads is None


def test_bad_options_are_refused_by_name():
    with pytest.raises(ConfigError, match="activation"):
        validate(AlignOptions(activation="softmax"))
    with pytest.raises(ConfigError, match="swap method"):
        validate(AlignOptions(swap_methods="latent_decode,magic"))
    with pytest.raises(ConfigError, match="alphas"):
        validate(AlignOptions(alphas="1,two"))
    with pytest.raises(ConfigError, match="nothing to run"):
        validate(AlignOptions(biographies=False, default_model=False, two_hop=False))
    with pytest.raises(ConfigError, match="exceed the 64 questions"):
        validate(AlignOptions(two_hop_entities=4, two_hop_relations=4, two_hop_train_questions=60,
                              two_hop_test_questions=5, default_model=False))
    with pytest.raises(ConfigError, match="out of range"):
        run_align(AlignOptions(out="/tmp/never_written_align", quick=True, default_model=False, layers="7",
                               progress=False))


def test_default_model_section_on_a_tiny_local_model(tiny_model_dirs, tmp_path):
    ontology = tmp_path / "onto.jsonl"
    rows = [{"prompt": f"{w} number {i}", "concept": c, "answer": f"{c}{i % 3}"}
            for c, w in (("fox", "The quick brown"), ("capital", "Paris is the"), ("step", "A journey of"))
            for i in range(8)]
    ontology.write_text("\n".join(json.dumps(r) for r in rows))
    opts = AlignOptions(out=str(tmp_path), model=str(tiny_model_dirs["llama"]), ontology=str(ontology),
                        model_layers="0,2", heldout_fraction=0.25, model_n_free=10, model_steps=30, model_alphas="2,20",
                        model_new_tokens=3, swap_examples=2, progress=False)
    result = run_default_model(opts, tmp_path, lambda m: None)
    assert list(result["layers"]) == ["resid.0", "resid.2"]
    assert result["n_heldout"] == 3 * 2 and result["n_train"] == 3 * 6
    assert result["concepts"] == ["fox", "capital", "step"]
    for metrics in result["layers"].values():
        assert 0 <= metrics["slot_accuracy_heldout"] <= 1 and len(metrics["confusion"]) == 3
    examples = result["swap_examples"]
    assert len(examples) == 2 * 2 and {e["alpha"] for e in examples} == {2.0, 20.0}
    assert [(e["source"], e["target"]) for e in examples[:2]] == [("fox", "capital"), ("capital", "step")]
    saved = load_dictionary(Path(tmp_path) / "default_model" / result["best_layer"] / "align")
    assert saved.config.n_free == 10


def test_steps_zero_trains_the_released_number_of_epochs():
    from conca.experiments.align.fitting import alignsae_steps
    opts = AlignOptions(batch_size=64)
    assert opts.steps == 0 and opts.epochs == 420 and opts.two_hop_epochs == 200
    assert alignsae_steps(opts, rows=1728, epochs=opts.epochs) == 420 * 1728 // 64  # 27 batches per pass
    assert alignsae_steps(opts, rows=100, epochs=3) == 5  # ceil(300 / 64)
    assert alignsae_steps(opts, rows=10, epochs=3) == 3  # a batch never exceeds the rows: one step per pass
    assert alignsae_steps(replace(opts, steps=77), rows=1728, epochs=420) == 77  # explicit steps win
    with pytest.raises(ConfigError, match="steps must be >= 0"):
        validate(replace(opts, steps=-1))
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        validate(replace(opts, epochs=0))


@pytest.mark.slow  # two quick biography runs of one layer
def test_epochs_set_the_alignsae_training_length(tmp_path):
    quick = AlignOptions(out=str(tmp_path), quick=True, default_model=False, two_hop=False, progress=False).sized()
    assert quick.steps == 0  # --quick sizes the training by epochs too
    opts = replace(quick, quick=False, layers="1", baseline=False, swap_methods="latent_decode", alphas="1")
    for epochs in (2, 5):
        results = run_align(replace(opts, epochs=epochs, out=str(tmp_path / str(epochs))))
        rows = results["biographies"]["n_questions"]["train"]
        meta = json.loads((tmp_path / str(epochs) / "layers" / "resid.1" / "alignsae" / "align" / "config.json").read_text())
        assert meta["train_config"]["steps"] == -(-epochs * rows // min(64, rows))


def test_a_layers_cache_identity_holds_its_resolved_steps_not_the_other_worlds_epochs():
    from conca.experiments.align.fitting import _dictionary_options
    opts = AlignOptions()
    ident = _dictionary_options(opts, steps=1234)
    assert ident["steps"] == 1234 and "epochs" not in ident and "two_hop_epochs" not in ident
    assert _dictionary_options(replace(opts, two_hop_epochs=7), 1234) == ident  # the biography layers stay cached
    assert _dictionary_options(replace(opts, lr=0.01), 1234) != ident
