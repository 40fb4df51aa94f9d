"""A dictionary knows where it came from (model, site, store, tokens), commands default to that and
refuse another site or model before loading anything, and a resume refuses other activations."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from conca.activations.provenance import model_digest, same_source, source_fingerprint
from conca.activations.store import ActivationStore, Manifest
from conca.activations.stream import open_source
from conca.cli import main
from conca.dictionaries import create
from conca.dictionaries.provenance import check_model_width, read_recorded, resolve_common_target, resolve_target
from conca.errors import ConfigError, InputError, ShapeError
from conca.experiments.pipeline import EvaluateOptions, resolve_evaluate_options
from conca.interop.hook_names import hook_to_site, site_to_hook

TRAIN = ["--n-latents", "64", "--k", "4", "--steps", "12", "--batch-size", "128", "--progress", "false"]


def _harvest(out, model, text_file, sites="final,resid.1,mlp_in.1,mlp_out.1", ctx_len=24, tokens=1200):
    assert main(["harvest", "--model", str(model), "--text", str(text_file), "--split", "all", "--sites", sites,
                 "--tokens", str(tokens), "--ctx-len", str(ctx_len), "--shard-contexts", "16", "--out", str(out),
                 "--progress", "false"]) == 0
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dirs, text_file):
    return _harvest(tmp_path_factory.mktemp("prov") / "store", tiny_model_dirs["llama"], text_file)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A TopK SAE trained on resid.1 of the tiny llama store."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--activations", str(store), "--site", "resid.1", "--out", str(out), *TRAIN]) == 0
    return out / "dictionary"


def _canonical_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- what is recorded ------------------------------------------------------------------------
def test_train_on_a_store_records_model_site_store_digest_and_tokens(trained, store, tiny_model_dirs):
    meta = json.loads((trained / "config.json").read_text())
    prov = meta["provenance"]
    assert prov["model"] == {"name": str(tiny_model_dirs["llama"].resolve()), "sha256": None}  # a directory: no file digest
    assert prov["site"] == "resid.1" and prov["target_site"] is None
    manifest = json.loads((store / "manifest.json").read_text())
    assert prov["source"]["kind"] == "store" and prov["source"]["path"] == str(store.resolve())
    assert prov["source"]["manifest_sha256"] == _canonical_sha256(manifest)
    assert prov["source"]["complete"] is True and "shard_sha256" not in prov["source"]
    assert prov["tokens_seen"] == 12 * 128
    assert prov["conca_version"] == meta["conca_version"]
    assert meta["input_scale_folded"] > 0 and meta["config"]["d_in"] == 32


def test_train_on_npy_records_its_sha256_and_the_site_given(tmp_path):
    x = np.random.default_rng(0).normal(size=(2000, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["train", "--activations", str(tmp_path / "x.npy"), "--site", "resid.4", "--out", str(tmp_path / "r"),
                 *TRAIN]) == 0
    prov = json.loads((tmp_path / "r" / "dictionary" / "config.json").read_text())["provenance"]
    assert prov["source"] == {"kind": "npy", "path": str((tmp_path / "x.npy").resolve()),
                              "sha256": hashlib.sha256((tmp_path / "x.npy").read_bytes()).hexdigest()}
    assert prov["site"] == "resid.4" and prov["model"] is None  # a .npy knows no model


def test_transcoder_records_its_target_site_and_evaluate_measures_against_it(store, tmp_path, tiny_model_dirs,
                                                                             text_file):
    assert main(["train", "--activations", str(store), "--site", "mlp_in.1", "--target-site", "mlp_out.1",
                 "--out", str(tmp_path / "tc"), *TRAIN]) == 0
    recorded = read_recorded(tmp_path / "tc" / "dictionary")
    assert (recorded.site, recorded.target_site) == ("mlp_in.1", "mlp_out.1")
    assert main(["evaluate", "--dictionary", str(tmp_path / "tc" / "dictionary"), "--text", str(text_file),
                 "--split", "all", "--tokens", "200", "--ctx-len", "24", "--out", str(tmp_path / "e")]) == 0
    written = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert (written["site"], written["target_site"]) == ("mlp_in.1", "mlp_out.1")
    assert written["model"] == str(tiny_model_dirs["llama"].resolve())
    assert "ce_loss_recovered" not in written["metrics"]  # a transcoder is not spliced in


def test_harvest_records_a_single_file_models_sha256(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really a model, but a file")
    assert model_digest(str(gguf)) == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert model_digest(str(tmp_path)) is None and model_digest("org/some-hub-id") is None
    old = Manifest(model="m", sites=["final"], d_model=4, dtype="fp32", ctx_len=8, n_contexts_planned=1).to_json()
    del old["model_digest"]  # a manifest written before the field existed still opens
    assert Manifest.from_json(old).model_digest == ""


# --- commands default to the record ----------------------------------------------------------
def test_evaluate_without_site_or_model_uses_the_recorded_ones(trained, tiny_model_dirs):
    opts = resolve_evaluate_options(EvaluateOptions(dictionary=str(trained)))
    assert (opts.site, opts.model, opts.target_site) == ("resid.1", str(tiny_model_dirs["llama"].resolve()), None)
    same = resolve_evaluate_options(EvaluateOptions(dictionary=str(trained), site="resid.1",
                                                    model=str(tiny_model_dirs["llama"])))
    assert same.site == "resid.1"


def test_evaluate_with_another_site_or_model_fails_before_loading_the_model(trained, tiny_model_dirs, capsys,
                                                                           monkeypatch):
    import conca.experiments.pipeline as pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a mismatch")

    monkeypatch.setattr(pipeline, "load_model", no_loading)
    assert main(["evaluate", "--dictionary", str(trained), "--site", "final"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("conca evaluate: error: dictionary ")
    assert (f"was trained on site resid.1 of model {tiny_model_dirs['llama'].resolve()}; --site final asks for "
            "another site") in err
    assert main(["evaluate", "--dictionary", str(trained), "--model", str(tiny_model_dirs["gpt2"])]) == 1
    err = capsys.readouterr().err
    assert f"--model {tiny_model_dirs['gpt2']} is another model" in err and "Traceback" not in err


def test_concepts_and_steer_default_to_the_record_and_refuse_another_site(trained, tmp_path, capsys):
    from conca.experiments.concepts import ConceptsOptions, resolve_concepts_options

    assert resolve_concepts_options(ConceptsOptions(dictionaries=str(trained))).site == "resid.1"
    assert main(["concepts", "--dictionaries", str(trained), "--site", "resid.2", "--out", str(tmp_path / "c")]) == 1
    assert "--site resid.2 asks for another site" in capsys.readouterr().err
    assert main(["steer", "--dictionary", str(trained), "--prompt", "x", "--ablate", "1", "--site", "final"]) == 1
    assert "was trained on site resid.1" in capsys.readouterr().err
    other = tmp_path / "other"
    create("topk", d_in=32, n_latents=64, k=4).save(other, extra={"provenance": {"site": "final"}})
    with pytest.raises(ConfigError, match="different sites"):
        resolve_common_target([read_recorded(trained), read_recorded(other)])


def test_dictionaries_without_a_record_fall_back_to_final_and_smollm2(tmp_path):
    create("topk", d_in=8, n_latents=16, k=2).save(tmp_path / "plain")
    target = resolve_target(read_recorded(tmp_path / "plain"))
    assert (target.site, target.model) == ("final", "smollm2") and len(target.notes) == 2
    create("topk", d_in=8, n_latents=16, k=2).save(tmp_path / "align_style", extra={"site": "resid.2"})
    assert resolve_target(read_recorded(tmp_path / "align_style")).site == "resid.2"  # a bare "site" is honoured


def test_model_checks_by_path_digest_and_width(tmp_path):
    model = tmp_path / "a" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    create("topk", d_in=8, n_latents=16, k=2).save(tmp_path / "d", extra={"provenance": {
        "site": "resid.0", "model": {"name": str(model), "sha256": model_digest(str(model))}}})
    recorded = read_recorded(tmp_path / "d")
    copy = tmp_path / "b" / "copy.gguf"
    copy.parent.mkdir()
    shutil.copy(model, copy)
    assert resolve_target(recorded, model=str(copy)).model == str(copy)  # same bytes elsewhere: same model
    (tmp_path / "b" / "other.gguf").write_bytes(b"other weights")
    with pytest.raises(ConfigError, match="other.gguf is another model"):
        resolve_target(recorded, model=str(tmp_path / "b" / "other.gguf"))
    model.unlink()
    with pytest.raises(InputError, match="not on this machine: give --model"):
        resolve_target(recorded)
    with pytest.raises(ShapeError, match=r"reads width 8 \(site resid.0 of model .*m.gguf\), but model big has width 16"):
        check_model_width(recorded, 16, "big")


# --- resume checks its inputs ----------------------------------------------------------------
def test_resume_with_another_store_is_refused_naming_both(store, tmp_path, tiny_model_dirs, text_file, capsys):
    other = _harvest(tmp_path / "other", tiny_model_dirs["llama"], text_file, ctx_len=20)
    run = ["train", "--site", "resid.1", "--out", str(tmp_path / "run"), *TRAIN]
    assert main(run + ["--activations", str(store)]) == 0
    capsys.readouterr()
    checkpoint_before = (tmp_path / "run" / "checkpoint.json").read_bytes()
    assert main(run + ["--activations", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("conca train: error: ") and str(store.resolve()) in err and str(other.resolve()) in err
    assert (tmp_path / "run" / "checkpoint.json").read_bytes() == checkpoint_before  # nothing was trained on it
    assert main(run[:2] + ["mlp_out.1"] + run[3:] + ["--activations", str(store)]) == 1  # same store, other site
    assert "[resid.1]" in capsys.readouterr().err
    shutil.copytree(store, tmp_path / "moved")  # the same data elsewhere is the same source
    assert main(run + ["--activations", str(tmp_path / "moved")]) == 0


def test_a_store_still_being_harvested_stays_the_same_source_as_it_grows(tmp_path, tiny_model_dirs, text_file):
    path = _harvest(tmp_path / "growing", tiny_model_dirs["llama"], text_file, sites="final", tokens=300)
    early = source_fingerprint(open_source(path))
    _harvest(path, tiny_model_dirs["llama"], text_file, sites="final", tokens=1200)  # the harvest continues
    later = source_fingerprint(open_source(path))
    assert len(later["shard_sha256"]) > len(early["shard_sha256"]) and later["manifest_sha256"] != early["manifest_sha256"]
    assert same_source(early, later)
    tampered = {**later, "shard_sha256": ["0" * 64, *later["shard_sha256"][1:]]}
    assert not same_source(early, tampered)
    store = ActivationStore.open(path)
    assert not same_source(early, {**later, "identity_sha256": "x"}) and store.manifest.complete


# --- SAELens hook names ----------------------------------------------------------------------
@pytest.mark.parametrize("site,hook", [("resid.3", "blocks.3.hook_resid_post"), ("final", "ln_final.hook_normalized"),
                                       ("mlp_out.0", "blocks.0.hook_mlp_out"), ("attn_out.2", "blocks.2.hook_attn_out"),
                                       ("mlp_in.5", "blocks.5.ln2.hook_normalized")])
def test_sites_and_hook_names_map_both_ways(site, hook):
    assert site_to_hook(site) == hook and hook_to_site(hook) == site


def test_resid_pre_reads_back_as_the_previous_blocks_output_and_unknown_hooks_map_to_nothing():
    assert hook_to_site("blocks.4.hook_resid_pre") == "resid.3"
    assert hook_to_site("blocks.0.hook_resid_pre") is None  # the embeddings: no conca site
    assert hook_to_site("blocks.2.attn.hook_z") is None and hook_to_site("") is None


def test_export_and_import_carry_hook_name_and_model_name(trained, tmp_path, tiny_model_dirs, capsys):
    assert main(["export", "--dictionary", str(trained), "--out", str(tmp_path / "sl")]) == 0
    meta = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    model = str(tiny_model_dirs["llama"].resolve())
    assert (meta["hook_name"], meta["model_name"]) == ("blocks.1.hook_resid_post", model)
    assert main(["import", "--path", str(tmp_path / "sl"), "--out", str(tmp_path / "back")]) == 0
    back = read_recorded(tmp_path / "back")
    assert (back.site, back.model) == ("resid.1", model)
    prov = json.loads((tmp_path / "back" / "config.json").read_text())["provenance"]
    assert prov["saelens"] == {"hook_name": "blocks.1.hook_resid_post", "model_name": model}
    assert prov["tokens_seen"] == 12 * 128  # conca's own record came back whole
    assert main(["export", "--dictionary", str(tmp_path / "back"), "--out", str(tmp_path / "sl2")]) == 0
    assert json.loads((tmp_path / "sl2" / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert main(["export", "--dictionary", str(trained), "--out", str(tmp_path / "x"),
                 "--hook-name", "blocks.2.hook_resid_post"]) == 1
    assert "--hook-name blocks.2.hook_resid_post is site resid.2" in capsys.readouterr().err
    assert main(["export", "--dictionary", str(trained), "--out", str(tmp_path / "own"),
                 "--hook-name", "model.layers.1", "--model-name", "tiny-llama"]) == 0  # the user's own naming
    meta = json.loads((tmp_path / "own" / "cfg.json").read_text())["metadata"]
    assert (meta["hook_name"], meta["model_name"]) == ("model.layers.1", "tiny-llama")


def test_import_of_a_foreign_folder_keeps_unknown_hook_names_verbatim(trained, tmp_path):
    assert main(["export", "--dictionary", str(trained), "--out", str(tmp_path / "sl")]) == 0
    cfg_path = tmp_path / "sl" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"] = {"sae_lens_version": "6.54.12", "hook_name": "blocks.1.attn.hook_z", "model_name": "gpt2-small"}
    cfg_path.write_text(json.dumps(cfg))
    assert main(["import", "--path", str(tmp_path / "sl"), "--out", str(tmp_path / "foreign")]) == 0
    prov = json.loads((tmp_path / "foreign" / "config.json").read_text())["provenance"]
    assert prov["site"] is None and prov["model"] is None  # a TransformerLens name is not a model conca can load
    assert prov["saelens"] == {"hook_name": "blocks.1.attn.hook_z", "model_name": "gpt2-small"}
    cfg["metadata"]["hook_name"] = "blocks.0.hook_mlp_out"
    cfg_path.write_text(json.dumps(cfg))
    assert main(["import", "--path", str(tmp_path / "sl"), "--out", str(tmp_path / "mapped")]) == 0
    assert read_recorded(tmp_path / "mapped").site == "mlp_out.0"


def test_a_dictionary_trained_before_provenance_existed_is_read_from_its_runs_config(trained, tmp_path, tiny_model_dirs):
    run = tmp_path / "old_run"
    shutil.copytree(trained.parent, run)
    meta = json.loads((run / "dictionary" / "config.json").read_text())
    del meta["provenance"]  # as conca wrote it before: only OUT/config.yaml knows the site
    (run / "dictionary" / "config.json").write_text(json.dumps(meta))
    target = resolve_target(read_recorded(run / "dictionary"))
    assert (target.site, target.model, target.notes) == ("resid.1", str(tiny_model_dirs["llama"].resolve()), [])


def test_a_local_model_of_another_width_is_refused_before_loading(tmp_path, tiny_model_dirs):
    create("topk", d_in=8, n_latents=16, k=2).save(tmp_path / "narrow")  # no record: any model may be given
    with pytest.raises(ShapeError, match=f"reads width 8, but model {tiny_model_dirs['gpt2']} has width 32"):
        resolve_target(read_recorded(tmp_path / "narrow"), model=str(tiny_model_dirs["gpt2"]))
