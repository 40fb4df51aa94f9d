/* conca latent atlas: the index table and one card per latent, drawn from data/index.js and
   data/cards_NNNNN.js. Works from file:// with no network: the data files are scripts that call
   window.CONCA_ATLAS, added as <script> tags when needed (Chromium blocks the Fetch API on file:// URLs).
   Every piece of data enters the page as text (textContent, text nodes, attributes), never as HTML. */
(function () {
  "use strict";
  var PAGE = 100;
  var INDEX = null;
  var chunks = {};   // chunk number -> {latent: card}
  var pending = {};  // chunk number -> Promise of that map
  var state = {sort: "latent", desc: false, hideDead: false, onlyDense: false, onlyMatched: false,
               query: "", mode: "fires_on", page: 0, scroll: 0};
  var view = null;   // the index view's elements, built once and kept (so its state survives a card visit)
  var routeNo = 0;   // increases on every route: a chunk that arrives late does not draw over a newer view
  var firstRoute = true;

  window.CONCA_ATLAS = {
    index: function (data) { INDEX = data; },
    cards: function (no, list) {
      var map = {};
      list.forEach(function (c) { map[c.latent] = c; });
      chunks[no] = map;
    }
  };

  // ---------- small helpers: shared with the card (card.js loads first) ----------
  var h = window.CONCA_CARD.h, fmt = window.CONCA_CARD.fmt, pct = window.CONCA_CARD.pct,
      visible = window.CONCA_CARD.visible;

  function chips(tokens) {
    return (tokens || []).map(function (t) { return h("span", {class: "chip"}, visible(t)); });
  }
  function badges(flags) {
    return (flags || []).map(function (f) { return h("span", {class: "badge badge-" + f, text: f}); });
  }
  function padNo(no) { return ("00000" + no).slice(-5); }

  // ---------- data loading ----------
  function loadChunk(no) {
    if (chunks[no]) return Promise.resolve(chunks[no]);
    if ((INDEX.card_chunks || []).indexOf(no) < 0) return Promise.resolve({});
    if (!pending[no]) pending[no] = new Promise(function (resolve, reject) {
      var s = document.createElement("script");
      s.src = "data/cards_" + padNo(no) + ".js";
      s.onload = function () { chunks[no] ? resolve(chunks[no]) : reject(new Error(s.src + " held no cards")); };
      s.onerror = function () { delete pending[no]; s.remove(); reject(new Error("could not load " + s.src)); };
      document.head.append(s);
    });
    return pending[no];
  }

  // ---------- the index ----------
  var COLS = [
    {key: "latent", label: "latent", num: true},
    {key: "density", label: "density", num: true, show: pct},
    {key: "max", label: "max", num: true},
    {key: "mean_firing", label: "mean when firing", num: true},
    {key: "fires_on", label: "fires on", tokens: true},
    {key: "promotes", label: "promotes", tokens: true},
    {key: "concept", label: "concept"},
    {key: "concept_corr", label: "corr", num: true},
    {key: "stability", label: "stability", num: true},
    {key: "flags", label: "flags"}
  ];
  function column(key) { return (INDEX.columns || {})[key] || []; }
  function cell(key, i) { return key === "latent" ? i : column(key)[i]; }
  function flagsOf(i) { return column("flags")[i] || []; }
  function sortValue(key, i) {
    var v = cell(key, i);
    if (key === "fires_on" || key === "promotes") return v && v.length ? String(v[0]).trim() : null;
    if (key === "flags") return v && v.length ? v.join(" ") : null;
    return v === undefined ? null : v;
  }
  function sortedOrder() {
    var n = INDEX.n_latents, key = state.sort, dir = state.desc ? -1 : 1, ids = new Array(n), vals = new Array(n);
    for (var i = 0; i < n; i++) { ids[i] = i; vals[i] = sortValue(key, i); }
    ids.sort(function (a, b) {
      var x = vals[a], y = vals[b];
      if (x === null || (typeof x === "number" && isNaN(x))) return (y === null || (typeof y === "number" && isNaN(y))) ? a - b : 1;
      if (y === null || (typeof y === "number" && isNaN(y))) return -1;  // missing values last either way
      if (x < y) return -dir;
      if (x > y) return dir;
      return a - b;
    });
    return ids;
  }
  function tokenMatch(tokens, q) {
    if (!tokens) return false;
    for (var k = 0; k < tokens.length; k++) if (String(tokens[k]).trim().indexOf(q) >= 0) return true;
    return false;
  }
  function shown() {
    var q = state.query.trim(), toks = column(state.mode), concept = column("concept"), out = [];
    view.order = view.order || sortedOrder();
    view.order.forEach(function (i) {
      var f = flagsOf(i);
      if (state.hideDead && f.indexOf("dead") >= 0) return;
      if (state.onlyDense && f.indexOf("dense") < 0) return;
      if (state.onlyMatched && (concept[i] === null || concept[i] === undefined)) return;
      if (q && !tokenMatch(toks[i], q)) return;
      out.push(i);
    });
    return out;
  }
  function row(i) {
    var tr = h("tr", {"data-latent": i, class: flagsOf(i).indexOf("dead") >= 0 ? "dead" : null});
    COLS.forEach(function (c) {
      var v = cell(c.key, i), td;
      if (c.key === "latent") td = h("td", {class: "num"}, h("a", {href: "#latent=" + i, text: String(i)}));
      else if (c.tokens) td = h("td", {class: "toks"}, chips(v));
      else if (c.key === "flags") td = h("td", null, badges(v));
      else if (c.num) td = h("td", {class: "num", text: (c.show || fmt)(v)});
      else td = h("td", {text: v === null || v === undefined ? "\u2014" : String(v)});
      tr.append(td);
    });
    return tr;
  }
  function refresh() {
    var rows = shown(), pages = Math.max(1, Math.ceil(rows.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    var start = state.page * PAGE, page = rows.slice(start, start + PAGE);
    view.tbody.replaceChildren.apply(view.tbody, page.map(row));
    var q = state.query.trim();
    view.count.textContent = rows.length + " of " + INDEX.n_latents + " latents" +
      (q ? " match \u201c" + q + "\u201d in \u201c" + (state.mode === "fires_on" ? "fires on" : "promotes") + "\u201d" : "") +
      (rows.length ? " \u00b7 showing " + (start + 1) + "\u2013" + (start + page.length) : "");
    view.pageLabel.textContent = "page " + (state.page + 1) + " of " + pages;
    view.prev.disabled = state.page === 0;
    view.next.disabled = state.page >= pages - 1;
    view.ths.forEach(function (th) {
      var on = th.getAttribute("data-key") === state.sort;
      th.setAttribute("aria-sort", on ? (state.desc ? "descending" : "ascending") : "none");
      th.querySelector(".arrow").textContent = on ? (state.desc ? " \u25bc" : " \u25b2") : "";
    });
  }
  function setSort(key, num) {
    if (state.sort === key) state.desc = !state.desc;
    else { state.sort = key; state.desc = !!num && key !== "latent"; }  // numbers: largest first
    view.order = null; state.page = 0; refresh();
  }
  function jump() {
    var text = view.jump.value.trim(), n = Number(text);
    if (!/^\d+$/.test(text) || n >= INDEX.n_latents) {
      view.jumpMsg.textContent = "no latent \u201c" + text + "\u201d: enter a number from 0 to " + (INDEX.n_latents - 1);
      return;
    }
    view.jumpMsg.textContent = "";
    location.hash = "latent=" + n;
  }
  function metaLine(I) {
    var items = [["model", I.model], ["site", I.out_site ? I.site + " \u2192 " + I.out_site : I.site],
                 ["method", I.method], ["dictionary", I.dictionary],
                 ["tokens", typeof I.n_tokens === "number" ? I.n_tokens.toLocaleString("en") : I.n_tokens],
                 ["latents", I.n_latents], ["source", I.source]];
    return h("p", {class: "meta"}, items.filter(function (x) { return x[1] !== null && x[1] !== undefined; })
      .map(function (x) { return h("span", {class: "item"}, h("span", {class: "label", text: x[0] + " "}), String(x[1])); }));
  }
  function buildIndex() {
    var I = INDEX;
    view = {};
    var hl = (I.highlights || []).map(function (x) {
      return h("li", null, h("a", {href: "#latent=" + x.latent, text: "latent " + x.latent}), " \u2014 " + (x.why || ""));
    });
    function onSearch() {
      if (view.search.value === state.query) return;
      state.query = view.search.value; state.page = 0; refresh();
    }
    view.search = h("input", {id: "search", type: "search", placeholder: "token, e.g. def", "aria-label": "search a token",
                              oninput: onSearch, onchange: onSearch, onsearch: onSearch});
    view.mode = h("select", {id: "mode", "aria-label": "search in", onchange: function () {
      state.mode = view.mode.value; state.page = 0; refresh(); }},
      h("option", {value: "fires_on", text: "fires on"}), h("option", {value: "promotes", text: "promotes"}));
    function box(id, key, label) {
      var input = h("input", {type: "checkbox", id: id, onchange: function () { state[key] = input.checked; state.page = 0; refresh(); }});
      return h("label", {class: "check"}, input, " " + label);
    }
    view.jump = h("input", {id: "jump", type: "text", inputmode: "numeric", placeholder: "latent #", size: "8",
                            onkeydown: function (e) { if (e.key === "Enter") jump(); }});
    view.jumpMsg = h("span", {id: "jump-msg", class: "msg", role: "status"});
    view.count = h("p", {id: "match-count", class: "count"});
    view.ths = COLS.map(function (c) {
      return h("th", {"data-key": c.key, class: c.num ? "num" : null, title: "sort by " + c.label,
                      onclick: function () { setSort(c.key, c.num); }}, c.label, h("span", {class: "arrow"}));
    });
    view.tbody = h("tbody");
    view.prev = h("button", {id: "prev", type: "button", text: "\u2190 previous", onclick: function () { state.page--; refresh(); window.scrollTo(0, view.table.offsetTop - 8); }});
    view.next = h("button", {id: "next", type: "button", text: "next \u2192", onclick: function () { state.page++; refresh(); window.scrollTo(0, view.table.offsetTop - 8); }});
    view.pageLabel = h("span", {class: "page-label"});
    view.table = h("table", {id: "latents"}, h("thead", null, h("tr", null, view.ths)), view.tbody);
    view.tbody.addEventListener("click", function (e) {
      if (e.target.closest("a")) return;
      var tr = e.target.closest("tr[data-latent]");
      if (tr) location.hash = "latent=" + tr.getAttribute("data-latent");
    });
    view.root = h("main", {class: "index"},
      h("h1", {text: I.title || "conca latent atlas"}), metaLine(I),
      I.vocab_how ? h("p", {class: "note", text: "\u201cpromotes\u201d: the top tokens of the vocabulary projection, " + I.vocab_how}) : null,
      hl.length ? h("section", {class: "highlights"}, h("h2", {text: "Highlights"}), h("ul", null, hl)) : null,
      h("div", {class: "controls"},
        h("span", {class: "group"}, h("label", {for: "search", text: "Search "}), view.mode, view.search),
        h("span", {class: "group"}, box("hide-dead", "hideDead", "hide dead"), box("only-dense", "onlyDense", "only dense"),
          box("only-matched", "onlyMatched", "only matched concepts")),
        h("span", {class: "group"}, h("label", {for: "jump", text: "Go to latent "}), view.jump,
          h("button", {id: "jump-go", type: "button", text: "open", onclick: jump}), view.jumpMsg)),
      view.count, h("div", {class: "table-wrap"}, view.table),
      h("div", {class: "pager"}, view.prev, view.pageLabel, view.next));
    refresh();
  }
  function showIndex(message) {
    if (!view) buildIndex();
    document.title = INDEX.title || "conca latent atlas";
    app().replaceChildren(view.root);
    view.jumpMsg.textContent = message || "";
    window.scrollTo(0, state.scroll);
  }

  // ---------- a card ----------
  function showCard(n) {
    var no = Math.floor(n / INDEX.chunk_size), mine = routeNo;
    document.title = "latent " + n + " \u00b7 " + (INDEX.title || "conca latent atlas");
    app().replaceChildren(h("p", {class: "loading", text: "loading latent " + n + "\u2026"}));
    loadChunk(no).then(function (map) {
      if (mine !== routeNo) return;
      var card = map[n];
      app().replaceChildren(h("main", {class: "card-page"}, cardNav(n),
        card ? window.CONCA_CARD.render(card, INDEX) : h("p", {class: "msg", text: "no card was written for latent " + n + " in this atlas"})));
      window.scrollTo(0, 0);
    }, function (err) {
      if (mine !== routeNo) return;
      app().replaceChildren(h("main", {class: "card-page"}, cardNav(n), h("p", {class: "msg", text: String(err.message || err)})));
    });
  }
  function cardNav(n) {
    return h("nav", {class: "card-nav"}, h("a", {href: "#", class: "back", text: "\u2190 all latents"}),
      n > 0 ? h("a", {href: "#latent=" + (n - 1), class: "prev", text: "\u2039 latent " + (n - 1)}) : null,
      n + 1 < INDEX.n_latents ? h("a", {href: "#latent=" + (n + 1), class: "next", text: "latent " + (n + 1) + " \u203a"}) : null);
  }

  // ---------- routing: #latent=17 (or ?latent=17 on the first load) opens a card, anything else the index ----------
  function app() { return document.getElementById("app"); }
  function wanted() {
    var m = /^#latent=(.*)$/.exec(location.hash);
    if (m) return m[1];
    if (firstRoute && !location.hash) return new URLSearchParams(location.search).get("latent");
    return null;
  }
  function route() {
    routeNo++;
    var onIndex = view && app().firstChild === view.root;
    if (onIndex) state.scroll = window.scrollY;
    var text = wanted();
    firstRoute = false;
    if (text === null) return showIndex();
    text = decodeURIComponent(text);
    if (!/^\d+$/.test(text) || Number(text) >= INDEX.n_latents)
      return showIndex("no latent \u201c" + text + "\u201d: this atlas has latents 0 to " + (INDEX.n_latents - 1));
    showCard(Number(text));
  }
  function start() {
    if (!INDEX) {
      app().replaceChildren(h("p", {class: "msg", text: "data/index.js did not load: is the atlas folder complete?"}));
      return;
    }
    window.addEventListener("hashchange", route);
    window.CONCA_CARD.tooltips(document);
    route();
  }
  document.addEventListener("DOMContentLoaded", start);
})();
