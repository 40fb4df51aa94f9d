"""Token sources (windows, highlight values) and latent cards, on tiny stores written here and
a tiny random model: windows rebuild the right tokens inside their context, highlighted values
are the dictionary's encodings, every needed shard is read once, and cards are plain JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conca.activations.store import ActivationStore, Manifest
from conca.atlas.cards import (
    Card,
    build_cards,
    histogram,
    index_columns,
    latent_card,
    quantile_groups,
    round4,
    top_contexts,
)
from conca.atlas.collect import collect_latent_stats, encode_at
from conca.atlas.sources import ContextsSource, StoreSource
from conca.dictionaries import create
from conca.errors import InputError

SITE = "resid.1"

# --- a store with token positions --------------------------------------------------------------


def write_store(path, acts: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, shard_contexts: list[tuple[int, int]],
                dtype: str = "fp32") -> ActivationStore:
    """A store of the given tokens ([context, position] per token), one shard per context range."""
    manifest = Manifest(model="test", sites=[SITE], d_model=acts.shape[1], dtype=dtype, ctx_len=int(positions[:, 1].max()) + 1,
                        n_contexts_planned=shard_contexts[-1][1])
    store = ActivationStore.create_or_resume(path, manifest)
    for a, b in shard_contexts:
        rows = (positions[:, 0] >= a) & (positions[:, 0] < b)
        store.append_shard({SITE: acts[rows]}, ids[rows], (a, b), positions=positions[rows].to(torch.int32))
    store.mark_complete()
    return ActivationStore.open(path)


def synthetic_tokens(n_contexts=12, ctx_len=10, d=8, seed=0):
    """Flat token arrays as a harvest stores them: position 0 (BOS) and a few others left out."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(n_contexts), torch.arange(ctx_len), indexing="ij"), -1).reshape(-1, 2)
    keep = (grid[:, 1] > 0) & (torch.rand(len(grid), generator=g) > 0.1)
    positions = grid[keep]
    ids = torch.randint(3, 300, (len(positions),), generator=g)
    acts = torch.randn(len(positions), d, generator=g)
    return acts, ids, positions


@pytest.fixture()
def store_data(tmp_path):
    acts, ids, positions = synthetic_tokens()
    store = write_store(tmp_path / "store", acts, ids, positions, [(0, 5), (5, 9), (9, 12)])
    return store, acts, ids, positions


@pytest.fixture()
def dictionary():
    torch.manual_seed(0)
    return create("topk", d_in=8, n_latents=24, k=3)


def count_calls(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def counted(self, i, *args, **kwargs):
        calls.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


# --- sources ---------------------------------------------------------------------------------


def test_store_source_chunks_are_the_shards_in_order_as_float32(tmp_path):
    acts, ids, positions = synthetic_tokens()
    store = write_store(tmp_path / "bf16", acts, ids, positions, [(0, 4), (4, 12)], dtype="bf16")
    chunks = list(StoreSource(store, SITE, chunk_tokens=7).chunks())
    assert all(c.dtype == torch.float32 and len(c) <= 7 for c in chunks)
    assert torch.equal(torch.cat(chunks), acts.to(torch.bfloat16).float())


def test_windows_rebuild_the_right_tokens_and_never_cross_a_context(store_data):
    store, acts, ids, positions = store_data
    source = StoreSource(store, SITE)
    wanted = np.arange(source.n_tokens)
    for e, window in zip(wanted, source.windows(wanted, before=3, after=2)):
        context, position = positions[e].tolist()
        near = ((positions[:, 0] == context) & (positions[:, 1] >= position - 3) & (positions[:, 1] <= position + 2))
        assert window["ids"] == ids[near].tolist()
        assert window["ids"][window["target"]] == int(ids[e])
        assert (window["context"], window["position"]) == (context, position)


def test_windows_read_each_needed_shard_once(store_data, monkeypatch):
    store, *_ = store_data
    calls = count_calls(monkeypatch, ActivationStore, "read_tokens")
    source = StoreSource(store, SITE)
    source.windows([0, 1, 2, 3, source.n_tokens - 1], 2, 2)  # shards 0 and 2 only
    assert sorted(calls) == [0, 2]


def test_out_of_range_token_is_an_input_error(store_data):
    with pytest.raises(InputError, match="out of range"):
        StoreSource(store_data[0], SITE).windows([10_000], 1, 1)


def test_highlight_values_equal_the_dictionary_encoding_of_the_window_tokens(store_data, dictionary, monkeypatch):
    store, acts, ids, positions = store_data
    source = StoreSource(store, SITE)
    calls = count_calls(monkeypatch, ActivationStore, "load_shard")
    windows = source.window_arrays(np.arange(0, source.n_tokens, 5), before=2, after=2)
    latents = np.arange(len(windows.context)) % 24
    values = source.window_values(dictionary, windows, latents)
    z = dictionary.encode(acts).detach().numpy()
    valid = windows.index >= 0
    expected = np.where(valid, z[np.where(valid, windows.index, 0), latents[:, None]], 0)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
    assert sorted(calls) == [0, 1, 2]  # each shard's activations read once


def test_encode_at_gives_each_pair_its_value(store_data, dictionary):
    store, acts, *_ = store_data
    tokens, latents = np.array([5, 0, 5, 40, 3]), np.array([1, 2, 3, 4, 1])
    z = dictionary.encode(acts).detach().numpy()
    np.testing.assert_allclose(encode_at(dictionary, StoreSource(store, SITE), tokens, latents, batch_tokens=2),
                               z[tokens, latents], rtol=1e-5, atol=1e-6)


def test_contexts_source_runs_the_model_on_masked_tokens(tiny, one_thread):
    from conca.models.sites import Site, run_to_sites
    from conca.text.batching import Contexts

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (5, 9), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    mask[2, 4] = False
    source = ContextsSource(tiny, Contexts(ids, mask), SITE, batch_size=2)
    with torch.inference_mode():
        expected = run_to_sites(tiny.model, ids, [Site.parse(SITE)])[Site.parse(SITE)][mask].float()
    assert source.n_tokens == int(mask.sum())
    torch.testing.assert_close(torch.cat(list(source.chunks())), expected, rtol=1e-4, atol=1e-5)
    # Context 2's fourth stored token is at position 5; position 4 is masked out, so its window
    # (positions 4..6) holds positions 5 and 6 only.
    window = source.windows([int(mask[:2].sum()) + 3], before=1, after=1)[0]
    assert (window["context"], window["position"]) == (2, 5)
    assert window["ids"] == [ids[2, 5].item(), ids[2, 6].item()] and window["target"] == 0


# --- cards ------------------------------------------------------------------------------------


@pytest.fixture()
def stats_and_source(store_data, dictionary):
    store, acts, ids, positions = store_data
    source = StoreSource(store, SITE, chunk_tokens=13)
    return collect_latent_stats(dictionary, source, top=5, sample=20), source


def test_round4_keeps_four_significant_digits_and_prints_short():
    values = round4([3.14159265, 123456.7, -0.000123456, 0.0, float("nan"), 2.3149999])
    assert [json.dumps(v) for v in values.tolist()[:4]] == ["3.142", "123500.0", "-0.0001235", "0.0"]
    assert np.isnan(values[4]) and values[5] == 2.315


def test_top_contexts_follow_the_stats(stats_and_source, dictionary, tiny_tokenizer, store_data):
    stats, source = stats_and_source
    ids = store_data[2]
    j = int(np.argmax(stats.fire_count))
    examples = top_contexts(stats, source, j, n=4, before=2, after=2, tokenizer=tiny_tokenizer, dictionary=dictionary)
    assert [e["value"] for e in examples] == round4(stats.top_values[j, :4]).tolist()
    for e, token in zip(examples, stats.top_tokens[j, :4]):
        assert e["tokens"][e["target"]] == tiny_tokenizer.decode([int(ids[token])])
        assert e["values"][e["target"]] == e["value"]


def test_quantile_ranges_are_ordered_and_within_the_firing_range(stats_and_source):
    stats, source = stats_and_source
    for j in range(stats.n_latents):
        groups = quantile_groups(stats, source, j, groups=4, per_group=3)
        if stats.fire_count[j] == 0:
            assert groups == []
            continue
        firing = stats.sample_values[j][stats.sample_tokens[j] >= 0]
        lows = [g["range"][0] for g in groups]
        assert lows == sorted(lows, reverse=True)  # highest group first
        for g in groups:
            lo, hi = g["range"]
            assert round4(firing.min()) <= lo <= hi <= round4(stats.max[j])
            assert 1 <= len(g["examples"]) <= 3
            assert all(lo - 1e-3 <= e["value"] <= hi + 1e-3 for e in g["examples"])


def test_histogram_counts_the_sample_and_says_so(stats_and_source):
    stats, _ = stats_and_source
    j = int(np.argmax(stats.fire_count))
    hist = histogram(stats, j, bins=50)
    assert len(hist["edges"]) == 51 and sum(hist["counts"]) == min(20, stats.fire_count[j])
    assert "50 bins" in hist["note"] and "sample" in hist["note"]


def test_cards_are_json_and_read_the_source_once(stats_and_source, dictionary, tiny_tokenizer, monkeypatch):
    stats, source = stats_and_source
    loads = count_calls(monkeypatch, ActivationStore, "load_shard")
    token_reads = count_calls(monkeypatch, ActivationStore, "read_tokens")
    cards = list(build_cards(stats, source, tiny_tokenizer, dictionary, top=5, groups=3, per_group=2,
                             stability={"cosine": np.linspace(0, 1, 24), "partner": np.arange(24), "compare": "b"}))
    assert len(cards) == stats.n_latents and all(isinstance(c, Card) for c in cards)
    assert sorted(loads) == [0, 1, 2] and sorted(token_reads) == [0, 1, 2]
    text = json.dumps(cards, allow_nan=False)
    assert json.loads(text)[3]["stability"] == {"cosine": round4(3 / 23).item(), "partner": 3, "compare": "b"}
    dead = [c for c in cards if c["n_firing"] == 0]
    for card in dead:
        assert card["flags"] == ["dead"] and card["max"] is None and card["top"] == []


def test_latent_card_matches_build_cards(stats_and_source, dictionary, tiny_tokenizer):
    stats, source = stats_and_source
    j = int(np.argmax(stats.fire_count))
    card = latent_card(j, stats, source, tiny_tokenizer, dictionary, concept={j: {"concept": "x-y", "correlation": 0.612345}})
    assert card == next(build_cards(stats, source, tiny_tokenizer, dictionary, latents=[j],
                                    concept={j: {"concept": "x-y", "correlation": 0.612345}}))
    assert card["concept"] == {"name": "x-y", "correlation": 0.6123}
    assert card["sites"] == {"in": SITE, "out": None} and card["bottom"] == [] and not card["signed"]
    assert card["n_firing"] == stats.fire_count[j] and len(card["top"]) == min(5, stats.fire_count[j])


def test_signed_cards_show_the_most_negative_examples(store_data):
    store, acts, *_ = store_data
    torch.manual_seed(0)
    signed = create("conca", d_in=8, n_latents=6)  # dense codes of both signs
    source = StoreSource(store, SITE)
    stats = collect_latent_stats(signed, source, top=3, sample=10, signed=True)
    card = latent_card(0, stats, source, None, signed, groups=2, per_group=2)
    z = signed.eval().encode(acts).detach().numpy()[:, 0]
    assert card["signed"] and len(card["bottom"]) == 3
    assert [e["value"] for e in card["bottom"]] == round4(np.sort(z[z < 0])[:3]).tolist()
    assert all(e["values"][e["target"]] == e["value"] for e in card["bottom"] + card["top"])
    assert isinstance(card["top"][0]["tokens"][0], int)  # no tokenizer: token ids
    json.dumps(card, allow_nan=False)


def test_index_columns_give_the_most_frequent_top_targets_and_flags(stats_and_source, store_data, tiny_tokenizer):
    stats, source = stats_and_source
    ids = store_data[2].numpy()
    columns = index_columns(stats, source, tiny_tokenizer, fires_on=2)
    assert len(columns["density"]) == stats.n_latents == len(columns["fires_on"])
    for j in range(stats.n_latents):
        targets = ids[stats.top_tokens[j][stats.top_tokens[j] >= 0]].tolist()
        # most frequent first, ties to the one seen first (the higher example)
        ranked = sorted(set(targets), key=lambda t: (-targets.count(t), targets.index(t)))[:2]
        assert columns["fires_on"][j] == [tiny_tokenizer.decode([t]) for t in ranked]
        want = ["dead"] if not targets else (["dense"] if stats.fire_count[j] / stats.n_tokens > 0.1 else [])
        assert columns["flags"][j] == want
    json.dumps(columns, allow_nan=False)


def test_card_to_html_uses_the_site_renderer(stats_and_source):
    pytest.importorskip("conca.atlas.site")
    stats, source = stats_and_source
    html = latent_card(0, stats, source).to_html()
    assert "<" in html
