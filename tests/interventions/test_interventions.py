"""Interventions do exactly what they say: splices, latent edits, steering, positions, hook removal."""

from __future__ import annotations

import json

import pytest
import torch

from conca.cli import main
from conca.dictionaries import create
from conca.errors import ConfigError, ShapeError
from conca.interventions.hooks import Ablate, Clamp, LatentEdit, Positions, Scale, Steer, intervene, splice
from conca.models.sites import Site, capture, resolve
from tests.conftest import make_tiny_model

SITE = Site("resid", 1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2(tiny_tokenizer):
    return make_tiny_model("gpt2", tiny_tokenizer, seed=3)


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    d = create("relu_l1", d_in=32, n_latents=64)
    with torch.no_grad():
        d.b_enc.fill_(0.5)  # many latents active on random activations
    return d.eval()


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return tiny_tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids[:, :10]


def _site_output(model, ids, *edits, **kwargs):
    """(clean activation, edited activation) at SITE for one forward."""
    with torch.no_grad(), capture(model, [SITE], stop_early=False) as clean:
        model(ids)
    clean = clean[SITE].clone()
    with torch.no_grad(), intervene(model, SITE, *edits, **kwargs), capture(model, [SITE], stop_early=False) as seen:
        model(ids)
    return clean, seen[SITE]


def _no_hooks(model) -> bool:
    return not model._forward_pre_hooks and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_splice_with_error_term_leaves_logits_unchanged(arch, tiny_tokenizer, ids):
    model = make_tiny_model(arch, tiny_tokenizer, seed=1)
    dictionary = create("topk", d_in=32, n_latents=64, k=4).eval()
    with torch.no_grad():
        clean = model(ids).logits
        with splice(model, SITE, dictionary, error_term=True):
            same = model(ids).logits
        with intervene(model, SITE, Scale([0, 5, 9], 1.0), dictionary=dictionary):  # a latent edit that changes nothing
            scaled = model(ids).logits
        with splice(model, SITE, dictionary, error_term=False):
            spliced = model(ids).logits
    assert torch.equal(clean, same)
    assert torch.allclose(clean, scaled, atol=1e-6)
    assert not torch.allclose(clean, spliced, atol=1e-3)  # an untrained reconstruction changes the model


def test_splice_without_error_term_writes_the_reconstruction(gpt2, sae, ids):
    clean, seen = _site_output(gpt2, ids, dictionary=sae, error_term=False)
    assert torch.allclose(seen, sae.decode(sae.encode(clean)), atol=1e-5)


def test_ablating_a_latent_removes_exactly_its_decoder_contribution(gpt2, sae, ids):
    clean, _ = _site_output(gpt2, ids)
    z = sae.encode(clean)
    j = int((z > 0).sum((0, 1)).argmax())  # a latent active on many tokens
    assert (z[..., j] > 0).any()
    _, seen = _site_output(gpt2, ids, Ablate([j]), dictionary=sae)
    expected = clean - z[..., j:j + 1] * sae.W_dec[j]
    assert torch.allclose(seen, expected, atol=1e-5)


def test_clamp_and_scale_move_a_latent_along_its_decoder_row(gpt2, sae, ids):
    clean, clamped = _site_output(gpt2, ids, Clamp(7, 4.0), dictionary=sae)
    z = sae.encode(clean)[..., 7:8]
    assert torch.allclose(clamped, clean + (4.0 - z) * sae.W_dec[7], atol=1e-5)
    _, scaled = _site_output(gpt2, ids, Scale(7, 3.0), dictionary=sae)
    assert torch.allclose(scaled, clean + 2.0 * z * sae.W_dec[7], atol=1e-5)


def test_latent_edits_apply_in_order(gpt2, sae, ids):
    clean, seen = _site_output(gpt2, ids, Clamp(7, 4.0), Scale(7, 0.5), dictionary=sae)
    z = sae.encode(clean)[..., 7:8]
    assert torch.allclose(seen, clean + (2.0 - z) * sae.W_dec[7], atol=1e-5)


def test_steering_adds_a_direction(gpt2, sae, ids):
    vector = torch.randn(32)
    clean, seen = _site_output(gpt2, ids, Steer(vector, 2.5))
    assert torch.allclose(seen, clean + 2.5 * vector, atol=1e-5)
    _, seen = _site_output(gpt2, ids, Steer(11, -3.0), dictionary=sae)
    assert torch.allclose(seen, clean - 3.0 * sae.W_dec[11], atol=1e-5)
    _, seen = _site_output(gpt2, ids, Steer(vector, 0.5, relative=True))
    step = 0.5 * clean.norm(dim=-1, keepdim=True) / vector.norm()
    assert torch.allclose(seen, clean + step * vector, atol=1e-4)


@pytest.mark.parametrize("spec,chosen", [("last", [9]), ("0,2", [0, 2]), ("-2", [8]), ("3:5", [3, 4]),
                                         ([1, 4], [1, 4]), (slice(8, None), [8, 9]), ("all", list(range(10))),
                                         ("prompt", list(range(10))), ("new", [])])
def test_positions_restrict_the_edit(gpt2, ids, spec, chosen):
    assert ids.shape[1] == 10
    clean, seen = _site_output(gpt2, ids, Steer(torch.ones(32), 1.0), positions=spec)
    changed = (seen != clean).any(-1)[0].nonzero().flatten().tolist()
    assert changed == chosen


def test_a_boolean_mask_selects_positions_per_row(gpt2, ids):
    batch = ids.repeat(2, 1)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3] = mask[1, 6] = True
    clean, seen = _site_output(gpt2, batch, Steer(torch.ones(32), 1.0), positions=mask)
    assert (seen != clean).any(-1).nonzero().tolist() == [[0, 3], [1, 6]]


@pytest.mark.parametrize("spec", ["last", "new", "last,new", "2:4"])
def test_positions_mean_the_same_with_and_without_a_kv_cache(gpt2, ids, spec):
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=2, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = torch.stack(gpt2.generate(ids, **kwargs).logits)
        with intervene(gpt2, SITE, Steer(torch.randn(32, generator=torch.Generator().manual_seed(1)) * 8, 1.0),
                       positions=spec):
            cached = torch.stack(gpt2.generate(ids, use_cache=True, **kwargs).logits)
            uncached = torch.stack(gpt2.generate(ids, use_cache=False, **kwargs).logits)
    assert torch.allclose(cached, uncached, atol=1e-4)
    assert not torch.allclose(cached, plain, atol=1e-3)


def test_last_position_during_generation_edits_only_the_prompt_forward(gpt2, ids):
    calls = []

    class Record(LatentEdit):
        def apply(self, z, rows):
            calls.append(len(z))
            return z

    dictionary = create("topk", d_in=32, n_latents=64, k=4).eval()
    with torch.no_grad(), intervene(gpt2, SITE, Record(), dictionary=dictionary, positions="last"):
        gpt2.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert calls == [1]  # one token (the last of the prompt), in the first forward only
    calls.clear()
    with torch.no_grad(), intervene(gpt2, SITE, Record(), dictionary=dictionary, positions="new"):
        gpt2.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert calls == [1, 1, 1]  # the generated tokens that are fed back (the 4th is never fed)


def test_hooks_are_removed_after_the_block_and_when_generation_raises(gpt2, sae, ids):
    with intervene(gpt2, SITE, Ablate([1]), dictionary=sae):
        assert resolve(gpt2, SITE)[0]._forward_hooks and gpt2._forward_pre_hooks
    assert _no_hooks(gpt2)

    class Boom(LatentEdit):
        def apply(self, z, rows):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), intervene(gpt2, SITE, Boom(), dictionary=sae):
            gpt2.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2)
    assert _no_hooks(gpt2)
    with torch.no_grad():  # and the model still runs cleanly
        gpt2(ids)


def test_bad_edits_are_refused_by_name(gpt2, sae):
    with pytest.raises(ConfigError, match="unknown latent index 64"):
        with intervene(gpt2, SITE, Ablate([3, 64]), dictionary=sae):
            pass
    with pytest.raises(ConfigError, match="needs a dictionary"):
        with intervene(gpt2, SITE, Clamp(3, 1.0)):
            pass
    with pytest.raises(ShapeError, match="width 32"):
        with intervene(gpt2, SITE, Steer(torch.ones(31), 1.0)):
            pass
    with pytest.raises(ShapeError, match="reads width 16"):
        with intervene(gpt2, SITE, dictionary=create("topk", d_in=16, n_latents=32, k=4)):
            pass
    with pytest.raises(ConfigError, match="transcoder"):
        with intervene(gpt2, SITE, dictionary=create("topk", d_in=32, n_latents=32, k=4, d_out=32)):
            pass
    with pytest.raises(ConfigError, match="unknown position"):
        Positions.parse("last,middle")
    with pytest.raises(ConfigError, match="not an edit"):
        with intervene(gpt2, SITE, "ablate 3"):
            pass
    assert _no_hooks(gpt2)


# --- conca steer -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def steer_setup(tiny_model_dirs, tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("steer")
    dictionary = create("relu_l1", d_in=32, n_latents=64)
    dictionary.save(folder / "sae", extra={"site": "resid.1"})
    return tiny_model_dirs["gpt2"], folder


def test_conca_steer_prints_baseline_and_edited_side_by_side(steer_setup, capsys):
    model_dir, folder = steer_setup
    out = folder / "steer.json"
    code = main(["steer", "--model", str(model_dir), "--dictionary", str(folder / "sae"), "--prompt", "The quick brown",
                 "--steer", "5:40.0", "--clamp", "3=20", "--positions", "all", "--max-new-tokens", "6",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "baseline:" in printed and "edited:" in printed and "site:     resid.1" in printed
    result = json.loads(out.read_text())
    assert result["baseline"] != result["edited"]
    assert len(result["edits"]) == 2


def test_conca_steer_options_change_the_edit(steer_setup):
    from conca.experiments.steer import SteerOptions, build_edits, run_steer
    from conca.models.load import load_model

    model_dir, folder = steer_setup
    loaded = load_model(str(model_dir))
    base = dict(model=str(model_dir), dictionary=str(folder / "sae"), prompt="The quick brown", max_new_tokens=6)
    with_error = run_steer(SteerOptions(**base, ablate="0,1,2,3", error_term=True), loaded)
    without_error = run_steer(SteerOptions(**base, ablate="0,1,2,3", error_term=False), loaded)
    assert with_error["baseline"] == without_error["baseline"]
    assert with_error["edited"] != without_error["edited"]
    everywhere = run_steer(SteerOptions(**base, steer="5:60", positions="all"), loaded)
    only_first = run_steer(SteerOptions(**base, steer="5:60", positions="0"), loaded)
    assert everywhere["edited"] != only_first["edited"]
    relative = build_edits(SteerOptions(**base, steer="5:2", relative=True), None)
    assert relative[0].relative and relative[0].alpha == 2.0
    scaled = build_edits(SteerOptions(**base, scale="4=2.5"), None)
    assert isinstance(scaled[0], Scale) and scaled[0].factor == 2.5


def test_conca_steer_bad_input_fails_with_a_message(steer_setup, capsys):
    model_dir, folder = steer_setup
    common = ["steer", "--model", str(model_dir), "--dictionary", str(folder / "sae"), "--prompt", "x"]
    assert main(common + ["--ablate", "999"]) == 1
    assert "unknown latent index 999" in capsys.readouterr().err
    assert main(common + ["--clamp", "3:1"]) == 1
    assert "expected LATENT=NUMBER" in capsys.readouterr().err
    assert main(common) == 1
    assert "no edits given" in capsys.readouterr().err
    assert main(common + ["--concept", "color=3"]) == 1
    assert "needs an AlignSAE" in capsys.readouterr().err


def test_conca_steer_clamps_an_alignsae_concept_by_name(steer_setup, capsys):
    model_dir, folder = steer_setup
    torch.manual_seed(0)
    create("align", d_in=32, n_latents=40, concepts=["a", "b"]).save(folder / "align", extra={"site": "resid.2"})
    common = ["steer", "--model", str(model_dir), "--dictionary", str(folder / "align"), "--prompt", "The quick brown",
              "--max-new-tokens", "5", "--positions", "all"]
    assert main(common + ["--concept", "b=60", "--out", str(folder / "concept.json")]) == 0
    result = json.loads((folder / "concept.json").read_text())
    assert result["site"] == "resid.2" and result["edits"] == ["Clamp([39], 60)"]
    assert result["baseline"] != result["edited"]
    assert main(common + ["--concept", "c=1"]) == 1
    assert "unknown concept 'c'" in capsys.readouterr().err


@pytest.mark.parametrize("keyword", ["past_key_values", "cache", "kv"])
def test_the_sequence_clock_reads_the_cache_whatever_keyword_carries_it(keyword):
    """transformers 5.x renamed past_key_values to cache: the clock must find the cache by what it is."""
    from transformers import DynamicCache

    from conca.interventions.hooks import cached_length

    cache = DynamicCache()
    key = torch.zeros(1, 2, 5, 4)
    cache.update(key, key.clone(), 0)
    assert cached_length((torch.zeros(1, 1, dtype=torch.long),), {keyword: cache}) == 5
    assert cached_length((torch.zeros(1, 1, dtype=torch.long), cache), {}) == 5  # passed positionally
    assert cached_length((), {"cache_position": torch.tensor([7, 8])}) == 7
    legacy = ((key, key),)
    assert cached_length((), {"past_key_values": legacy}) == 5
    assert cached_length((torch.zeros(1, 3, dtype=torch.long),), {}) == 0
