"""`conca inspect`: the atlas of a trained dictionary from a store or from held-out text, each option's
effect on it, and every bad input refused in one line before anything is written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conca.activations.store import ActivationStore, Manifest
from conca.cli import main
from conca.dictionaries import create
from conca.experiments.inspect import InspectOptions, run_inspect
from conca.experiments.pipeline import HarvestOptions, TrainOptions, run_harvest, run_train
from conftest import SAMPLE_TEXT

CTX_LEN = 16


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    """Twenty documents: enough for a held-out part."""
    path = tmp_path_factory.mktemp("docs") / "docs.txt"
    path.write_text("\n\n".join(f"Document {i}. " + SAMPLE_TEXT * 3 for i in range(20)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, docs) -> Path:
    """A store of the tiny llama (format 2) and two TopK SAEs trained on it with different seeds."""
    root = tmp_path_factory.mktemp("inspect")
    text_file = docs
    run_harvest(HarvestOptions(out=str(root / "store"), text=str(text_file), sites="final,resid.1", tokens=600,
                               ctx_len=CTX_LEN, shard_contexts=8, device="cpu", progress=False), loaded=tiny)
    for seed in (0, 1):
        run_train(TrainOptions(activations=str(root / "store"), out=str(root / f"train{seed}"), site="final",
                               method="topk", expansion=2, k=4, steps=30, batch_size=64, seed=seed, progress=False),
                  name="topk")
    return root


def options(root: Path, out: Path, **changes) -> InspectOptions:
    return replace(InspectOptions(dictionary=str(root / "train0" / "topk"), activations=str(root / "store"),
                                  out=str(out), describe=2, describe_tokens=3, progress=False), **changes)


def read_data(path: Path):
    """The JSON inside one of the atlas' data scripts (window.CONCA_ATLAS.x(...);)."""
    text = path.read_text(encoding="utf-8")
    body = text[text.index("(") + 1:text.rindex(")")]
    if path.name.startswith("cards_"):
        body = body[body.index(",") + 1:]
    return json.loads(body)


def read_atlas(out: Path) -> tuple[dict, list[dict]]:
    index = read_data(out / "data" / "index.js")
    cards = [card for file in sorted((out / "data").glob("cards_*.js")) for card in read_data(file)]
    return index, cards


def test_atlas_of_a_store_has_a_card_per_latent_built_from_the_stored_tokens(trained, tiny, tmp_path):
    out = tmp_path / "atlas"
    summary = run_inspect(options(trained, out), loaded=tiny, log=lambda m: None)
    index, cards = read_atlas(out)
    assert (out / "index.html").is_file() and (out / "results.json").is_file()
    assert index["n_latents"] == 64 == summary["n_cards"] == len(cards)
    assert [c["latent"] for c in cards] == list(range(64))
    assert all(len(column) == 64 for column in index["columns"].values())
    store = ActivationStore.open(trained / "store")
    by_place = {}
    for i in range(len(store.manifest.shards)):
        ids, positions = store.read_tokens(i)
        by_place.update({tuple(p): int(t) for p, t in zip(positions.tolist(), ids.tolist())})
    checked = 0
    for card in cards:
        values = [e["value"] for e in card["top"]]
        assert values == sorted(values, reverse=True) and len(values) <= 20
        for example in card["top"]:
            # The highlighted token is the stored token at the example's [context, position].
            token = by_place[(example["context"], example["position"])]
            assert example["tokens"][example["target"]] == tiny.tokenizer.decode([token])
            assert example["values"][example["target"]] == pytest.approx(example["value"], rel=1e-3)
            checked += 1
        assert card["density"] == pytest.approx(card["n_firing"] / index["n_tokens"], rel=1e-3)  # 4 digits kept
    assert checked > 0
    described = [c["latent"] for c in cards if c["describe"]]
    assert len(described) == 2 == len(summary["described"])
    assert all(len(c["describe"]["prompts"]) == 3 for c in cards if c["describe"])
    assert all(c["vocab"]["how"].startswith("exact at final") and len(c["vocab"]["top"]) == 10 for c in cards)


def test_each_option_changes_the_atlas(trained, tiny, tmp_path):
    out = tmp_path / "small"
    run_inspect(options(trained, out, top=3, window=1, quantile_groups=0, describe=0, latents="0-3,7"),
                loaded=tiny, log=lambda m: None)
    index, cards = read_atlas(out)
    assert [c["latent"] for c in cards] == [0, 1, 2, 3, 7]  # --latents
    assert all(len(c["top"]) <= 3 for c in cards) and any(c["top"] for c in cards)  # --top
    assert all(len(e["tokens"]) <= 3 for c in cards for e in c["top"])  # --window 1: one token each side
    assert all(c["quantiles"] == [] for c in cards)  # --quantile-groups 0
    assert all(c["describe"] is None for c in cards)  # --describe 0
    run_inspect(options(trained, out, quantile_groups=2, per_group=1, highlights=1), loaded=tiny, log=lambda m: None)
    index, cards = read_atlas(out)
    assert all(len(c["quantiles"]) <= 2 and all(len(g["examples"]) <= 1 for g in c["quantiles"]) for c in cards)
    assert any(c["quantiles"] for c in cards)
    assert len(index["highlights"]) <= 1


def test_compare_and_concepts_fill_stability_and_the_matched_concept(trained, tiny, tmp_path):
    out = tmp_path / "atlas"
    run_inspect(options(trained, out), loaded=tiny, log=lambda m: None)
    index, _ = read_atlas(out)
    j = next(j for j, flags in enumerate(index["columns"]["flags"]) if not flags)  # neither dead nor dense
    concepts = tmp_path / "concepts" / "results.json"
    concepts.parent.mkdir()
    concepts.write_text(json.dumps({"site": "final", "dictionaries": {"topk": {"per_concept": [
        {"concept": "capital-country", "latent": j, "correlation": 0.71},
        {"concept": "male-female", "latent": -1, "correlation": None}]}}}))
    run_inspect(options(trained, out, compare=str(trained / "train1" / "topk"), concepts=str(concepts.parent)),
                loaded=tiny, log=lambda m: None)
    index, cards = read_atlas(out)
    assert index["columns"]["concept"][j] == "capital-country" and index["columns"]["concept_corr"][j] == 0.71
    assert sum(c is not None for c in index["columns"]["concept"]) == 1
    assert cards[j]["concept"] == {"name": "capital-country", "correlation": 0.71}
    assert index["highlights"][0]["latent"] == j and "concept correlation" in index["highlights"][0]["why"]
    stability = index["columns"]["stability"]
    assert all(0.0 <= s <= 1.0 for s in stability) and cards[0]["stability"]["cosine"] == stability[0]
    # Against itself every latent is perfectly stable.
    run_inspect(options(trained, out, compare=str(trained / "train0" / "topk")), loaded=tiny, log=lambda m: None)
    index, _ = read_atlas(out)
    assert min(index["columns"]["stability"]) == pytest.approx(1.0, abs=1e-4)
    # Several seeds: the best |cos| against each, averaged (itself 1, the other seed's as above).
    one = stability
    run_inspect(options(trained, out, compare=f"{trained / 'train0' / 'topk'},{trained / 'train1' / 'topk'}"),
                loaded=tiny, log=lambda m: None)
    index, _ = read_atlas(out)
    assert index["columns"]["stability"] == pytest.approx([(1.0 + c) / 2 for c in one], abs=2e-4)


def test_atlas_of_held_out_text_runs_the_model(trained, tiny, docs, tmp_path):
    out = tmp_path / "text"
    summary = run_inspect(options(trained, out, activations="", text=str(docs), tokens=200, ctx_len=CTX_LEN),
                          loaded=tiny, log=lambda m: None)
    index, cards = read_atlas(out)
    assert 0 < index["n_tokens"] == summary["n_tokens"] and "held-out tokens" in index["source"]
    assert len(cards) == 64 and any(c["top"] for c in cards)


# --- bad input: one line, exit 1, nothing written ----------------------------------------------------------


def _format1_store(path: Path, model: str, d: int) -> None:
    store = ActivationStore.create_or_resume(path, Manifest(model=model, sites=["final"], d_model=d, dtype="fp32",
                                                            ctx_len=9, n_contexts_planned=1, format_version=1))
    store.append_shard({"final": torch.randn(8, d)}, torch.arange(8), (0, 1))
    store.mark_complete()


def _bad_inputs(root: Path, tmp: Path, other_model: Path) -> dict[str, tuple[list[str], str]]:
    d = str(root / "train0" / "topk")
    narrow = tmp / "narrow"
    create("topk", d_in=5, n_latents=8, k=2).save(narrow, extra={"site": "final"})
    empty = tmp / "empty_store"
    ActivationStore.create_or_resume(empty, Manifest(model=str(root), sites=["final"], d_model=32, dtype="fp32",
                                                     ctx_len=9, n_contexts_planned=0))
    _format1_store(tmp / "old_store", ActivationStore.open(root / "store").manifest.model, 32)
    (tmp / "other_site").mkdir()
    (tmp / "other_site" / "results.json").write_text(json.dumps({"site": "resid.1", "dictionaries": {}}))
    store = str(root / "store")
    return {
        "width": (["--dictionary", str(narrow), "--activations", store], "reads width 5"),
        "another model": (["--dictionary", d, "--activations", store, "--model", str(other_model)], "another model"),
        "no positions": (["--dictionary", d, "--activations", str(tmp / "old_store")], "conca store upgrade"),
        "empty store": (["--dictionary", d, "--activations", str(empty)], "holds no tokens"),
        "latent out of range": (["--dictionary", d, "--activations", store, "--latents", "3,64"],
                                "latent 64 is out of range: the dictionary has 64 latents"),
        "store and text": (["--dictionary", d, "--activations", store, "--text", "pydoc"], "not both"),
        "concepts of another site": (["--dictionary", d, "--activations", store, "--concepts", str(tmp / "other_site")],
                                     "scores site resid.1"),
        "compare of another width": (["--dictionary", d, "--activations", store, "--compare", str(narrow)],
                                     "reads width 5"),
    }


BAD = ["width", "another model", "no positions", "empty store", "latent out of range", "store and text",
       "concepts of another site", "compare of another width"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, tiny_model_dirs, capsys, case):
    args, message = _bad_inputs(trained, tmp_path, tiny_model_dirs["gpt_neox"])[case]
    out = tmp_path / "atlas"
    assert main(["inspect", *args, "--out", str(out), "--progress", "false"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("conca inspect: error: ") and message in err[0], err
    assert not out.exists()


def test_a_transcoder_atlas_names_both_sites_and_projects_its_output_site(trained, tiny, tmp_path):
    run_train(TrainOptions(activations=str(trained / "store"), out=str(tmp_path / "tc"), site="resid.1",
                           target_site="final", method="topk", expansion=2, k=4, steps=10, batch_size=64,
                           progress=False), name="topk")
    out = tmp_path / "atlas"
    summary = run_inspect(options(trained, out, dictionary=str(tmp_path / "tc" / "topk")), loaded=tiny,
                          log=lambda m: None)
    index, cards = read_atlas(out)
    assert index["site"] == "resid.1" and index["out_site"] == "final"
    assert cards[0]["sites"] == {"in": "resid.1", "out": "final"}
    assert cards[0]["vocab"]["how"].startswith("exact at final")  # its decoder writes the output site
    assert summary["described"] == [] and all(c["describe"] is None for c in cards)  # cannot be spliced
