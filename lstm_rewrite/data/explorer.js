/* The report's explorer: pick a layer, unit and sequence; see the coloured text, the unit's
   c and h and gates over time; select a span of steps to rank the units that are on inside it
   and off around it (LSTMVis's selection). Reads window.LSTM_REPORT, which explorer_data.js
   sets; works from a file on disk and fetches nothing. Without JavaScript the page is the
   static summary and tables. */
(function () {
  "use strict";
  var GATES = {i: true, f: true, o: true, z: true, r: true};  // sigmoid outputs, in [0, 1]
  var COLOURS = {c: "#b2182b", h: "#2166ac", i: "#1b9e77", f: "#d95f02", g: "#7570b3",
                 o: "#e7298a", z: "#66a61e", r: "#e6ab02", n: "#a6761d"};
  var SVG = "http://www.w3.org/2000/svg";
  var TOP = 10;
  var R = window.LSTM_REPORT;
  var root = document.getElementById("explorer");
  if (!root) return;
  if (!R || !Array.isArray(R.layers) || !R.layers.length) {
    root.textContent = "The explorer has no data (explorer_data.js is missing or holds no layer).";
    return;
  }
  var state = {layer: 0, unit: 0, quantity: "c", sequence: 0, anchor: null, span: null, dragging: false};
  var limits = {};

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (attrs[k] !== undefined && attrs[k] !== null) node.setAttribute(k, attrs[k]);
    });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svgEl(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }
  function finite(v) { return typeof v === "number" && isFinite(v); }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v !== "number") return String(v);
    if (!isFinite(v)) return v > 0 ? "∞" : (v < 0 ? "-∞" : "–");
    return Math.abs(v) >= 1e4 ? v.toPrecision(3) : v.toFixed(3);
  }
  function slug(prefix) { return String(prefix).replace(/[^A-Za-z0-9._-]/g, "_"); }
  function rowId(prefix, unit) { return "unit-" + slug(prefix) + "-" + unit; }

  function layer() { return R.layers[state.layer]; }
  function quantities(L) { return Array.isArray(L.quantities) ? L.quantities : []; }
  function stateQuantities(L) { return quantities(L).filter(function (q) { return q === "c" || q === "h"; }); }
  function sequence() { return (layer().sequences || [])[state.sequence] || null; }
  function series(seq, q) { return (seq && seq.values && Array.isArray(seq.values[q])) ? seq.values[q] : null; }
  function valueAt(rows, p, unit) {
    var v = rows && rows[p] ? rows[p][unit] : null;
    return finite(v) ? v : null;
  }
  function shownCount() {
    if (finite(R.shown)) return R.shown;
    return Math.max.apply(null, R.layers.map(function (L) { return (L.sequences || []).length; }));
  }
  function inputLength(seq) {
    var n = 0;
    if (Array.isArray(R.tokens) && Array.isArray(R.tokens[state.sequence])) n = R.tokens[state.sequence].length;
    Object.keys(R.labels || {}).forEach(function (k) {
      var row = (R.labels[k] || [])[state.sequence];
      if (Array.isArray(row)) n = Math.max(n, row.length);
    });
    var steps = (seq && seq.steps) || [];
    return steps.length ? Math.max(n, steps[steps.length - 1] + 1) : n;
  }
  function tokenText(k) {
    var row = Array.isArray(R.tokens) ? R.tokens[state.sequence] : null;
    var t = row && row[k] !== undefined && row[k] !== null ? String(row[k]) : String(k);
    return t.replace(/ /g, "\u00a0").replace(/\n/g, "↵").replace(/\t/g, "⇥") || "\u00a0";
  }
  // The colour range of a unit: the largest |value| over every embedded sequence of its layer.
  function limit(q, unit) {
    var key = state.layer + "|" + q + "|" + unit;
    if (limits[key] === undefined) {
      var m = 0;
      (layer().sequences || []).forEach(function (seq) {
        (series(seq, q) || []).forEach(function (row) {
          var v = row ? row[unit] : null;
          if (finite(v)) m = Math.max(m, Math.abs(v));
        });
      });
      limits[key] = m > 0 ? m : 1;
    }
    return limits[key];
  }
  function mix(to, t) {
    return "rgb(" + to.map(function (c) { return Math.round(255 + (c - 255) * t); }).join(", ") + ")";
  }
  function colour(q, v, unit) {
    if (GATES[q]) return mix([35, 139, 69], Math.min(1, Math.max(0, v)));
    var t = Math.max(-1, Math.min(1, v / limit(q, unit)));
    return t >= 0 ? mix([178, 24, 43], t) : mix([33, 102, 172], -t);
  }

  // --- layout, built once ---
  root.innerHTML = "";
  root.appendChild(el("h2", {}, "Explorer"));
  root.appendChild(el("p", {id: "sample-note"}));
  var controls = el("div", {"class": "controls"});
  [["layer-select", "Layer"], ["unit-select", "Unit"], ["quantity-select", "Colour by"],
   ["sequence-select", "Sequence"]].forEach(function (pair) {
    var label = el("label", {}, pair[1] + " ");
    label.appendChild(el("select", {id: pair[0]}));
    controls.appendChild(label);
  });
  root.appendChild(controls);
  var quick = el("div", {"class": "quick"});
  quick.appendChild(el("span", {"class": "quick-title"}, "Units that track a label:"));
  quick.appendChild(el("span", {id: "tracking-links"}));
  quick.appendChild(el("span", {"class": "quick-title"}, "Most active units:"));
  quick.appendChild(el("span", {id: "active-links"}));
  root.appendChild(quick);
  root.appendChild(el("p", {"class": "hint"}, "Click a token, then shift-click another (or drag) to select a span of steps."));
  root.appendChild(el("div", {id: "text"}));
  var spanLine = el("p", {id: "span-info"});
  root.appendChild(spanLine);
  root.appendChild(svgEl("svg", {id: "chart", viewBox: "0 0 900 130"}));
  root.appendChild(svgEl("svg", {id: "gate-chart", viewBox: "0 0 900 100"}));
  root.appendChild(el("div", {id: "span-results"}));
  root.appendChild(el("div", {id: "unit-row"}));

  function fill(select, options, value) {
    select.innerHTML = "";
    options.forEach(function (o) { select.appendChild(el("option", {value: o[0]}, o[1])); });
    select.value = String(value);
  }
  function button(text, onclick, attrs) {
    var b = el("button", attrs || {}, text);
    b.type = "button";
    b.addEventListener("click", onclick);
    return b;
  }

  function renderNote() {
    var shown = shownCount(), total = finite(R.sequences) ? R.sequences : shown;
    $("sample-note").textContent = shown + " of " + total + " sequences are embedded in this page" +
      (shown < total ? " (a bounded sample; the statistics below count all of them)." : ".");
  }
  function renderSelects() {
    var L = layer();
    fill($("layer-select"), R.layers.map(function (l, i) {
      return [i, l.prefix + (l.layer_class ? " (" + l.layer_class + ")" : "")];
    }), state.layer);
    var units = [];
    for (var u = 0; u < (L.units || 0); u++) {
      var flags = (L.flags || [])[u] || [];
      units.push([u, "unit " + u + (flags.length ? " (" + flags.join(", ") + ")" : "")]);
    }
    fill($("unit-select"), units, state.unit);
    fill($("quantity-select"), quantities(L).map(function (q) { return [q, q]; }), state.quantity);
    var seqs = [];
    for (var s = 0; s < shownCount(); s++) seqs.push([s, "sequence " + s]);
    fill($("sequence-select"), seqs, state.sequence);
  }
  function renderQuick() {
    var track = $("tracking-links"), active = $("active-links");
    track.innerHTML = "";
    active.innerHTML = "";
    (R.tracking || []).forEach(function (t) {
      var i = R.layers.map(function (l) { return l.prefix; }).indexOf(t.layer);
      if (i < 0) return;
      track.appendChild(button(t.label + ": " + t.layer + "." + t.quantity + " unit " + t.unit + " (r = " + fmt(t.r) + ")",
        function () { choose(i, t.unit, t.quantity); }, {"class": "tracking-link", "data-unit": t.unit}));
    });
    if (!track.childNodes.length) track.appendChild(el("span", {}, " none "));
    ((R.active_units || {})[layer().prefix] || []).forEach(function (u) {
      active.appendChild(button("unit " + u, function () { choose(state.layer, u, state.quantity); },
        {"class": "active-link", "data-unit": u}));
    });
  }
  function renderText() {
    var box = $("text"), seq = sequence();
    box.innerHTML = "";
    if (!seq || !Array.isArray(seq.steps)) {
      box.appendChild(el("p", {"class": "empty"}, "No sequence of this layer is embedded in the page."));
      return;
    }
    var q = state.quantity, rows = series(seq, q), where = {};
    seq.steps.forEach(function (s, p) { where[s] = p; });
    var labels = Object.keys(R.labels || {});
    for (var k = 0; k < inputLength(seq); k++) {
      var span = el("span", {"class": "tok", "data-step": k}, tokenText(k));
      var title = "step " + k;
      if (where[k] === undefined) {
        span.className += " pad";
        title += " · padding";
      } else {
        var p = where[k], v = valueAt(rows, p, state.unit);
        span.className += " valid";
        span.setAttribute("data-pos", p);
        span.setAttribute("data-value", v === null ? "NaN" : String(v));
        if (v !== null) span.style.backgroundColor = colour(q, v, state.unit);
        title += " · " + q + " = " + fmt(v);
        var others = stateQuantities(layer()).filter(function (o) { return o !== q; });
        others.forEach(function (o) { title += " · " + o + " = " + fmt(valueAt(series(seq, o), p, state.unit)); });
      }
      labels.forEach(function (name) {
        var row = (R.labels[name] || [])[state.sequence];
        if (row && row[k] !== null && row[k] !== undefined) title += " · " + name + " = " + row[k];
      });
      span.title = title;
      box.appendChild(span);
    }
    markSpan();
  }
  function chart(svg, qs, fixed) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var seq = sequence(), W = 900, H = Number(svg.getAttribute("viewBox").split(" ")[3]), pad = 4;
    var lines = qs.map(function (q) {
      var rows = series(seq, q);
      return {q: q, v: rows ? rows.map(function (row, p) { return valueAt(rows, p, state.unit); }) : []};
    }).filter(function (l) { return l.v.length; });
    if (!lines.length) { svg.style.display = "none"; return; }
    svg.style.display = "";
    var lo = fixed ? 0 : Infinity, hi = fixed ? 1 : -Infinity;
    lines.forEach(function (l) { l.v.forEach(function (v) { if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }); });
    if (!fixed) { var m = Math.max(Math.abs(lo), Math.abs(hi)) || 1; lo = -m; hi = m; }
    if (!(hi > lo)) { lo = 0; hi = 1; }
    var n = lines[0].v.length;
    function x(p) { return n > 1 ? pad + p * (W - 2 * pad) / (n - 1) : W / 2; }
    function y(v) { return H - pad - (v - lo) * (H - 2 * pad - 16) / (hi - lo); }  // 16: the legend
    if (state.span) {
      var a = x(state.span[0]) - (n > 1 ? (W - 2 * pad) / (n - 1) / 2 : 4), b = x(state.span[1]) + (n > 1 ? (W - 2 * pad) / (n - 1) / 2 : 4);
      svg.appendChild(svgEl("rect", {"class": "span-rect", x: a, y: 0, width: Math.max(1, b - a), height: H}));
    }
    svg.appendChild(svgEl("line", {"class": "zero", x1: 0, x2: W, y1: y(lo < 0 && hi > 0 ? 0 : lo), y2: y(lo < 0 && hi > 0 ? 0 : lo)}));
    lines.forEach(function (l) {
      var d = "", pen = "M";
      l.v.forEach(function (v, p) {
        if (v === null) { pen = "M"; return; }
        d += pen + x(p).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = "L";
      });
      svg.appendChild(svgEl("path", {"class": "line", "data-quantity": l.q, d: d, stroke: COLOURS[l.q] || "#333"}));
    });
    var legend = svgEl("text", {x: 8, y: 13, "class": "legend"});
    lines.forEach(function (l) {
      var part = svgEl("tspan", {fill: COLOURS[l.q] || "#333"});
      part.textContent = "\u25a0 " + l.q + "  ";
      legend.appendChild(part);
    });
    var range = svgEl("tspan", {});
    range.textContent = " y from " + fmt(lo) + " to " + fmt(hi);
    legend.appendChild(range);
    svg.appendChild(legend);
  }
  function renderCharts() {
    var qs = quantities(layer());
    chart($("chart"), stateQuantities(layer()), false);
    var gates = qs.filter(function (q) { return q !== "c" && q !== "h"; });
    chart($("gate-chart"), gates, gates.every(function (q) { return GATES[q]; }));
  }
  // LSTMVis's rule: mean inside the span minus mean over a window of the span's length on each
  // side, clipped to the valid steps; with nothing around, the inside mean.
  function rank() {
    var seq = sequence(), rows = series(seq, state.quantity), L = layer();
    if (!rows || !state.span) return [];
    var a = state.span[0], b = state.span[1], len = b - a + 1;
    var lo = Math.max(0, a - len), hi = Math.min(rows.length - 1, b + len), out = [];
    function mean(from, to, u) {
      var sum = 0, count = 0;
      for (var p = from; p <= to; p++) { var v = valueAt(rows, p, u); if (v !== null) { sum += v; count++; } }
      return count ? sum / count : null;
    }
    for (var u = 0; u < (L.units || 0); u++) {
      var inside = mean(a, b, u);
      if (inside === null) continue;
      var sum = 0, count = 0;
      [[lo, a - 1], [b + 1, hi]].forEach(function (r) {
        for (var p = r[0]; p <= r[1]; p++) { var v = valueAt(rows, p, u); if (v !== null) { sum += v; count++; } }
      });
      var around = count ? sum / count : null;
      out.push({unit: u, score: around === null ? inside : inside - around, inside: inside, around: around});
    }
    out.sort(function (x, y) { return y.score - x.score || x.unit - y.unit; });
    return out.slice(0, TOP);
  }
  function auditLink(unit) {
    var prefix = layer().prefix;
    var a = el("a", {href: "#" + rowId(prefix, unit), "class": "audit-link"}, "audit row");
    a.addEventListener("click", function (e) { e.preventDefault(); jump(prefix, unit); });
    return a;
  }
  function renderResults() {
    var box = $("span-results"), seq = sequence();
    box.innerHTML = "";
    if (!state.span || !seq) return;
    var steps = seq.steps;
    box.appendChild(el("h3", {}, "Units on during steps " + steps[state.span[0]] + "–" + steps[state.span[1]] +
      " and off around them (" + layer().prefix + "." + state.quantity + ": mean inside − mean around)"));
    var list = el("ol", {});
    rank().forEach(function (r) {
      var li = el("li", {"data-unit": r.unit, "data-score": String(r.score)});
      var pick = el("a", {href: "#explorer", "class": "select-unit"}, "unit " + r.unit);
      pick.addEventListener("click", function (e) { e.preventDefault(); choose(state.layer, r.unit, state.quantity); });
      li.appendChild(pick);
      li.appendChild(document.createTextNode(" score " + fmt(r.score) + " (inside " + fmt(r.inside) + ", around " + fmt(r.around) + ") "));
      li.appendChild(auditLink(r.unit));
      list.appendChild(li);
    });
    box.appendChild(list);
  }
  function renderRow() {
    var box = $("unit-row"), L = layer(), row = (L.rows || [])[state.unit];
    box.innerHTML = "";
    box.appendChild(el("h3", {}, L.prefix + " unit " + state.unit));
    if (Array.isArray(row) && Array.isArray(L.columns)) {
      var table = el("table", {}), head = el("tr", {}), body = el("tr", {});
      L.columns.forEach(function (c, i) { head.appendChild(el("th", {}, c)); body.appendChild(el("td", {}, fmt(row[i]))); });
      var thead = el("thead", {}), tbody = el("tbody", {});
      thead.appendChild(head); tbody.appendChild(body);
      table.appendChild(thead); table.appendChild(tbody);
      box.appendChild(table);
    }
    var flags = (L.flags || [])[state.unit] || [];
    box.appendChild(el("p", {"class": "flags"}, "flags: " + (flags.length ? flags.join(", ") : "none")));
    var link = auditLink(state.unit);
    link.id = "unit-row-link";
    link.textContent = "jump to its row in the audit table";
    box.appendChild(link);
  }
  function markSpan() {
    var toks = document.querySelectorAll("#text .tok.valid");
    for (var i = 0; i < toks.length; i++) {
      var p = Number(toks[i].getAttribute("data-pos"));
      var inside = state.span && p >= state.span[0] && p <= state.span[1];
      toks[i].classList.toggle("in-span", !!inside);
    }
    var seq = sequence();
    spanLine.textContent = state.span && seq
      ? "Selected steps " + seq.steps[state.span[0]] + "–" + seq.steps[state.span[1]] + " (" + (state.span[1] - state.span[0] + 1) + " valid steps)."
      : "No span selected.";
  }
  function render() {
    renderSelects();
    renderQuick();
    renderText();
    renderCharts();
    renderResults();
    renderRow();
  }
  function pickQuantity(L, wanted) {
    var qs = quantities(L);
    if (qs.indexOf(wanted) >= 0) return wanted;
    return ["c", "h"].filter(function (q) { return qs.indexOf(q) >= 0; })[0] || qs[0] || "h";
  }
  // A span is kept while the layer and sequence stay: it still means the same steps.
  function choose(layerIndex, unit, quantity) {
    if (layerIndex !== state.layer) { state.span = null; state.anchor = null; }
    state.layer = layerIndex;
    var L = layer();
    state.unit = Math.max(0, Math.min((L.units || 1) - 1, Number(unit) || 0));
    state.quantity = pickQuantity(L, quantity);
    render();
  }
  function jump(prefix, unit) {
    var id = rowId(prefix, unit), old = document.querySelectorAll(".explorer-target");
    for (var i = 0; i < old.length; i++) old[i].classList.remove("explorer-target");
    var target = document.getElementById(id);
    if (target) target.classList.add("explorer-target");
    location.hash = id;
  }
  function setSpan(a, b) {
    state.span = [Math.min(a, b), Math.max(a, b)];
    markSpan();
    renderCharts();
    renderResults();
  }

  $("layer-select").addEventListener("change", function (e) {
    var i = Number(e.target.value), top = ((R.active_units || {})[R.layers[i].prefix] || [])[0];
    choose(i, top === undefined ? 0 : top, state.quantity);
  });
  $("unit-select").addEventListener("change", function (e) { choose(state.layer, Number(e.target.value), state.quantity); });
  $("quantity-select").addEventListener("change", function (e) { choose(state.layer, state.unit, e.target.value); });
  $("sequence-select").addEventListener("change", function (e) {
    state.sequence = Number(e.target.value);
    state.span = null;
    state.anchor = null;
    render();
  });
  var text = $("text");
  function tokenPos(e) {
    var t = e.target && e.target.closest ? e.target.closest(".tok.valid") : null;
    return t ? Number(t.getAttribute("data-pos")) : null;
  }
  text.addEventListener("mousedown", function (e) {
    var p = tokenPos(e);
    if (p === null) return;
    e.preventDefault();
    if (e.shiftKey && state.anchor !== null) { setSpan(state.anchor, p); return; }
    state.anchor = p;
    state.dragging = true;
    setSpan(p, p);
  });
  text.addEventListener("mouseover", function (e) {
    var p = tokenPos(e);
    if (state.dragging && p !== null && e.buttons === 1) setSpan(state.anchor, p);
  });
  document.addEventListener("mouseup", function () { state.dragging = false; });

  var init = R.initial || {};
  var start = R.layers.map(function (l) { return l.prefix; }).indexOf(init.layer);
  state.sequence = Math.max(0, Math.min(shownCount() - 1, Number(init.sequence) || 0));
  renderNote();
  choose(start >= 0 ? start : 0, init.unit, init.quantity || "c");
})();
