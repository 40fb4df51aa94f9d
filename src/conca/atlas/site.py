"""The latent atlas as a static site that works from ``file://`` with no network.

``write_atlas(out_dir, index, cards)`` writes::

    index.html  atlas.js  card.js  atlas.css  card.css
    data/index.js            window.CONCA_ATLAS.index({...})      the columnar index of every latent
    data/cards_00000.js      window.CONCA_ATLAS.cards(0, [...])   the cards of latents 0 .. chunk_size-1

The data files are scripts, not JSON: Chromium blocks fetch() of file:// URLs, but a <script src> added
on demand loads fine. The JSON inside them is escaped so that no token text can end the script or the
page's markup (``<``, ``>``, ``&``, U+2028 and U+2029 become ``\\uXXXX``). The page itself puts data into
the DOM only as text. The site is built in a hidden folder inside ``out_dir`` and its entries renamed into place when complete, so a
failed write leaves an existing atlas as it was.

``card_html(card)`` (from :mod:`conca.atlas.static_card`) renders one card as static HTML for notebooks.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from conca.atlas.static_card import card_html
from conca.errors import ConfigError
from conca.fileio import current_umask

__all__ = ["ASSETS", "card_html", "compact_values", "js_json", "write_atlas"]

ASSETS = ("atlas.js", "card.js", "atlas.css", "card.css")
SITE_ENTRIES = ("data", *ASSETS, "index.html")  # what write_atlas replaces in its folder, in this order
INDEX_COLUMNS = ("density", "max", "mean_firing", "concept", "concept_corr", "stability", "fires_on", "promotes",
                 "suppresses", "flags")

_JS_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="atlas.css">
<link rel="stylesheet" href="card.css">
</head>
<body>
<div id="app"><p class="loading">loading the atlas\u2026</p></div>
<noscript><p>The atlas needs JavaScript (it runs locally: nothing is fetched from the network).</p></noscript>
<script src="card.js"></script>
<script src="atlas.js"></script>
<script src="data/index.js"></script>
</body>
</html>
"""


def asset_text(name: str) -> str:
    """The text of one of the site's static files (package data under conca/atlas/assets/)."""
    return resources.files("conca.atlas").joinpath("assets", name).read_text(encoding="utf-8")


def _plain(obj: Any) -> Any:
    """`obj` as plain JSON data: numpy scalars and arrays as numbers and lists, tuples as lists,
    non-finite floats as None (slow path, used only when json.dumps refuses the value as it is)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays, numpy scalars, tensors
        return _plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def js_json(obj: Any) -> str:
    """`obj` as compact strict JSON that is also safe inside a <script> (no ``</script>``, no ``<!--``,
    no raw U+2028/2029): non-finite floats become null, numpy values plain numbers."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        text = json.dumps(_plain(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for raw, escaped in _JS_ESCAPES:
        if raw in text:
            text = text.replace(raw, escaped)
    return text


def compact_values(card: dict, digits: int = 4) -> dict:
    """`card` with its examples' per-token values rounded to `digits` significant digits of the card's
    largest |value| (what a highlight can show): float32 values written in full (0.30000001192092896)
    would make the files about twice as large and slower to write and to load. The card is not changed."""
    lists = [card.get(key) or [] for key in ("top", "bottom")]
    lists += [group.get("examples") or [] for group in card.get("quantiles") or [] if isinstance(group, dict)]
    examples = [ex for exs in lists for ex in exs if isinstance(ex, dict) and isinstance(ex.get("values"), list)]
    if not examples:
        return card
    flat = [v for ex in examples for v in ex["values"]] + [ex.get("value") for ex in examples]
    try:
        arr = np.asarray(flat, dtype=np.float64)
    except (TypeError, ValueError):  # None or text among the values: leave them as they are
        return card
    finite = np.abs(arr[np.isfinite(arr)])
    if not finite.size or finite.max() == 0:
        return card
    rounded = np.round(arr, digits - 1 - int(np.floor(np.log10(finite.max())))).tolist()
    new_examples, at, tail = {}, 0, len(flat) - len(examples)
    for k, ex in enumerate(examples):
        n = len(ex["values"])
        new_examples[id(ex)] = dict(ex, values=rounded[at:at + n], value=rounded[tail + k] if "value" in ex else None)
        if "value" not in ex:
            del new_examples[id(ex)]["value"]
        at += n

    def swap(exs: list) -> list:
        return [new_examples.get(id(ex), ex) for ex in exs]

    out = dict(card)
    for key in ("top", "bottom"):
        if card.get(key):
            out[key] = swap(card[key])
    if card.get("quantiles"):
        out["quantiles"] = [dict(g, examples=swap(g.get("examples") or [])) if isinstance(g, dict) else g
                            for g in card["quantiles"]]
    return out


def _check_index(index: dict) -> int:
    """The number of latents, after checking that every column of the index has that many entries."""
    if not isinstance(index, dict):
        raise TypeError(f"the atlas index must be a dict, not {type(index).__name__}")
    n = index.get("n_latents")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"the atlas index needs n_latents as a non-negative int, got {n!r}")
    for name, values in (index.get("columns") or {}).items():
        if len(values) != n:
            raise ValueError(f"atlas index column {name!r} has {len(values)} entries for {n} latents")
    return n


def _check_target(out: Path) -> None:
    """Refuse a path that is a file, or a folder whose atlas names (index.html, data/) hold something
    other than an atlas: nothing of the user's is ever replaced. Other files there are left alone."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ConfigError(f"atlas output {out} exists and is not a folder")
    ours = [name for name in SITE_ENTRIES if (out / name).exists() or (out / name).is_symlink()]
    if ours and not (out / "data" / "index.js").is_file():
        raise ConfigError(f"atlas output {out} holds {ours[0]} but no atlas (no data/index.js): choose another "
                          "folder or empty it")


def _write_cards(data: Path, cards: Iterable[dict], chunk_size: int, n_latents: int) -> list[int]:
    """Write the cards, which come in increasing latent order, chunk by chunk (one chunk's JSON in memory
    at a time); return the numbers of the chunk files written."""
    written: list[int] = []
    current: int | None = None
    parts: list[str] = []
    last = -1

    def flush() -> None:
        if current is None:
            return
        text = f"window.CONCA_ATLAS.cards({current}, [\n" + ",\n".join(parts) + "\n]);\n"
        (data / f"cards_{current:05d}.js").write_text(text, encoding="utf-8")
        written.append(current)

    for card in cards:
        latent = card.get("latent") if isinstance(card, dict) else None
        if not isinstance(latent, int) or isinstance(latent, bool) or not 0 <= latent < n_latents:
            raise ValueError(f"an atlas card needs 'latent' as an int in [0, {n_latents}), got {latent!r}")
        if latent <= last:
            raise ValueError(f"atlas cards must come in increasing latent order: {latent} after {last}")
        last = latent
        if latent // chunk_size != current:
            flush()
            current, parts = latent // chunk_size, []
        parts.append(js_json(compact_values(card)))
    flush()
    return written


def _swap_into_place(new: Path, out: Path) -> None:
    """Move the finished site in `new` (a folder inside `out`) into `out`, entry by entry: the old
    entries are first moved into a folder of their own and removed only once every new one is in place
    (and put back if a rename fails). data/ moves before index.html, so a reader never finds a page
    without its data. Files of `out` that are not the site's (results.json, a lock) are left alone."""
    old = out / f".atlas-old-{uuid.uuid4().hex[:8]}"
    old.mkdir()
    moved: list[str] = []
    placed: list[str] = []
    try:
        for name in SITE_ENTRIES:
            if (out / name).exists() or (out / name).is_symlink():
                os.rename(out / name, old / name)
                moved.append(name)
            os.rename(new / name, out / name)
            placed.append(name)
    except BaseException:
        for name in placed:
            os.rename(out / name, new / name)
        for name in moved:
            os.rename(old / name, out / name)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)


def write_atlas(out_dir: str | Path, index: dict, cards: Iterable[dict], chunk_size: int = 64) -> Path:
    """Write the atlas site for `index` (the columnar table of every latent, see the module docstring of
    conca.atlas.cards) and `cards` (card dicts in increasing latent order, consumed lazily: a generator
    keeps memory to one chunk of cards) into `out_dir`, replacing an earlier atlas there only once the
    new one is complete (other files in `out_dir` are left alone). Returns `out_dir` as a Path."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    given = Path(out_dir)
    out = Path(os.path.abspath(given))
    n_latents = _check_index(index)
    _check_target(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".atlas-new-"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the atlas from other users
        data = tmp / "data"
        data.mkdir()
        chunks = _write_cards(data, cards, chunk_size, n_latents)
        meta = dict(index, chunk_size=chunk_size, card_chunks=chunks)
        (data / "index.js").write_text(f"window.CONCA_ATLAS.index({js_json(meta)});\n", encoding="utf-8")
        for name in ASSETS:
            (tmp / name).write_text(asset_text(name), encoding="utf-8")
        title = str(index.get("title") or "conca latent atlas")
        (tmp / "index.html").write_text(_PAGE.format(title=html.escape(title)), encoding="utf-8")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return given
