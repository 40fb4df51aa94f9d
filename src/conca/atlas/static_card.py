"""One latent's card as static HTML (no JavaScript) for notebooks: ``card_html(card)``.

The same look as the atlas site's card (it inlines the site's card.css, whose rules are all scoped under
``.conca-card``); every piece of data is escaped with html.escape. Values show on hover through the
``title`` attribute; quantile groups fold with <details>."""

from __future__ import annotations

import html
import json
import math
from importlib import resources
from typing import Any

__all__ = ["card_html"]

_WS = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}
MISSING = "\u2014"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(value: Any) -> str:
    """A number with 3 significant digits (as the site shows it), or an em dash."""
    v = _num(value)
    if v is None:
        return MISSING
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{float(f'{v:.3g}'):g}"


def pct(value: Any) -> str:
    v = _num(value)
    if v is None:
        return MISSING
    if v == 0:
        return "0%"
    p = v * 100
    return (f"{p:.1e}" if p < 0.01 else f"{float(f'{p:.3g}'):g}") + "%"


def _thousands(value: Any) -> str:
    """An int with thousands separators (1,000), as the site shows counts."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return _esc(value) if value is not None else MISSING


def visible(token: Any) -> str:
    """A token as escaped HTML with its whitespace visible (space as a faint dot, newline as an arrow)."""
    token = str(token)
    if not token:
        return '<span class="ws">\u2205</span>'
    return "".join(f'<span class="ws">{_WS[ch]}</span>' if ch in _WS else _esc(ch) for ch in token)


def _scale(card: dict) -> tuple[float, float]:
    pos = max(_num(card.get("max")) or 0.0, 0.0)
    neg = 0.0
    groups = [card.get("top") or [], card.get("bottom") or []]
    groups += [g.get("examples") or [] for g in card.get("quantiles") or []]
    for examples in groups:
        for ex in examples:
            for v in ex.get("values") or []:
                v = _num(v)
                if v is not None:
                    pos, neg = max(pos, v), max(neg, -v)
    return pos, neg


def _shade(v: float | None, scale: tuple[float, float]) -> str:
    if not v:
        return ""
    ref = scale[0] if v > 0 else scale[1]
    alpha = min(1.0, abs(v) / ref) if ref > 0 else 1.0
    rgb = "255, 140, 0" if v > 0 else "40, 110, 255"
    return f' style="background-color: rgba({rgb}, {alpha:.3f})"'


def _example(ex: dict, scale: tuple[float, float]) -> str:
    values = ex.get("values") or []
    target = ex.get("target")
    toks = []
    for k, token in enumerate(ex.get("tokens") or []):
        v = _num(values[k]) if k < len(values) else None
        cls = "cc-tok cc-target" if k == target else "cc-tok"
        title = f' title="{_esc(json.dumps(str(token), ensure_ascii=False))}: {fmt(v)}"' if v is not None else ""
        toks.append(f'<span class="{cls}"{title}{_shade(v, scale)}>{visible(token)}</span>')
    where = ", ".join(f"{name} {_esc(ex[name])}" for name in ("context", "position") if ex.get(name) is not None)
    return (f'<div class="cc-ex"><span class="cc-val">{fmt(ex.get("value"))}</span>'
            f'<span class="cc-ctx">{"".join(toks)}</span>'
            + (f'<span class="cc-where">{where}</span>' if where else "") + "</div>")


def _examples(examples: list, scale: tuple[float, float]) -> str:
    if not examples:
        return '<p class="cc-muted">no examples</p>'
    return '<div class="cc-examples">' + "".join(_example(ex, scale) for ex in examples) + "</div>"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _section(title: str, cls: str, body: str) -> str:
    return f'<section class="cc-section {cls}"><h3>{_esc(title)}</h3>{body}</section>'


def _histogram(hist: dict | None, density: Any) -> str:
    counts = list((hist or {}).get("counts") or [])
    edges = [_num(e) for e in (hist or {}).get("edges") or []]
    if not counts or len(edges) != len(counts) + 1 or any(e is None for e in edges):
        return '<p class="cc-muted">no activation values to show</p>'
    width, height, left, bottom, top_pad = 420, 150, 40, 26, 18
    lo, hi = edges[0], edges[-1]
    span = hi - lo if hi > lo else 1.0
    top = max(counts) or 1
    w = width - left - 8
    parts = [(f'<svg class="cc-hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
              'aria-label="histogram of activation values">'),
             f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - 8}" y2="{height - bottom}"/>']
    for i, c in enumerate(counts):
        x0 = left + (edges[i] - lo) / span * w
        x1 = left + (edges[i + 1] - lo) / span * w
        y = (height - bottom - top_pad) * c / top
        cls = "neg" if (edges[i] + edges[i + 1]) / 2 < 0 else "pos"
        parts.append(f'<rect class="{cls}" x="{x0:.1f}" y="{height - bottom - y:.1f}" width="{max(0.5, x1 - x0 - 0.5):.1f}" '
                     f'height="{y:.1f}"><title>{fmt(edges[i])} to {fmt(edges[i + 1])}: {_esc(c)}</title></rect>')
    parts += [f'<text x="{left}" y="{height - 8}" text-anchor="start">{fmt(lo)}</text>',
              f'<text x="{width - 8}" y="{height - 8}" text-anchor="end">{fmt(hi)}</text>',
              f'<text x="{left - 4}" y="{top_pad + 4}" text-anchor="end">{_esc(top)}</text>',
              f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>',
              f'<text class="density" x="{width - 8}" y="{top_pad - 4}" text-anchor="end">firing density {pct(density)}</text>',
              "</svg>"]
    note = (hist or {}).get("note")
    return ('<figure class="cc-figure">' + "".join(parts)
            + (f"<figcaption>{_esc(note)}</figcaption>" if note else "") + "</figure>")


def _vocab(vocab: dict | None) -> str:
    top, bottom = list((vocab or {}).get("top") or []), list((vocab or {}).get("bottom") or [])
    if not top and not bottom:
        return '<p class="cc-muted">vocabulary projection not computed</p>'

    def cells(pair: Any) -> str:
        if not pair:
            return "<td></td><td></td>"
        return f'<td class="cc-vtok"><span class="chip">{visible(pair[0])}</span></td><td class="num">{fmt(pair[1])}</td>'

    rows = "".join(f"<tr>{cells(top[k] if k < len(top) else None)}{cells(bottom[k] if k < len(bottom) else None)}</tr>"
                   for k in range(max(len(top), len(bottom))))
    how = (vocab or {}).get("how")
    return ('<table class="cc-vocab"><thead><tr><th colspan="2">promotes (top)</th><th colspan="2">suppresses (bottom)'
            f"</th></tr></thead><tbody>{rows}</tbody></table>"
            + (f'<p class="cc-note">{_esc(how)}</p>' if how else ""))


def _describe(describe: dict | None) -> str:
    prompts = (describe or {}).get("prompts") or []
    if not prompts:
        return ('<p class="cc-muted">intervention description not computed: --describe N gives it to N latents (the '
                'highlights, then the most frequent); a transcoder cannot be spliced into one site</p>')
    clamp = fmt(describe.get("clamp_value"))
    rows = "".join(f'<tr><td class="cc-text">{_esc(p.get("prompt", ""))}</td><td class="cc-text">{_esc(p.get("baseline", ""))}</td>'
                   f'<td class="cc-text cc-clamped">{_esc(p.get("clamped", ""))}</td></tr>' for p in prompts)
    return (f'<p class="cc-note">greedy continuations with the latent clamped to {clamp} at every position, beside the '
            f'unchanged model</p><table class="cc-describe"><thead><tr><th>prompt</th><th>baseline</th>'
            f"<th>clamped at {clamp}</th></tr></thead><tbody>{rows}</tbody></table>")


def _concept(card: dict) -> str:
    c = card.get("concept")
    if not c:
        return '<p class="cc-muted">no supervised concept matched (or not computed)</p>'
    return f'<p>matches the supervised concept <strong>{_esc(c.get("name"))}</strong>, correlation {fmt(c.get("correlation"))}</p>'


def _stability(card: dict) -> str:
    st = card.get("stability")
    if not st:
        return '<p class="cc-muted">stability not computed</p>'
    of = f" of {_esc(st['compare'])}" if st.get("compare") else ""
    return (f'<p>decoder cosine <strong>{fmt(st.get("cosine"))}</strong> to latent {_esc(st.get("partner"))}{of} '
            "(the best match in the compared dictionary)</p>")


def card_html(card: dict) -> str:
    """One card (the JSON of conca.atlas.cards.latent_card) as a self-contained HTML fragment: a <div>
    with its own <style>, readable without JavaScript (a notebook's display(HTML(...)), a mail)."""
    css = resources.files("conca.atlas").joinpath("assets", "card.css").read_text(encoding="utf-8")
    scale = _scale(card)
    sites = card.get("sites") or {}
    flags = "".join(f'<span class="badge badge-{_esc(f)}">{_esc(f)}</span>' for f in card.get("flags") or [])
    if card.get("signed"):
        flags += '<span class="badge badge-signed">signed</span>'
    n_firing, n_tokens = card.get("n_firing"), card.get("n_tokens")
    site = (f'<div class="cc-stat"><dt>sites</dt><dd>{_esc(sites.get("in"))} \u2192 {_esc(sites["out"])}</dd></div>'
            if sites.get("out") else f'<div class="cc-stat"><dt>site</dt><dd>{_esc(sites.get("in") or MISSING)}</dd></div>')
    stats = (f'<dl class="cc-stats"><div class="cc-stat"><dt>density</dt><dd>{pct(card.get("density"))}</dd></div>'
             f'<div class="cc-stat"><dt>fires on</dt><dd>{_thousands(n_firing)} of {_thousands(n_tokens)} tokens</dd></div>'
             f'<div class="cc-stat"><dt>max</dt><dd>{fmt(card.get("max"))}</dd></div>'
             f'<div class="cc-stat"><dt>mean when firing</dt><dd>{fmt(card.get("mean_firing"))}</dd></div>{site}</dl>')
    legend = ('<p class="cc-note">Shade: <span class="cc-tok" style="background: rgba(255, 140, 0, .8)">positive</span>'
              + (' <span class="cc-tok" style="background: rgba(40, 110, 255, .6)">negative</span>' if card.get("signed") else "")
              + ", opacity \u221d value / max; the outlined token is the example's own token; hover a token for its value.</p>")
    groups = card.get("quantiles") or []
    quantiles = "".join(
        f'<details class="cc-group"{" open" if i == len(groups) - 1 else ""}><summary>values {fmt((g.get("range") or [None])[0])} '
        f'to {fmt((g.get("range") or [None, None])[-1])} ({_count(len(g.get("examples") or []), "example")})</summary>'
        f'{_examples(g.get("examples") or [], scale)}</details>'
        for i, g in reversed(list(enumerate(groups))))
    body = [f'<header class="cc-head"><h2>Latent {_esc(card.get("latent"))}</h2>{flags}</header>', stats,
            _section("Top activations", "cc-top", legend + _examples(card.get("top") or [], scale))]
    if card.get("signed"):
        body.append(_section("Most negative activations", "cc-bottom", _examples(card.get("bottom") or [], scale)))
    if quantiles:
        body.append(_section("Activation quantiles", "cc-quantiles", quantiles))
    body += ['<div class="cc-cols">' + _section("Activation histogram", "cc-histogram", _histogram(card.get("histogram"), card.get("density")))
             + _section("Vocabulary projection", "cc-vocab-section", _vocab(card.get("vocab"))) + "</div>",
             _section("Intervention", "cc-intervention", _describe(card.get("describe"))),
             '<div class="cc-cols">' + _section("Concept", "cc-concept", _concept(card))
             + _section("Stability", "cc-stability", _stability(card)) + "</div>"]
    return f'<div class="conca-card"><style>{css}</style>' + "".join(body) + "</div>"
