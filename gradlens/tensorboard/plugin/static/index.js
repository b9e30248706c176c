// gradlens TensorBoard plugin frontend: a plain ES module, no build step.
// TensorBoard loads it in an iframe whose base is /data/plugin/gradlens/ and calls render().

import {ROLE_COLOURS, colourLimits, drawHeatmap, drawLegend, el, flaggedSteps, fmt, layoutRows,
  scaleKind, transform, zoomColumns} from "./heatmap.js";

const POLL_MS = 5000;
const COLLAPSE_ABOVE = 160;  // more rows than this: blocks start collapsed
const CSS = `
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:12px;color:#1c2833;
font-size:13px}
h2{font-size:15px;margin:18px 0 6px;border-bottom:1px solid #d5d8dc;padding-bottom:3px}
.gl-controls label{margin-right:14px}.gl-controls select{margin-left:4px}
.gl-status{color:#566573;font-size:12px;margin-left:8px}
.gl-panels{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
.gl-panel h3{font-size:13px;margin:4px 0}
.gl-map{position:relative}
.gl-view{margin:6px 0;display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center}
.gl-view input{font-size:12px}.gl-view input[type=number]{width:64px}
.gl-label{position:absolute;font-size:10px;line-height:12px;height:12px;white-space:nowrap;
overflow:hidden;text-overflow:ellipsis;text-align:right}
.gl-group-row{font-weight:600}
.gl-group{position:absolute;font-size:11px;line-height:12px;font-weight:600;cursor:pointer;
white-space:nowrap;color:#1c2833}
.gl-sep{position:absolute;left:0;height:0;border-top:1px solid #aab7b8}
.gl-band{position:absolute;width:8px}
.gl-zoomband{position:absolute;background:rgba(255,255,255,.35);border:1px solid #fff;
pointer-events:none}
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

async function getJSON(route, params = {}) {
  const q = new URLSearchParams(params).toString();
  const resp = await fetch(route + (q ? "?" + q : ""));
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

// fullWidth: the whole run's steps per column (null: not fetched yet for this run/statistic);
// wider than 1, a zoom asks the server for the range, binned afresh (finer columns)
const state = {runs: [], a: null, b: "", stat: null, agg: "max", versions: "", timer: null,
  scale: {kind: "log"}, fullWidth: null, expand: null, fullScale: {}};

export async function render() {
  document.head.append(el("style", {text: CSS}));
  document.body.append(
    el("div", {class: "gl-controls", id: "gl-controls"}),
    el("h2", {text: "Heatmap"}),
    el("div", {class: "gl-view", id: "gl-view"}),
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
  const asked = state.runs.find((r) => r.run === new URLSearchParams(window.location.search).get("gl_run"));
  const first = asked || withData[0] || state.runs[0];
  state.a = first.run;
  const beside = new URLSearchParams(window.location.search).get("gl_beside");
  if (state.runs.some((r) => r.run === beside)) state.b = beside;
  const stats = first.stats, askedStat = new URLSearchParams(window.location.search).get("gl_stat");
  state.stat = stats.includes(askedStat) ? askedStat : stats.includes("grad_norm") ? "grad_norm" : stats[0] || null;
  buildControls();
  state.expand = viewFromQuery();
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
  s.addEventListener("change", () => { onChange(s.value); state.fullWidth = null; refresh(true); });
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

/** The zoom to ask the server for ({start, end}), {} when the browser zooms the whole run's
 * columns (no zoom, or the whole run already a column per logged step). */
function zoomParams() {
  if ((view.from === null && view.to === null) || !(state.fullWidth > 1)) return {};
  const p = {};
  if (view.from !== null) p.start = String(Math.ceil(view.from));
  if (view.to !== null) p.end = String(Math.floor(view.to));
  return p;
}

function fetchMaps(names, params) {
  return Promise.all(names.map((run) => getJSON("heatmap", {run, stat: state.stat, agg: state.agg, ...params})
    .catch((e) => ({run, error: String(e)}))));
}

/** After a change of the step range: fetch the finer columns (or the whole run back). */
function zoomChanged() {
  if (drawn.maps.some((m) => m.range) || Object.keys(zoomParams()).length) refresh(true).catch(() => {});
  else redraw();
}

async function refresh(force) {
  const names = [state.a, state.b].filter((x) => x);
  if (!state.stat) return;
  let params = zoomParams();
  let maps = await fetchMaps(names, params);
  const key = (m) => `${m.run}\u0000${state.stat}`;
  if (!Object.keys(params).length) {  // the whole run: its width decides where zooms are binned
    state.fullWidth = Math.max(1, ...maps.filter((m) => !m.error).map((m) => m.width || 1));
    for (const m of maps) if (!m.error) state.fullScale[key(m)] = m.scale;
    params = zoomParams();
    if (Object.keys(params).length) maps = await fetchMaps(names, params);
  }
  // a zoom keeps the whole run's colour-scale kind (the report's), not its range's
  for (const m of maps) if (!m.error && m.range && key(m) in state.fullScale) m.scale = state.fullScale[key(m)];
  const versions = JSON.stringify(maps.map((m) => m.version || m.error)) + state.stat + state.agg +
    JSON.stringify(params);
  document.getElementById("gl-status").textContent =
    `updated ${new Date().toLocaleTimeString()} (polls every ${POLL_MS / 1000} s)`;
  if (!force && versions === state.versions) return;
  state.versions = versions;
  const events = await Promise.all(names.map((run) => getJSON("events", {run}).catch(() => ({events: []}))));
  state.scale = scaleKind(maps.filter((m) => !m.error));  // the heatmap's, for the role charts
  drawHeatmaps(maps, events);
  const roles = await Promise.all(names.map((run) =>
    getJSON("roles", {run, stat: state.stat, ...params}).catch((e) => ({run, error: String(e)}))));
  drawRoles(roles);
  drawEvents(names, events);
  const verdicts = await Promise.all(names.map((run) => getJSON("verdicts", {run}).catch((e) => ({run, error: String(e), verdicts: []}))));
  drawVerdicts(verdicts);
}

// ------------------------------------------------------------------ heatmap (laid out client-side)

const view = {order: null, filter: "", collapsed: new Set(), from: null, to: null,
  clipLo: 1, clipHi: 99, ignoreFlagged: true};
let drawn = {maps: [], events: []};

/** The initial view from the page's query (gl_order, gl_filter, gl_from, gl_to, gl_clip=lo,hi,
 * gl_flagged=0|1, gl_expand=0|1), so that a view can be linked to. */
function viewFromQuery() {
  const q = new URLSearchParams(window.location.search);
  const num = (k) => (q.has(k) && q.get(k) !== "" && Number.isFinite(Number(q.get(k))) ? Number(q.get(k)) : null);
  if (["block", "role", "value"].includes(q.get("gl_order"))) view.order = q.get("gl_order");
  if (q.has("gl_filter")) view.filter = q.get("gl_filter");
  view.from = num("gl_from"); view.to = num("gl_to");
  const clip = (q.get("gl_clip") || "").split(",").map(Number);
  if (clip.length === 2 && clip.every((x) => Number.isFinite(x) && x >= 0 && x <= 100)) [view.clipLo, view.clipHi] = clip;
  if (q.has("gl_flagged")) view.ignoreFlagged = q.get("gl_flagged") !== "0";
  return q.has("gl_expand") ? q.get("gl_expand") !== "0" : null;
}

function input(id, attrs, onChange, after = redraw) {
  const i = el("input", {id, ...attrs});
  i.addEventListener("change", () => { onChange(i); after(); });
  return i;
}

function buildViewControls() {
  const c = document.getElementById("gl-view");
  c.replaceChildren();
  const num = (v) => (v.value === "" ? null : Number(v.value));
  const order = el("select", {id: "gl-order"});
  for (const [v, t] of [["block", "by block"], ["role", "by role"], ["value", "by value (median of shown steps)"]]) {
    const o = el("option", {value: v, text: t}); if (v === view.order) o.selected = true; order.append(o);
  }
  order.addEventListener("change", () => { view.order = order.value; redraw(); });
  const filt = el("input", {id: "gl-filter", type: "search", placeholder: "name or role, e.g. q_proj output",
    value: view.filter, size: "28"});
  filt.addEventListener("input", () => { view.filter = filt.value.trim(); redraw(); });
  const flagged = el("input", {id: "gl-ignore-flagged", type: "checkbox"});
  flagged.checked = view.ignoreFlagged;
  flagged.addEventListener("change", () => { view.ignoreFlagged = flagged.checked; redraw(); });
  const button = (id, text, fn) => { const b = el("button", {id, text}); b.addEventListener("click", () => { fn(); redraw(); }); return b; };
  c.append(
    el("label", {text: "rows "}, order),
    el("label", {text: "filter "}, filt),
    button("gl-collapse", "collapse all", () => { for (const k of allGroups()) view.collapsed.add(k); }),
    button("gl-expand", "expand all", () => view.collapsed.clear()),
    el("label", {text: "steps "}, input("gl-from", {type: "number", size: "6", value: view.from ?? ""}, (i) => { view.from = num(i); }, zoomChanged),
      el("span", {text: " – "}), input("gl-to", {type: "number", size: "6", value: view.to ?? ""}, (i) => { view.to = num(i); }, zoomChanged)),
    button("gl-zoom-reset", "all steps", () => { view.from = null; view.to = null; zoomChanged(); }),
    el("label", {text: "colour percentiles "},
      input("gl-clip-lo", {type: "number", min: "0", max: "100", step: "0.5", size: "4", value: view.clipLo}, (i) => { view.clipLo = Math.min(Math.max(num(i) ?? 0, 0), 100); }),
      el("span", {text: " – "}),
      input("gl-clip-hi", {type: "number", min: "0", max: "100", step: "0.5", size: "4", value: view.clipHi}, (i) => { view.clipHi = Math.min(Math.max(num(i) ?? 100, 0), 100); })),
    el("label", {}, flagged, el("span", {text: " colour scale ignores flagged steps"})),
  );
}

function allGroups() {
  const keys = new Set();
  for (const m of drawn.maps) {
    if (m.error) continue;
    for (const r of layoutRows(m, {...view, collapsed: new Set(), cols: [], clean: []})) keys.add(r.group);
  }
  return keys;
}

function drawHeatmaps(maps, events) {
  drawn = {maps, events};
  if (!view.started) {
    view.started = true;
    const expand = state.expand;
    const m = maps.find((x) => !x.error && x.layers);
    const blocks = m ? m.layers.some((l) => /(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\./.test(l.name)) : false;
    view.order = view.order || (blocks ? "block" : "role");
    buildViewControls();
    const collapse = expand === null ? Boolean(m && m.layers.length > COLLAPSE_ABOVE) : !expand;
    if (collapse) for (const k of allGroups()) view.collapsed.add(k);
  }
  redraw();
}

function redraw() {
  const {maps, events} = drawn;
  const panels = document.getElementById("gl-panels");
  panels.replaceChildren();
  const layouts = maps.map((m, i) => {
    if (m.error) return null;
    for (const b of m.roles || []) if (b.color) ROLE_COLOURS[b.role] = b.color;  // served kinds
    const flagged = flaggedSteps((events[i] || {}).events || []);
    const clean = m.columns.map(([s0, s1]) => !view.ignoreFlagged ||
      ![...flagged].some((s) => s0 <= s && s <= s1));
    const cols = zoomColumns(m, view);
    const rows = layoutRows(m, {...view, cols, clean});
    return {rows, cols, clean};
  });
  const limits = colourLimits(layouts.filter((x) => x), view.clipLo, view.clipHi,
    scaleKind(maps.filter((m) => !m.error)));
  const width = maps.length > 1 ? 520 : 1000;
  maps.forEach((m, i) => {
    const panel = el("div", {class: "gl-panel"}, el("h3", {text: `${m.run} · ${state.stat}`}));
    if (m.error) panel.append(el("p", {class: "gl-error", text: m.error}));
    else {
      const {rows, cols} = layouts[i];
      panel.append(el("div", {class: "gl-note", text:
        `${rows.length} rows shown of ${m.layers.length} tensors` + (view.filter ? ` (filter "${view.filter}")` : "")}));
      panel.append(drawHeatmap({m, events: (events[i] || {}).events || [], rows, cols, limits, width,
        stat: state.stat, view,
        onToggle: (g) => { if (view.collapsed.has(g)) view.collapsed.delete(g); else view.collapsed.add(g); redraw(); },
        onZoom: (a, b) => { view.from = a; view.to = b; buildViewControls(); zoomChanged(); }}));
    }
    panels.append(panel);
  });
  drawLegend(document.getElementById("gl-legend"), limits, state.stat, view);
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
  // the y axis on the heatmap's scale kind (log, symlog or linear; transform() in heatmap.js)
  const {f, inv} = transform(state.scale), ok = (v) => v !== null && Number.isFinite(v) && f(v) !== null;
  const vals = [...s.min, ...s.max, ...s.median].filter(ok).map(f);
  const fig = el("div", {class: "gl-role"}, el("div", {text: `${res.run} · ${role} (${s.layers} layers, ${state.scale.kind} scale)`}));
  const c = el("canvas"); c.width = W; c.height = H;
  fig.append(c);
  if (!vals.length) { fig.append(el("div", {class: "gl-note", text: "no values to draw on this scale"})); return fig; }
  const lo = Math.min(...vals), hi = Math.max(...vals);
  const y = (v) => H - 14 - ((hi > lo ? (f(v) - lo) / (hi - lo) : 0.5) * (H - 24));
  const n = res.columns.length, x = (i) => P + (n > 1 ? i / (n - 1) : 0.5) * (W - P - 6);
  const ctx = c.getContext("2d");
  const colr = s.color || ROLE_COLOURS[role] || "#555";  // the kind's colour, served (gradlens.kinds)
  ctx.fillStyle = colr; ctx.globalAlpha = 0.2; ctx.beginPath();
  let started = false;
  for (let i = 0; i < n; i++) { if (ok(s.max[i])) { ctx[started ? "lineTo" : "moveTo"](x(i), y(s.max[i])); started = true; } }
  for (let i = n - 1; i >= 0; i--) { if (ok(s.min[i])) ctx.lineTo(x(i), y(s.min[i])); else if (ok(s.max[i])) ctx.lineTo(x(i), H - 14); }
  ctx.fill(); ctx.globalAlpha = 1;
  ctx.strokeStyle = colr; ctx.lineWidth = 1.5; ctx.beginPath(); started = false;
  for (let i = 0; i < n; i++) { if (ok(s.median[i])) { ctx[started ? "lineTo" : "moveTo"](x(i), y(s.median[i])); started = true; } }
  ctx.stroke();
  if (lo < 0 && hi > 0) { ctx.fillStyle = "#aab7b8"; ctx.fillRect(P, y(0), W - P - 6, 1); }  // zero
  ctx.fillStyle = "#566573"; ctx.font = "10px sans-serif";
  ctx.fillText(fmt(inv(hi)), 0, 12); ctx.fillText(fmt(inv(lo)), 0, H - 16);
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
    // the report's first section: each verdict kind's answer in plain words, then what to do next
    const answers = res.answers || [];
    if (answers.length) {
      const list = el("ul", {});
      for (const a of answers) list.append(el("li", {text: a.text}));
      box.append(list);
      const next = answers.filter((a) => a.next_step);
      if (next.length) {
        box.append(el("p", {text: "What to do next:"}));
        const todo = el("ul", {});
        for (const a of next) todo.append(el("li", {text: a.next_step}));
        box.append(todo);
      }
    }
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
