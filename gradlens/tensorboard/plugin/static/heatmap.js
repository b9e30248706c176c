// gradlens plugin: the heatmap at real model size, laid out in the browser from the data the
// /heatmap route already sent. Rows: grouped by block (collapsible) or by role, or sorted by the
// shown statistic; a name/role filter; a step range (zoom: index.js asks the server for the
// range binned afresh when the whole run's columns are wider than a step); a colour scale of the kind the report
// gives the statistic (log, symmetric log on a diverging map, or linear: the route's `scale`),
// clipped at percentiles computed without the flagged (event) steps by default.

export const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
// signed statistics (symlog): blue below zero, white at zero, red above (ColorBrewer RdBu, reversed)
export const DIVERGING = [[5, 48, 97], [33, 102, 172], [67, 147, 195], [146, 197, 222],
  [209, 229, 240], [247, 247, 247], [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43],
  [103, 0, 31]];
// one colour per layer kind (gradlens.kinds.KIND_COLORS); the colours the server sends with
// each heatmap's bands replace these (index.js), so the two cannot drift apart
export const ROLE_COLOURS = {embedding: "#1f77b4", attention: "#ff7f0e", mlp: "#2ca02c",
  norms: "#9467bd", output: "#d62728", other: "#7f7f7f"};
const KIND_COLOURS = {grad_norm: "#ff7f0e", grad_norm_global: "#d62728", nonfinite: "#000000",
  loss: "#9467bd", skipped_step: "#8c564b", validity: "#e377c2", spam: "#17becf"};
const NOT_FLAGGING = new Set(["validity"]);  // event kinds that do not flag a step
const RH = 12;  // row height: every row carries its label
const BLOCK_RE = /(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\./;

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") e.style.cssText = v; else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

export function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(3) : Number(v.toPrecision(4)).toString();
}

export function colour(t, map = VIRIDIS) {
  const x = Math.min(Math.max(t, 0), 1) * (map.length - 1);
  const i = Math.min(Math.floor(x), map.length - 2), f = x - i;
  return map[i].map((c, k) => Math.round(c + f * (map[i + 1][k] - c)));
}

function quantile(sorted, q) {
  if (!sorted.length) return null;
  const x = (sorted.length - 1) * Math.min(Math.max(q, 0), 1), i = Math.floor(x);
  return i + 1 < sorted.length ? sorted[i] + (x - i) * (sorted[i + 1] - sorted[i]) : sorted[i];
}

function median(xs) {
  const s = xs.filter((v) => v !== null && Number.isFinite(v)).sort((a, b) => a - b);
  return s.length ? quantile(s, 0.5) : null;
}

/** The block a tensor belongs to: "block N" for a repeated block, else its role. */
export function groupOf(layer) {
  const m = BLOCK_RE.exec(layer.name);
  if (m) return {key: `block ${m[1]}`, rank: 1, index: Number(m[1])};
  const r = layer.role || "other";
  return {key: r, rank: r === "embedding" ? 0 : 2, index: 0};
}

/** Steps that carry an event (other than validity notes): spikes, non-finite, skipped. */
export function flaggedSteps(events) {
  return new Set(events.filter((e) => !NOT_FLAGGING.has(e.kind)).map((e) => e.step));
}

/** Column indices inside the zoom range ([from, to] steps, null ends open). */
export function zoomColumns(m, zoom) {
  const out = [];
  m.columns.forEach(([s0, s1], c) => {
    if ((zoom.from === null || s1 >= zoom.from) && (zoom.to === null || s0 <= zoom.to)) out.push(c);
  });
  return out;
}

function matches(layer, filter) {
  if (!filter) return true;
  const hay = `${layer.name} ${layer.label} ${layer.role} ${groupOf(layer).key}`.toLowerCase();
  return filter.toLowerCase().split(/\s+/).filter((t) => t).some((t) => hay.includes(t));
}

/**
 * The rows to draw: [{kind: "layer"|"group", label, name?, group, role, values, members}] and
 * the group boundaries. view: {order, filter, collapsed (Set), cols, clean (column mask)}.
 */
export function layoutRows(m, view) {
  const idx = m.layers.map((l, i) => i).filter((i) => matches(m.layers[i], view.filter));
  const score = (i) => median(view.cols.filter((c) => view.clean[c]).map((c) => m.values[i][c]));
  const layerRow = (i) => ({kind: "layer", name: m.layers[i].name, label: m.layers[i].label,
    role: m.layers[i].role, values: m.values[i], group: groupOf(m.layers[i]).key});
  if (view.order === "value") {
    const s = new Map(idx.map((i) => [i, score(i)]));
    idx.sort((a, b) => (s.get(b) ?? -Infinity) - (s.get(a) ?? -Infinity));
    return idx.map(layerRow);
  }
  const groups = new Map();
  for (const i of idx) {
    const g = view.order === "block" ? groupOf(m.layers[i])
      : {key: m.layers[i].role || "other", rank: 0, index: 0};
    if (!groups.has(g.key)) groups.set(g.key, {...g, first: i, members: []});
    groups.get(g.key).members.push(i);
  }
  const ordered = [...groups.values()].sort((a, b) =>
    a.rank - b.rank || a.index - b.index || a.first - b.first);
  const rows = [];
  for (const g of ordered) {
    if (view.collapsed.has(g.key)) {
      const values = m.columns.map((_, c) => {
        const vs = g.members.map((i) => m.values[i][c]).filter((v) => v !== null);
        return vs.length ? Math.max(...vs) : null;
      });
      rows.push({kind: "group", label: `${g.members.length} tensor${g.members.length === 1 ? "" : "s"} (max)`, group: g.key,
        role: "", values, members: g.members.length, head: true});
    } else {
      g.members.forEach((i, k) => rows.push({...layerRow(i), group: g.key, head: k === 0,
        members: g.members.length}));
    }
  }
  return rows;
}

/**
 * The scale of the runs shown, from each heatmap's `scale` (the report's choice,
 * gradlens.report.scales): symlog when any run's is (the smallest linthresh), log when one run's
 * is and every run's values are positive, else linear; log when the server sent none.
 */
export function scaleKind(maps) {
  const s = maps.map((m) => m && m.scale).filter((x) => x);
  if (!s.length) return {kind: "log"};
  const sym = s.filter((x) => x.kind === "symlog");
  if (sym.length) return {kind: "symlog", linthresh: Math.min(...sym.map((x) => x.linthresh))};
  if (s.some((x) => x.kind === "log") && s.every((x) => x.min > 0)) return {kind: "log"};
  return {kind: "linear"};
}

/**
 * The forward and inverse transforms of a scale. symlog is matplotlib's SymLogNorm (base 10,
 * linscale 1, as the report's): f(v) = v a within +-L, sign(v) L (a + log10(|v| / L)) beyond,
 * a = 1 / (1 - 1/10). log: log10 (v <= 0: no colour). linear: the identity.
 */
export function transform(scale) {
  if (scale.kind === "log") return {f: (v) => (v > 0 ? Math.log10(v) : null), inv: (y) => Math.pow(10, y)};
  if (scale.kind === "linear") return {f: (v) => v, inv: (y) => y};
  const L = scale.linthresh, a = 10 / 9;
  return {
    f: (v) => (Math.abs(v) <= L ? v * a : Math.sign(v) * L * (a + Math.log10(Math.abs(v) / L))),
    inv: (y) => (Math.abs(y) <= L * a ? y / a : Math.sign(y) * L * Math.pow(10, Math.abs(y) / L - a)),
  };
}

/**
 * Colour limits: the lo/hi percentiles of the transformed values of the shown, clean cells
 * (log: the positive ones). symlog: symmetric about zero (+-the larger end), so that zero is
 * the diverging map's white centre. Returns {kind, linthresh, lo, hi (transformed), vmin, vmax}.
 */
export function colourLimits(layouts, lo, hi, scale = {kind: "log"}) {
  const {f, inv} = transform(scale);
  const vals = [];
  for (const {rows, cols, clean} of layouts) {
    for (const r of rows) for (const c of cols) {
      const v = r.values[c];
      const y = clean[c] && v !== null && Number.isFinite(v) ? f(v) : null;
      if (y !== null) vals.push(y);
    }
  }
  if (!vals.length) return null;
  vals.sort((a, b) => a - b);
  let a = quantile(vals, lo / 100), b = Math.max(a, quantile(vals, hi / 100));
  if (scale.kind === "symlog") { b = Math.max(Math.abs(a), Math.abs(b)); a = -b; }
  return {...scale, lo: a, hi: b, vmin: inv(a), vmax: inv(b), n: vals.length,
    map: scale.kind === "symlog" ? DIVERGING : VIRIDIS, f, inv};
}

/** The colour position (0..1) of a value, null for no colour (no value; <= 0 on a log scale). */
function position(limits, v) {
  if (!limits || v === null || !Number.isFinite(v)) return null;
  const y = limits.f(v);
  if (y === null) return null;
  return limits.hi > limits.lo ? (y - limits.lo) / (limits.hi - limits.lo) : 0.5;
}

/**
 * One run's heatmap. ctx: {m, events, rows, cols, limits, width, stat, view, onToggle, onZoom}.
 */
export function drawHeatmap(ctxt) {
  const {m, events, rows, cols, limits, width, stat} = ctxt;
  const nR = rows.length, nC = cols.length;
  const cw = Math.max(1, Math.min(40, Math.floor(width / Math.max(nC, 1))));
  const GROUP_W = 118, LABEL_W = 190, BAND_W = 10, TOP = 24, STRIP = 8;
  const left = GROUP_W + LABEL_W + BAND_W, W = cw * nC, H = RH * nR;
  const wrap = el("div", {class: "gl-map",
    style: `width:${left + W + 8}px;height:${TOP + STRIP + H + 20}px`});
  const y0 = TOP + STRIP;
  rows.forEach((r, i) => {
    const y = y0 + i * RH;
    if (r.head && ctxt.view.order !== "value") {
      const g = el("div", {class: "gl-group", "data-group": r.group, "data-rows": String(r.members),
        title: "click to collapse or expand", text: `${ctxt.view.collapsed.has(r.group) ? "▸" : "▾"} ${r.group}`,
        style: `left:0;top:${y}px;width:${GROUP_W - 6}px`});
      g.addEventListener("click", () => ctxt.onToggle(r.group));
      wrap.append(g);
      if (i > 0) wrap.append(el("div", {class: "gl-sep", style: `top:${y - 1}px;width:${left + W}px`}));
    }
    const attrs = r.kind === "layer" ? {"data-layer": r.name, title: `${r.name} (${r.role})`}
      : {"data-group-row": r.group, "data-rows": String(r.members), title: `${r.group}: max over its ${r.members} tensors`};
    wrap.append(el("div", {class: `gl-label${r.kind === "group" ? " gl-group-row" : ""}`, ...attrs,
      text: r.label, style: `left:${GROUP_W}px;top:${y}px;width:${LABEL_W - 6}px`}));
    wrap.append(el("div", {class: "gl-band", style:
      `left:${GROUP_W + LABEL_W}px;top:${y}px;height:${RH}px;background:${ROLE_COLOURS[r.role] || "#bbb"}`}));
  });
  // step axis: about six ticks
  const nt = Math.min(nC, 6);
  for (let t = 0; t < nt; t++) {
    const k = nt > 1 ? Math.round(t * (nC - 1) / (nt - 1)) : 0;
    wrap.append(el("div", {class: "gl-axis", text: `step ${m.columns[cols[k]][0]}`,
      style: `left:${left + k * cw}px;top:4px`}));
  }
  const first = nC ? m.columns[cols[0]][0] : "–", last = nC ? m.columns[cols[nC - 1]][1] : "–";
  wrap.append(el("div", {class: "gl-axis", text:
    `steps ${first}–${last}: ${nC} columns of ${m.n_steps} logged steps (${m.agg} per column` +
    `${m.width > 1 ? `, ${m.width} steps wide` : ""}); drag across the map to zoom`,
    style: `left:${left}px;top:${y0 + H + 4}px`}));
  // cells
  const img = new ImageData(Math.max(nC, 1), Math.max(nR, 1));
  rows.forEach((r, i) => cols.forEach((c, j) => {
    const t = position(limits, r.values[c]);
    const rgb = t === null ? [204, 204, 204] : colour(t, limits.map);
    const o = 4 * (i * nC + j);
    img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 255;
  }));
  const small = el("canvas"); small.width = Math.max(nC, 1); small.height = Math.max(nR, 1);
  small.getContext("2d").putImageData(img, 0, 0);
  const canvas = el("canvas", {class: "gl-heatmap", "data-columns": String(nC), "data-width": String(m.width || 1),
    style: `position:absolute;left:${left}px;top:${y0}px`});
  canvas.width = Math.max(W, 1); canvas.height = Math.max(H, 1);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, W, H);
  ctx.fillStyle = "#fff";
  rows.forEach((r, i) => { if (r.head && i > 0 && ctxt.view.order !== "value") ctx.fillRect(0, i * RH - 1, W, 2); });
  // events: per-layer ones on their cell, every one on the strip above
  const strip = el("canvas", {style: `position:absolute;left:${left}px;top:${TOP}px`});
  strip.width = Math.max(W, 1); strip.height = STRIP;
  const sctx = strip.getContext("2d");
  const colOf = (step) => cols.findIndex((c) => m.columns[c][0] <= step && step <= m.columns[c][1]);
  const rowOf = new Map();
  rows.forEach((r, i) => { if (r.kind === "layer") rowOf.set(r.name, i); });
  const eventsAt = new Map();
  for (const e of events) {
    const j = colOf(e.step);
    if (j < 0) continue;
    if (!eventsAt.has(j)) eventsAt.set(j, []);
    eventsAt.get(j).push(e);
    const colr = KIND_COLOURS[e.kind] || "#444";
    if (rowOf.has(e.layer)) {
      const i = rowOf.get(e.layer), s = Math.max(3, Math.min(cw, RH, 8));
      ctx.strokeStyle = "#fff"; ctx.fillStyle = colr; ctx.lineWidth = 1;
      ctx.beginPath(); ctx.arc(j * cw + cw / 2, i * RH + RH / 2, s / 2 + 1, 0, 2 * Math.PI);
      ctx.fill(); ctx.stroke();
    }
    sctx.fillStyle = colr;
    sctx.beginPath(); sctx.moveTo(j * cw + cw / 2 - 4, 0); sctx.lineTo(j * cw + cw / 2 + 4, 0);
    sctx.lineTo(j * cw + cw / 2, STRIP); sctx.fill();
  }
  const tip = document.getElementById("gl-tooltip");
  const cell = (ev) => {
    const rect = canvas.getBoundingClientRect();
    return [Math.floor((ev.clientY - rect.top) / RH), Math.floor((ev.clientX - rect.left) / cw)];
  };
  let dragFrom = null;
  const band = el("div", {class: "gl-zoomband", style: `top:${y0}px;height:${H}px;display:none`});
  canvas.addEventListener("mousedown", (ev) => { dragFrom = cell(ev)[1]; ev.preventDefault(); });
  canvas.addEventListener("mouseup", (ev) => {
    const j = cell(ev)[1];
    if (dragFrom !== null && j !== dragFrom && j >= 0 && j < nC) {
      const a = Math.min(j, dragFrom), b = Math.max(j, dragFrom);
      ctxt.onZoom(m.columns[cols[a]][0], m.columns[cols[b]][1]);
    }
    dragFrom = null;
  });
  canvas.addEventListener("mousemove", (ev) => {
    const [i, j] = cell(ev);
    if (dragFrom !== null && j >= 0 && j < nC) {
      const a = Math.min(j, dragFrom), b = Math.max(j, dragFrom);
      band.style.cssText = `top:${y0}px;height:${H}px;left:${left + a * cw}px;width:${(b - a + 1) * cw}px`;
    }
    if (j < 0 || j >= nC || i < 0 || i >= nR) { tip.style.display = "none"; return; }
    const [s0, s1] = m.columns[cols[j]], r = rows[i];
    const evs = (eventsAt.get(j) || []).filter((e) => e.layer === r.name || !rowOf.has(e.layer));
    tip.textContent = `${r.kind === "layer" ? `${r.name} (${r.role})` : `${r.group}: max over ${r.members} tensors`}\n` +
      `step ${s0 === s1 ? s0 : `${s0}–${s1}`}\n${stat} = ${fmt(r.values[cols[j]])}` +
      (evs.length ? "\n" + evs.slice(0, 4).map((e) => `event ${e.kind} at step ${e.step}`).join("\n") : "");
    tip.style.display = "block";
    tip.style.left = `${ev.clientX + 14}px`; tip.style.top = `${ev.clientY + 10}px`;
  });
  canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  wrap.append(strip, canvas, band);
  return wrap;
}

export function drawLegend(box, limits, stat, view) {
  box.replaceChildren();
  if (!limits) { box.append(el("span", {text: "no values to colour (a log scale colours positive values)"})); return; }
  const W = 300, c = el("canvas", {id: "gl-legend-bar"});
  c.width = W; c.height = 12;
  const ctx = c.getContext("2d");
  for (let x = 0; x < W; x++) { ctx.fillStyle = `rgb(${colour(x / (W - 1), limits.map).join(",")})`; ctx.fillRect(x, 0, 1, 12); }
  // each tick's value is the inverse transform at its place on the bar
  const ticks = el("div", {class: "gl-legend-ticks", style: `width:${W}px`});
  const sym = limits.kind === "symlog";
  for (const f of sym ? [0, 0.25, 0.5, 0.75, 1] : [0, 0.5, 1]) {
    const y = limits.lo + f * (limits.hi - limits.lo);
    ticks.append(el("span", {class: "gl-legend-tick", "data-pos": String(f),
      text: fmt(limits.inv(y)), style: `position:absolute;left:${f * W - f * 40}px`}));
  }
  const how = `percentiles ${view.clipLo}–${view.clipHi} of the shown cells` +
    (view.ignoreFlagged ? ", flagged steps left out" : "");
  const name = `${limits.kind} scale, shared` + (sym ? `, linthresh=${fmt(limits.linthresh)}` : "");
  const grey = limits.kind === "log" ? "grey: no value or ≤ 0" : "grey: no value";
  const more = sym ? `; linear within ±linthresh, logarithmic beyond, symmetric about 0 (white)` : "";
  box.append(el("span", {text: `${stat} (${name}):`}), el("div", {}, c, ticks),
    el("span", {class: "gl-note", text: `${how}${more}; beyond the ends: the end colour; ${grey}`}));
}
