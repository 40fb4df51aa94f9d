"""The atlas site written by conca.atlas.site: its files, chunking, escaping, atomic replacement, and the
static card_html. (The page's behaviour in a real browser: test_atlas_browser.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_atlas_card, fake_atlas_index

from conca.atlas.site import ASSETS, card_html, compact_values, js_json, write_atlas
from conca.errors import ConfigError

SCRIPT_BREAKER = "</script><script>alert(1)</script>"
IMG_ATTACK = "<img src=x onerror=alert(1)>"


def read_call(path: Path, prefix: str):
    """The JSON argument(s) of a data file `prefix(...)`; parsed as JSON, as the browser would parse the JS."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith(prefix) and text.rstrip().endswith(");")
    return json.loads("[" + text[len(prefix):text.rstrip().rindex(")")] + "]")


def build(tmp_path: Path, n: int = 150, chunk_size: int = 64, cards=None) -> Path:
    cards = cards if cards is not None else [fake_atlas_card(i) for i in range(n)]
    return write_atlas(tmp_path / "atlas", fake_atlas_index(n, cards), iter(cards), chunk_size=chunk_size)


def test_write_atlas_writes_the_page_assets_index_and_one_file_per_chunk(tmp_path):
    out = build(tmp_path, n=150, chunk_size=64)
    assert sorted(p.name for p in out.iterdir()) == sorted([*ASSETS, "data", "index.html"])
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "cards_00000.js", "cards_00001.js", "cards_00002.js", "index.js"]
    (index,) = read_call(out / "data" / "index.js", "window.CONCA_ATLAS.index(")
    assert index["n_latents"] == 150 and index["chunk_size"] == 64 and index["card_chunks"] == [0, 1, 2]
    for no, latents in [(0, range(64)), (1, range(64, 128)), (2, range(128, 150))]:
        got_no, cards = read_call(out / "data" / f"cards_{no:05d}.js", "window.CONCA_ATLAS.cards(")
        assert got_no == no and [c["latent"] for c in cards] == list(latents)
    assert cards[-1] == compact_values(fake_atlas_card(149))  # the card round-trips, values rounded for display
    page = (out / "index.html").read_text()
    # Everything is local: no http(s) URL, no fetch(); the data script is loaded by the page itself.
    for name in ["index.html", *ASSETS]:
        text = (out / name).read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), name
        assert "fetch(" not in text, name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text, name
    assert '<script src="data/index.js"></script>' in page and "<title>Fake atlas</title>" in page


def test_cards_are_consumed_lazily_one_chunk_in_memory(tmp_path):
    """The card generator runs ahead of the written chunk files by at most one chunk: memory stays bounded."""
    n, chunk = 200, 32
    data = tmp_path / "atlas"
    seen_files_when_yielding = []

    def cards():
        for i in range(n):
            tmp_dirs = [p for p in data.iterdir() if p.name.startswith(".atlas-new-")] if data.exists() else []
            written = len(list((tmp_dirs[0] / "data").glob("cards_*.js"))) if tmp_dirs else 0
            seen_files_when_yielding.append((i, written))
            yield fake_atlas_card(i)

    write_atlas(data, fake_atlas_index(n), cards(), chunk_size=chunk)
    # card i is asked for once every chunk before the one of card i-1 is on disk (a chunk is written when
    # the first card of the next one arrives)
    assert [written for _, written in seen_files_when_yielding] == [max(0, (i - 1) // chunk) for i in range(n)]


def test_json_in_data_files_cannot_break_out_of_a_script(tmp_path):
    cards = [fake_atlas_card(i) for i in range(3)]
    cards[1]["top"][0]["tokens"][2] = SCRIPT_BREAKER + "\u2028\u2029<!--"
    index = fake_atlas_index(3, cards)
    index["title"] = SCRIPT_BREAKER
    out = write_atlas(tmp_path / "atlas", index, cards)
    for path in (out / "data").iterdir():
        text = path.read_text(encoding="utf-8")
        assert "<" not in text and ">" not in text and "\u2028" not in text and "\u2029" not in text, path.name
    _, parsed = read_call(out / "data" / "cards_00000.js", "window.CONCA_ATLAS.cards(")
    assert parsed[1]["top"][0]["tokens"][2] == SCRIPT_BREAKER + "\u2028\u2029<!--"  # escaped, not altered
    page = (out / "index.html").read_text()
    assert SCRIPT_BREAKER not in page and "&lt;/script&gt;" in page


def test_js_json_is_strict_and_takes_numpy_values():
    text = js_json({"a": float("nan"), "b": [np.float32(1.5), np.int64(3)], "c": np.arange(2), "d": float("inf")})
    assert json.loads(text) == {"a": None, "b": [1.5, 3], "c": [0, 1], "d": None}


def test_compact_values_rounds_example_values_to_4_digits_of_the_card_max_and_leaves_the_card_alone():
    card = fake_atlas_card(42, signed=True)
    card["top"][0]["values"][1] = float(np.float32(0.3))  # 0.30000001192092896
    original = json.loads(json.dumps(card))
    out = compact_values(card)
    assert card == original  # not changed in place
    assert out["top"][0]["values"][1] == 0.3
    scale = max(abs(v) for ex in card["top"] + card["bottom"] for v in ex["values"])
    for key in ("top", "bottom"):
        for got, want in zip(out[key], card[key]):
            assert got["tokens"] == want["tokens"] and got["target"] == want["target"]
            assert np.allclose(got["values"], want["values"], rtol=0, atol=scale * 1e-3)
            assert got["value"] == pytest.approx(want["value"], abs=scale * 1e-3)
    assert [g["range"] for g in out["quantiles"]] == [g["range"] for g in card["quantiles"]]
    dead = fake_atlas_card(5)
    assert compact_values(dead) is dead  # no examples: nothing to round


def test_a_failing_card_source_leaves_the_old_atlas_untouched(tmp_path):
    out = build(tmp_path, n=100)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def failing():
        for i in range(100):
            if i == 70:  # after a whole chunk has been written to the new folder
                raise RuntimeError("card source failed")
            yield fake_atlas_card(i)

    with pytest.raises(RuntimeError, match="card source failed"):
        write_atlas(out, fake_atlas_index(100), failing(), chunk_size=64)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_a_complete_new_atlas_replaces_the_old_one(tmp_path):
    build(tmp_path, n=100)
    out = build(tmp_path, n=10)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["cards_00000.js", "index.js"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the old entries are gone


def test_a_folder_that_is_not_an_atlas_is_never_replaced(tmp_path):
    (tmp_path / "atlas").mkdir()
    page = tmp_path / "atlas" / "index.html"
    page.write_text("my page")
    with pytest.raises(ConfigError, match="but no atlas"):
        build(tmp_path, n=5)
    assert page.read_text() == "my page"
    assert sorted(p.name for p in (tmp_path / "atlas").iterdir()) == ["index.html"]


def test_other_files_in_the_folder_are_left_alone(tmp_path):
    """`conca inspect --out DIR` holds DIR's lock file and writes results.json beside the site."""
    (tmp_path / "atlas").mkdir()
    keep = tmp_path / "atlas" / "notes.txt"
    keep.write_text("mine")
    build(tmp_path, n=5)
    build(tmp_path, n=5)
    assert keep.read_text() == "mine"
    assert (tmp_path / "atlas" / "index.html").is_file()


@pytest.mark.parametrize("cards, message", [
    ([fake_atlas_card(1), fake_atlas_card(0)], "increasing latent order"),
    ([fake_atlas_card(7)], r"in \[0, 5\)"),
    ([{"latent": "1"}], "'latent' as an int"),
])
def test_cards_out_of_order_or_range_are_refused(tmp_path, cards, message):
    with pytest.raises(ValueError, match=message):
        write_atlas(tmp_path / "atlas", fake_atlas_index(5), cards)
    assert not (tmp_path / "atlas").exists()


def test_an_index_column_of_the_wrong_length_is_refused(tmp_path):
    index = fake_atlas_index(5)
    index["columns"]["density"] = [0.1] * 4
    with pytest.raises(ValueError, match="'density' has 4 entries for 5 latents"):
        write_atlas(tmp_path / "atlas", index, [])


def test_cards_may_skip_latents_and_only_their_chunks_are_written(tmp_path):
    cards = [fake_atlas_card(i) for i in (3, 130)]
    out = write_atlas(tmp_path / "atlas", fake_atlas_index(200), cards, chunk_size=64)
    (index,) = read_call(out / "data" / "index.js", "window.CONCA_ATLAS.index(")
    assert index["card_chunks"] == [0, 2]
    assert sorted(p.name for p in (out / "data").glob("cards_*")) == ["cards_00000.js", "cards_00002.js"]


def test_card_html_renders_one_card_statically_and_escapes_every_token():
    card = fake_atlas_card(4, signed=True)
    card["top"][0]["tokens"][1] = IMG_ATTACK
    card["vocab"]["top"][0][0] = SCRIPT_BREAKER
    card["concept"] = {"name": "<b>x</b>", "correlation": 0.5}
    out = card_html(card)
    assert out.startswith('<div class="conca-card"><style>') and out.endswith("</div>")
    assert "<script" not in out and "<img" not in out and "<b>x</b>" not in out
    assert "&lt;img·src=x·onerror=alert(1)&gt;" in out.replace('<span class="ws">\u00b7</span>', "·")
    assert "&lt;/script&gt;" in out and "&lt;b&gt;x&lt;/b&gt;" in out
    # the sections of a card: top and most negative examples, quantiles, histogram, vocabulary, intervention
    for text in ["Latent 4", "5 of 1,000 tokens", "Top activations", "Most negative activations", "Activation quantiles", "<svg",
                 "Vocabulary projection", "exact at final", "clamped at 10", "Once upon a time", "0.5%"]:
        assert text in out, text
    # the example's own token is outlined, and values show on hover
    assert out.count("cc-tok cc-target") == len(card["top"]) + len(card["bottom"]) + 3
    assert 'title="&quot;' in out
    # a negative value is shaded in the other colour
    assert "rgba(40, 110, 255" in out and "rgba(255, 140, 0" in out


def test_card_html_of_a_dead_card_says_what_is_missing():
    out = card_html(fake_atlas_card(5))  # dead, odd: no examples, no histogram, no describe
    assert "badge-dead" in out and "no examples" in out and "no activation values to show" in out
    assert "intervention description not computed" in out and "stability not computed" in out
    assert "Most negative" not in out  # unsigned
