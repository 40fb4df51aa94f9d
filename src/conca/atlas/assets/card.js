/* conca latent atlas: one latent's card as DOM (window.CONCA_CARD.render), from the card JSON of
   conca.atlas.cards. All data enters the page as text nodes and attributes, never as HTML.
   Highlight colours: orange for positive values, blue for negative ones; opacity = |value| / the
   card's largest |value| of that sign. */
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";

  function h(tag, props) {
    var e = document.createElement(tag);
    if (props) Object.keys(props).forEach(function (k) {
      var v = props[k];
      if (v === null || v === undefined) return;
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    });
    for (var i = 2; i < arguments.length; i++) add(e, arguments[i]);
    return e;
  }
  function add(e, kid) {
    if (kid === null || kid === undefined || kid === false) return;
    if (Array.isArray(kid)) kid.forEach(function (k) { add(e, k); });
    else e.append(kid instanceof Node ? kid : String(kid));  // a string becomes a text node
  }
  function s(tag, attrs, text) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined || typeof v !== "number" || isNaN(v)) return "\u2014";
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
    return String(Number(v.toPrecision(3)));
  }
  function pct(d) {
    if (d === null || d === undefined) return "\u2014";
    if (d === 0) return "0%";
    var p = d * 100;
    return (p < 0.01 ? p.toExponential(1) : String(Number(p.toPrecision(3)))) + "%";
  }
  var WS = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"};
  function visible(tok) {
    var frag = document.createDocumentFragment(), run = "";
    tok = String(tok);
    for (var i = 0; i < tok.length; i++) {
      var sym = WS[tok[i]];
      if (sym) { if (run) { frag.append(run); run = ""; } frag.append(h("span", {class: "ws", text: sym})); }
      else run += tok[i];
    }
    if (run) frag.append(run);
    if (!tok.length) frag.append(h("span", {class: "ws", text: "\u2205"}));
    return frag;
  }
  function shade(v, scale) {
    if (typeof v !== "number" || !v || isNaN(v)) return null;
    var ref = v > 0 ? scale.pos : scale.neg;
    var a = ref > 0 ? Math.min(1, Math.abs(v) / ref) : 1;
    return (v > 0 ? "rgba(255, 140, 0, " : "rgba(40, 110, 255, ") + a.toFixed(3) + ")";
  }
  // The largest positive and the largest |negative| value over the card, so that shades compare across examples.
  function scaleOf(card) {
    var pos = typeof card.max === "number" && card.max > 0 ? card.max : 0, neg = 0;
    function scan(ex) {
      (ex.values || []).forEach(function (v) {
        if (typeof v !== "number") return;
        if (v > pos) pos = v;
        if (-v > neg) neg = -v;
      });
    }
    (card.top || []).forEach(scan);
    (card.bottom || []).forEach(scan);
    (card.quantiles || []).forEach(function (g) { (g.examples || []).forEach(scan); });
    return {pos: pos, neg: neg};
  }
  function example(ex, scale) {
    var ctx = h("span", {class: "cc-ctx"}), vals = ex.values || [];
    (ex.tokens || []).forEach(function (t, k) {
      var v = vals[k], tok = h("span", {class: "cc-tok" + (k === ex.target ? " cc-target" : ""),
                                        "data-value": typeof v === "number" ? fmt(v) : null, "data-token": String(t),
                                        title: typeof v === "number" ? JSON.stringify(String(t)) + ": " + fmt(v) : null}, visible(t));
      var bg = shade(v, scale);
      if (bg) tok.style.backgroundColor = bg;
      ctx.append(tok);
    });
    var where = [];
    if (ex.context !== undefined && ex.context !== null) where.push("context " + ex.context);
    if (ex.position !== undefined && ex.position !== null) where.push("position " + ex.position);
    return h("div", {class: "cc-ex"}, h("span", {class: "cc-val", text: fmt(ex.value)}), ctx,
             where.length ? h("span", {class: "cc-where", text: where.join(", ")}) : null);
  }
  function examples(list, scale, cls) {
    if (!list || !list.length) return h("p", {class: "cc-muted", text: "no examples"});
    return h("div", {class: "cc-examples " + (cls || "")}, list.map(function (ex) { return example(ex, scale); }));
  }
  function section(title, cls) {
    var sec = h("section", {class: "cc-section " + (cls || "")}, h("h3", {text: title}));
    for (var i = 2; i < arguments.length; i++) add(sec, arguments[i]);
    return sec;
  }
  function stat(label, value) { return h("div", {class: "cc-stat"}, h("dt", {text: label}), h("dd", {text: value})); }
  function histogram(hist, card) {
    var counts = (hist && hist.counts) || [], edges = (hist && hist.edges) || [];
    if (!counts.length || edges.length !== counts.length + 1)
      return h("p", {class: "cc-muted", text: "no activation values to show"});
    var W = 420, H = 150, L = 40, B = 26, T = 18, lo = edges[0], hi = edges[edges.length - 1];
    var span = hi > lo ? hi - lo : 1, top = Math.max.apply(null, counts) || 1, w = W - L - 8;
    var svg = s("svg", {class: "cc-hist", viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img",
                        "aria-label": "histogram of activation values"});
    svg.append(s("line", {x1: L, y1: H - B, x2: W - 8, y2: H - B, class: "axis"}));
    counts.forEach(function (c, i) {
      var x0 = L + (edges[i] - lo) / span * w, x1 = L + (edges[i + 1] - lo) / span * w, y = (H - B - T) * c / top;
      var r = s("rect", {x: x0.toFixed(1), y: (H - B - y).toFixed(1), width: Math.max(0.5, x1 - x0 - 0.5).toFixed(1),
                         height: y.toFixed(1), class: (edges[i] + edges[i + 1]) / 2 < 0 ? "neg" : "pos"});
      r.append(s("title", {}, fmt(edges[i]) + " to " + fmt(edges[i + 1]) + ": " + c));
      svg.append(r);
    });
    svg.append(s("text", {x: L, y: H - 8, "text-anchor": "start"}, fmt(lo)));
    svg.append(s("text", {x: W - 8, y: H - 8, "text-anchor": "end"}, fmt(hi)));
    svg.append(s("text", {x: L - 4, y: T + 4, "text-anchor": "end"}, String(top)));
    svg.append(s("text", {x: L - 4, y: H - B, "text-anchor": "end"}, "0"));
    svg.append(s("text", {x: W - 8, y: T - 4, "text-anchor": "end", class: "density"},
                 "firing density " + pct(card.density)));
    return h("figure", {class: "cc-figure"}, svg, hist.note ? h("figcaption", {text: hist.note}) : null);
  }
  function vocab(v) {
    if (!v || (!(v.top || []).length && !(v.bottom || []).length))
      return h("p", {class: "cc-muted", text: "vocabulary projection not computed"});
    var top = v.top || [], bottom = v.bottom || [], rows = [];
    for (var k = 0; k < Math.max(top.length, bottom.length); k++) {
      var a = top[k] || [], b = bottom[k] || [];
      rows.push(h("tr", null, h("td", {class: "cc-vtok"}, a.length ? h("span", {class: "chip"}, visible(a[0])) : null),
        h("td", {class: "num", text: a.length ? fmt(a[1]) : ""}),
        h("td", {class: "cc-vtok"}, b.length ? h("span", {class: "chip"}, visible(b[0])) : null),
        h("td", {class: "num", text: b.length ? fmt(b[1]) : ""})));
    }
    return h("div", null, h("table", {class: "cc-vocab"},
      h("thead", null, h("tr", null, h("th", {colspan: 2, text: "promotes (top)"}), h("th", {colspan: 2, text: "suppresses (bottom)"}))),
      h("tbody", null, rows)), v.how ? h("p", {class: "cc-note", text: v.how}) : null);
  }
  function describe(d) {
    if (!d || !(d.prompts || []).length)
      return h("p", {class: "cc-muted", text: "intervention description not computed: --describe N gives it to N latents (the highlights, then the most frequent); a transcoder cannot be spliced into one site"});
    return h("div", null, h("p", {class: "cc-note", text: "greedy continuations with the latent clamped to " + fmt(d.clamp_value) +
                                 " at every position, beside the unchanged model"}),
      h("table", {class: "cc-describe"}, h("thead", null, h("tr", null, h("th", {text: "prompt"}), h("th", {text: "baseline"}),
        h("th", {text: "clamped at " + fmt(d.clamp_value)}))),
        h("tbody", null, d.prompts.map(function (p) {
          return h("tr", null, h("td", {class: "cc-text", text: p.prompt}), h("td", {class: "cc-text", text: p.baseline}),
                   h("td", {class: "cc-text cc-clamped", text: p.clamped}));
        }))));
  }
  function render(card, index) {
    var scale = scaleOf(card), sites = card.sites || {}, flags = card.flags || [];
    var head = h("header", {class: "cc-head"}, h("h2", {text: "Latent " + card.latent}),
      flags.map(function (f) { return h("span", {class: "badge badge-" + f, text: f}); }),
      card.signed ? h("span", {class: "badge badge-signed", text: "signed"}) : null);
    var stats = h("dl", {class: "cc-stats"},
      stat("density", pct(card.density)),
      stat("fires on", (card.n_firing === undefined ? "\u2014" : Number(card.n_firing).toLocaleString("en")) + " of " +
           (card.n_tokens === undefined ? "\u2014" : Number(card.n_tokens).toLocaleString("en")) + " tokens"),
      stat("max", fmt(card.max)), stat("mean when firing", fmt(card.mean_firing)),
      sites.out ? stat("sites", (sites.in || "?") + " \u2192 " + sites.out) : stat("site", sites.in || (index && index.site) || "\u2014"));
    var legend = h("p", {class: "cc-note"}, "Shade: ", h("span", {class: "cc-tok", style: "background: rgba(255, 140, 0, .8)", text: "positive"}),
      card.signed ? [" ", h("span", {class: "cc-tok", style: "background: rgba(40, 110, 255, .6)", text: "negative"})] : null,
      ", opacity \u221d value / max; the outlined token is the example's own token; hover a token for its value.");
    var groups = (card.quantiles || []).map(function (g, i, all) {
      var r = g.range || [];
      return h("details", {class: "cc-group", open: i === all.length - 1 ? "" : null},
        h("summary", {text: "values " + fmt(r[0]) + " to " + fmt(r[1]) + " (" + (g.examples || []).length + ((g.examples || []).length === 1 ? " example)" : " examples)")}),
        examples(g.examples, scale));
    }).reverse();
    var concept = card.concept
      ? h("p", null, "matches the supervised concept ", h("strong", {text: card.concept.name}), ", correlation " + fmt(card.concept.correlation))
      : h("p", {class: "cc-muted", text: "no supervised concept matched (or not computed)"});
    var st = card.stability;
    var stability = st
      ? h("p", null, "decoder cosine ", h("strong", {text: fmt(st.cosine)}), " to latent " + st.partner +
          (st.compare ? " of " + st.compare : "") + " (the best match in the compared dictionary)")
      : h("p", {class: "cc-muted", text: "stability not computed"});
    return h("article", {class: "conca-card"}, head, stats,
      section("Top activations", "cc-top", legend, examples(card.top, scale)),
      card.signed ? section("Most negative activations", "cc-bottom", examples(card.bottom, scale)) : null,
      groups.length ? section("Activation quantiles", "cc-quantiles", groups) : null,
      h("div", {class: "cc-cols"}, section("Activation histogram", "cc-histogram", histogram(card.histogram, card)),
        section("Vocabulary projection", "cc-vocab-section", vocab(card.vocab))),
      section("Intervention", "cc-intervention", describe(card.describe)),
      h("div", {class: "cc-cols"}, section("Concept", "cc-concept", concept), section("Stability", "cc-stability", stability)));
  }
  // One shared tooltip that follows the mouse over highlighted tokens (beside their title attribute).
  function tooltips(doc) {
    var tip = h("div", {class: "cc-tip", id: "cc-tip", role: "tooltip"});
    tip.hidden = true;
    doc.body.append(tip);
    doc.addEventListener("mouseover", function (e) {
      var tok = e.target.closest && e.target.closest(".cc-tok[data-value]");
      if (!tok) { tip.hidden = true; return; }
      tip.replaceChildren(h("span", {class: "cc-tip-tok"}, visible(tok.getAttribute("data-token"))),
                          h("strong", {text: " " + tok.getAttribute("data-value")}));
      var r = tok.getBoundingClientRect();
      tip.style.left = (window.scrollX + r.left) + "px";
      tip.style.top = (window.scrollY + r.bottom + 4) + "px";
      tip.hidden = false;
    });
  }
  // The small helpers are shared with the index page (atlas.js), which loads after this file.
  window.CONCA_CARD = {render: render, tooltips: tooltips, h: h, fmt: fmt, pct: pct, visible: visible};
})();
