// gradlens TensorBoard plugin frontend: a plain ES module, no build step.
// TensorBoard loads it in an iframe whose base is /data/plugin/gradlens/ and calls render().

const POLL_MS = 5000;
const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
const KIND_COLOURS = {grad_norm: "#ff7f0e", grad_norm_global: "#d62728", nonfinite: "#000000",
  loss: "#9467bd", skipped_step: "#8c564b", validity: "#e377c2", spam: "#17becf"};
const CSS = `
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:12px;color:#1c2833;
font-size:13px}
h2{font-size:15px;margin:18px 0 6px;border-bottom:1px solid #d5d8dc;padding-bottom:3px}
.gl-controls label{margin-right:14px}.gl-controls select{margin-left:4px}
.gl-status{color:#566573;font-size:12px;margin-left:8px}
.gl-panels{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
.gl-panel h3{font-size:13px;margin:4px 0}
.gl-map{position:relative}
.gl-labels{position:absolute;left:0;top:0;font-size:10px;line-height:10px;white-space:nowrap}
.gl-label{position:absolute;right:0;text-align:right}
.gl-band{position:absolute;width:10px}
.gl-bandname{position:absolute;font-size:10px;writing-mode:vertical-rl;transform:rotate(180deg);
color:#333}
.gl-axis{position:absolute;font-size:10px;color:#566573;white-space:nowrap}
canvas{display:block}
#gl-tooltip{position:fixed;pointer-events:none;background:rgba(28,40,51,.92);color:#fff;
padding:4px 7px;border-radius:3px;font-size:12px;display:none;z-index:10;white-space:pre}
table.gl-table{border-collapse:collapse;font-size:12px}
table.gl-table th,table.gl-table td{border:1px solid #d5d8dc;padding:2px 6px;text-align:left;
vertical-align:top}
table.gl-table th{background:#eaf2f8}
.gl-legend{display:flex;align-items:center;gap:8px;margin:8px 0}
.gl-legend-ticks{position:relative;height:14px;font-size:10px}
.gl-roles{display:flex;gap:16px;flex-wrap:wrap}
.gl-error{color:#922b21}
.gl-note{color:#566573;font-size:12px}
`;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") e.style.cssText = v; else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

async function getJSON(route, params = {}) {
  const q = new URLSearchParams(params).toString();
  const resp = await fetch(route + (q ? "?" + q : ""));
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(3) : Number(v.toPrecision(4)).toString();
}

function colour(t) {
  const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}

function logScale(vmin, vmax) {
  const lo = Math.log10(vmin), hi = Math.log10(vmax);
  const span = hi - lo;
  return (v) => (v === null || !(v > 0) ? null : span > 0 ? (Math.log10(v) - lo) / span : 0.5);
}

const state = {runs: [], a: null, b: "", stat: null, agg: "max", versions: "", timer: null};

export async function render() {
  document.head.append(el("style", {text: CSS}));
  document.body.append(
    el("div", {class: "gl-controls", id: "gl-controls"}),
    el("h2", {text: "Heatmap"}),
    el("div", {class: "gl-panels", id: "gl-panels"}),
    el("div", {class: "gl-legend", id: "gl-legend"}),
    el("h2", {text: "Role summary (median over the role's layers, min-max band)"}),
    el("div", {class: "gl-roles", id: "gl-roles"}),
    el("h2", {text: "Events (spikes, skipped steps, validity)"}),
    el("div", {id: "gl-events"}),
    el("h2", {text: "Verdicts"}),
    el("div", {id: "gl-verdicts"}),
    el("div", {id: "gl-tooltip"}),
  );
  try {
    state.runs = (await getJSON("runs")).runs;
  } catch (err) {
    document.getElementById("gl-panels").append(el("p", {class: "gl-error", text: String(err)}));
    return;
  }
  if (!state.runs.length) {
    document.getElementById("gl-panels").append(el("p", {text: "No gradlens runs in the logdir."}));
    return;
  }
  const withData = state.runs.filter((r) => r.stats.length);
  state.a = (withData[0] || state.runs[0]).run;
  const stats = (withData[0] || state.runs[0]).stats;
  state.stat = stats.includes("grad_norm") ? "grad_norm" : stats[0] || null;
  buildControls();
  await refresh(true);
  state.timer = setInterval(() => refresh(false).catch(() => {}), POLL_MS);
}

function select(id, options, value, onChange) {
  const s = el("select", {id});
  for (const [v, text] of options) {
    const o = el("option", {value: v, text});
    if (v === value) o.selected = true;
    s.append(o);
  }
  s.addEventListener("change", () => { onChange(s.value); refresh(true); });
  return s;
}

function buildControls() {
  const c = document.getElementById("gl-controls");
  c.replaceChildren();
  const runOpts = state.runs.map((r) => [r.run, r.run === "." ? r.label : r.run]);
  const statsOf = (name) => (state.runs.find((r) => r.run === name) || {stats: []}).stats;
  const stats = [...new Set([...statsOf(state.a), ...(state.b ? statsOf(state.b) : [])])].sort();
  c.append(
    el("label", {text: "run"}, select("gl-run-a", runOpts, state.a, (v) => { state.a = v; })),
    el("label", {text: "beside it"}, select("gl-run-b", [["", "(none)"], ...runOpts], state.b,
      (v) => { state.b = v; })),
    el("label", {text: "statistic"}, select("gl-stat", stats.map((s) => [s, s]), state.stat,
      (v) => { state.stat = v; })),
    el("label", {text: "steps per column"}, select("gl-agg",
      [["max", "max"], ["mean", "mean"]], state.agg, (v) => { state.agg = v; })),
    el("span", {class: "gl-status", id: "gl-status"}),
  );
}

async function refresh(force) {
  const names = [state.a, state.b].filter((x) => x);
  if (!state.stat) return;
  const maps = await Promise.all(names.map((run) =>
    getJSON("heatmap", {run, stat: state.stat, agg: state.agg}).catch((e) => ({run, error: String(e)}))));
  const versions = JSON.stringify(maps.map((m) => m.version || m.error)) + state.stat + state.agg;
  document.getElementById("gl-status").textContent =
    `updated ${new Date().toLocaleTimeString()} (polls every ${POLL_MS / 1000} s)`;
  if (!force && versions === state.versions) return;
  state.versions = versions;
  const events = await Promise.all(names.map((run) => getJSON("events", {run}).catch(() => ({events: []}))));
  drawHeatmaps(maps, events);
  const roles = await Promise.all(names.map((run) =>
    getJSON("roles", {run, stat: state.stat}).catch((e) => ({run, error: String(e)}))));
  drawRoles(roles);
  drawEvents(names, events);
  const verdicts = await Promise.all(names.map((run) => getJSON("verdicts", {run}).catch((e) => ({run, error: String(e), verdicts: []}))));
  drawVerdicts(verdicts);
}

// ------------------------------------------------------------------ heatmap

function drawHeatmaps(maps, events) {
  const panels = document.getElementById("gl-panels");
  panels.replaceChildren();
  const ok = maps.filter((m) => !m.error && m.vmin !== null);
  const vmin = Math.min(...ok.map((m) => m.vmin)), vmax = Math.max(...ok.map((m) => m.vmax));
  const scale = ok.length ? logScale(vmin, vmax) : () => null;
  const width = maps.length > 1 ? 520 : 1000;
  maps.forEach((m, i) => {
    const panel = el("div", {class: "gl-panel"}, el("h3", {text: `${m.run} · ${state.stat}`}));
    if (m.error) panel.append(el("p", {class: "gl-error", text: m.error}));
    else panel.append(heatmap(m, events[i].events || [], scale, width));
    panels.append(panel);
  });
  drawLegend(ok.length ? vmin : null, ok.length ? vmax : null);
}

function heatmap(m, events, scale, width) {
  const nL = m.layers.length, nC = m.columns.length;
  const rh = Math.max(2, Math.min(16, Math.floor(640 / Math.max(nL, 1))));
  const cw = Math.max(1, Math.floor(width / Math.max(nC, 1)));
  const W = cw * nC, H = rh * nL, LABEL_W = 150, BAND_W = 14, TOP = 22, STRIP = 8;
  const wrap = el("div", {class: "gl-map", style: `width:${LABEL_W + BAND_W + W + 8}px;height:${TOP + STRIP + H + 18}px`});
  // role bands and their names
  for (const b of m.roles) {
    wrap.append(el("div", {class: "gl-band", style:
      `left:${LABEL_W}px;top:${TOP + STRIP + b.first * rh}px;height:${b.rows * rh}px;background:${b.color || "#bbb"}`}));
    if (b.rows * rh >= 40) {
      wrap.append(el("div", {class: "gl-bandname", text: b.role, style:
        `left:${LABEL_W - 12}px;top:${TOP + STRIP + b.first * rh + 2}px;height:${b.rows * rh - 4}px`}));
    }
  }
  // layer labels as DOM text; every k-th when rows are thin
  const k = Math.ceil(11 / rh);
  const labels = el("div", {class: "gl-labels", style: `width:${LABEL_W - 14}px;top:${TOP + STRIP}px`});
  m.layers.forEach((l, i) => {
    if (i % k) return;
    labels.append(el("div", {class: "gl-label", title: l.name, "data-layer": l.name, text: l.label,
      style: `top:${i * rh + Math.max(0, (rh - 10) / 2)}px`}));
  });
  wrap.append(labels);
  // step axis: first, middle, last column
  const left = LABEL_W + BAND_W;
  for (const c of [0, Math.floor(nC / 2), nC - 1]) {
    if (c < 0) continue;
    wrap.append(el("div", {class: "gl-axis", text: `step ${m.columns[c][0]}`,
      style: `left:${left + c * cw}px;top:4px`}));
  }
  wrap.append(el("div", {class: "gl-axis", text:
    `${m.n_steps} logged steps in ${nC} columns (${m.agg} per column)`,
    style: `left:${left}px;top:${TOP + STRIP + H + 4}px`}));
  // cells
  const img = new ImageData(nC, nL);
  for (let r = 0; r < nL; r++) {
    for (let c = 0; c < nC; c++) {
      const t = scale(m.values[r][c]);
      const rgb = t === null ? [204, 204, 204] : colour(t);
      const o = 4 * (r * nC + c);
      img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 255;
    }
  }
  const small = el("canvas"); small.width = nC; small.height = nL;
  small.getContext("2d").putImageData(img, 0, 0);
  const canvas = el("canvas", {class: "gl-heatmap", style:
    `position:absolute;left:${left}px;top:${TOP + STRIP}px`});
  canvas.width = W; canvas.height = H;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, W, H);
  // events: per-layer ones as marks on their cell, global ones on the strip above
  const strip = el("canvas", {style: `position:absolute;left:${left}px;top:${TOP}px`});
  strip.width = W; strip.height = STRIP;
  const sctx = strip.getContext("2d");
  const colOf = (step) => {
    let lo = 0, hi = nC - 1;
    if (step < m.columns[0][0] || step > m.columns[nC - 1][1]) return -1;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (m.columns[mid][1] < step) lo = mid + 1; else hi = mid; }
    return lo;
  };
  const rowOf = new Map(m.layers.map((l, i) => [l.name, i]));
  const eventsAt = new Map();
  for (const e of events) {
    const c = colOf(e.step);
    if (c < 0) continue;
    if (!eventsAt.has(c)) eventsAt.set(c, []);
    eventsAt.get(c).push(e);
    const colr = KIND_COLOURS[e.kind] || "#444";
    if (rowOf.has(e.layer)) {
      const r = rowOf.get(e.layer);
      ctx.strokeStyle = "#fff"; ctx.fillStyle = colr; ctx.lineWidth = 1;
      const s = Math.max(3, Math.min(cw, rh, 8));
      ctx.beginPath(); ctx.arc(c * cw + cw / 2, r * rh + rh / 2, s / 2 + 1, 0, 2 * Math.PI);
      ctx.fill(); ctx.stroke();
    }
    sctx.fillStyle = colr;
    sctx.beginPath(); sctx.moveTo(c * cw + cw / 2 - 4, 0); sctx.lineTo(c * cw + cw / 2 + 4, 0);
    sctx.lineTo(c * cw + cw / 2, STRIP); sctx.fill();
  }
  const tip = document.getElementById("gl-tooltip");
  canvas.addEventListener("mousemove", (ev) => {
    const rect = canvas.getBoundingClientRect();
    const c = Math.floor((ev.clientX - rect.left) / cw), r = Math.floor((ev.clientY - rect.top) / rh);
    if (c < 0 || c >= nC || r < 0 || r >= nL) { tip.style.display = "none"; return; }
    const [s0, s1] = m.columns[c];
    const evs = (eventsAt.get(c) || []).filter((e) => e.layer === m.layers[r].name || !rowOf.has(e.layer));
    tip.textContent = `${m.layers[r].name} (${m.layers[r].role})\nstep ${s0 === s1 ? s0 : `${s0}–${s1}`}\n` +
      `${state.stat} = ${fmt(m.values[r][c])}` +
      (evs.length ? "\n" + evs.slice(0, 4).map((e) => `event ${e.kind} at step ${e.step}`).join("\n") : "");
    tip.style.display = "block";
    tip.style.left = `${ev.clientX + 14}px`; tip.style.top = `${ev.clientY + 10}px`;
  });
  canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  wrap.append(strip, canvas);
  return wrap;
}

function drawLegend(vmin, vmax) {
  const box = document.getElementById("gl-legend");
  box.replaceChildren();
  if (vmin === null) { box.append(el("span", {text: "no positive values to colour"})); return; }
  const W = 300, c = el("canvas", {id: "gl-legend-bar"});
  c.width = W; c.height = 12;
  const ctx = c.getContext("2d");
  for (let x = 0; x < W; x++) { ctx.fillStyle = `rgb(${colour(x / (W - 1)).join(",")})`; ctx.fillRect(x, 0, 1, 12); }
  const ticks = el("div", {class: "gl-legend-ticks", style: `width:${W}px`});
  const lo = Math.log10(vmin), hi = Math.log10(vmax);
  for (const f of [0, 0.5, 1]) {
    const v = Math.pow(10, lo + f * (hi - lo));
    ticks.append(el("span", {class: "gl-legend-tick", text: fmt(v),
      style: `position:absolute;left:${f * W - (f === 1 ? 40 : f === 0.5 ? 20 : 0)}px`}));
  }
  box.append(el("span", {text: `${state.stat} (log scale, shared):`}),
    el("div", {}, c, ticks),
    el("span", {class: "gl-note", text: "grey: no value or ≤ 0"}));
}

// ------------------------------------------------------------------ role summary

function drawRoles(results) {
  const box = document.getElementById("gl-roles");
  box.replaceChildren();
  for (const res of results) {
    if (res.error) { box.append(el("p", {class: "gl-error", text: `${res.run}: ${res.error}`})); continue; }
    for (const [role, s] of Object.entries(res.roles)) {
      box.append(roleChart(res, role, s));
    }
  }
}

function roleChart(res, role, s) {
  const W = 300, H = 140, P = 36;
  const vals = [...s.min, ...s.max, ...s.median].filter((v) => v !== null && v > 0);
  const fig = el("div", {class: "gl-role"}, el("div", {text: `${res.run} · ${role} (${s.layers} layers)`}));
  const c = el("canvas"); c.width = W; c.height = H;
  fig.append(c);
  if (!vals.length) { fig.append(el("div", {class: "gl-note", text: "no positive values"})); return fig; }
  const lo = Math.log10(Math.min(...vals)), hi = Math.log10(Math.max(...vals));
  const y = (v) => H - 14 - ((hi > lo ? (Math.log10(v) - lo) / (hi - lo) : 0.5) * (H - 24));
  const n = res.columns.length, x = (i) => P + (n > 1 ? i / (n - 1) : 0.5) * (W - P - 6);
  const ctx = c.getContext("2d");
  const colr = s.color || "#555";  // the kind's colour, served (gradlens.kinds)
  ctx.fillStyle = colr; ctx.globalAlpha = 0.2; ctx.beginPath();
  let started = false;
  for (let i = 0; i < n; i++) { if (s.max[i] > 0) { ctx[started ? "lineTo" : "moveTo"](x(i), y(s.max[i])); started = true; } }
  for (let i = n - 1; i >= 0; i--) { if (s.min[i] > 0) ctx.lineTo(x(i), y(s.min[i])); else if (s.max[i] > 0) ctx.lineTo(x(i), H - 14); }
  ctx.fill(); ctx.globalAlpha = 1;
  ctx.strokeStyle = colr; ctx.lineWidth = 1.5; ctx.beginPath(); started = false;
  for (let i = 0; i < n; i++) { if (s.median[i] > 0) { ctx[started ? "lineTo" : "moveTo"](x(i), y(s.median[i])); started = true; } }
  ctx.stroke();
  ctx.fillStyle = "#566573"; ctx.font = "10px sans-serif";
  ctx.fillText(fmt(Math.pow(10, hi)), 0, 12); ctx.fillText(fmt(Math.pow(10, lo)), 0, H - 16);
  ctx.fillText(`step ${res.columns[0][0]}`, P, H - 2);
  const last = `step ${res.columns[n - 1][1]}`;
  ctx.fillText(last, W - 6 - ctx.measureText(last).width, H - 2);
  return fig;
}

// ------------------------------------------------------------------ tables

function table(rows, cols) {
  const t = el("table", {class: "gl-table"});
  t.append(el("tr", {}, ...cols.map((c) => el("th", {text: c}))));
  for (const r of rows) {
    t.append(el("tr", {}, ...cols.map((c) => el("td", {text: Array.isArray(r[c]) ? r[c].join(", ") : fmt(r[c])}))));
  }
  return t;
}

function drawEvents(names, events) {
  const box = document.getElementById("gl-events");
  box.replaceChildren();
  names.forEach((name, i) => {
    const rows = (events[i].events || []).map((e) => ({run: name, ...e}));
    const kinds = Object.entries(events[i].kinds || {}).map(([k, n]) => `${k}: ${n}`).join(", ");
    box.append(el("p", {text: `${name}: ${rows.length} event(s)${kinds ? ` (${kinds})` : ""}`}));
    if (!rows.length) return;
    const cols = ["run", "step", "kind", "layer"];
    for (const r of rows) for (const k of Object.keys(r)) if (!cols.includes(k)) cols.push(k);
    const shown = rows.slice(-200);
    if (rows.length > shown.length) box.append(el("p", {class: "gl-note", text: `the last ${shown.length} shown`}));
    box.append(table(shown, cols));
  });
}

function drawVerdicts(results) {
  const box = document.getElementById("gl-verdicts");
  box.replaceChildren();
  for (const res of results) {
    if (!res.verdicts.length) {
      box.append(el("p", {class: "gl-note", text: `${res.run}: ${res.error || res.hint || "no verdicts"}`}));
      continue;
    }
    box.append(el("p", {class: "gl-note", text: `${res.run}: from ${res.source}`}));
    const computed = res.verdicts.filter((v) => v.answer !== "not computable");
    const missing = res.verdicts.filter((v) => v.answer === "not computable");
    // the report's own summary cells (gradlens.report.summary): same numbers, same words
    const cols = ["question", "answer", "effect size", "p-value", "fraction of steps"];
    const rows = computed.map((v) => ({...(v.summary || {question: v.question, answer: v.answer,
      "effect size": "(report predates summaries: rerun gradlens report)"}), reason: v.reason}));
    if (rows.length) box.append(table(rows, [...cols, "reason"]));
    if (missing.length) {
      box.append(el("p", {class: "gl-note", text: `not computable (${missing.length}): ` +
        missing.map((v) => `${v.stat || v.kind}: ${v.reason}`).join("; ")}));
    }
  }
}
