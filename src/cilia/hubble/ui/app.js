// cilia Hubble UI: polls the relay; no build step, no dependencies.
"use strict";
const MAX_ROWS = 500;
const $ = (id) => document.getElementById(id);
let after = 0;
let rows = [];

function flowFilter() {
  const f = {};
  let pod = $("f-pod").value.trim();
  // like `cilia observe -n NS --pod x`: a bare pod name is in the picked namespace
  if (pod && !pod.includes("/") && $("namespace").value) pod = $("namespace").value + "/" + pod;
  if (pod) f.pod = pod;
  const v = $("f-verdict").value; if (v) f.verdict = [v];
  const p = $("f-protocol").value; if (p) f.protocol = [p];
  const port = $("f-port").value.trim(); if (/^\d+$/.test(port)) f.port = port;
  return f;
}

// Same shape `cilia observe --pod X --port N` builds: source side OR destination side.
function filterParam() {
  const f = flowFilter();
  const base = {};
  if (f.verdict) base.verdict = f.verdict;
  if (f.protocol) base.protocol = f.protocol;
  if (!f.pod && !f.port) return Object.keys(base).length ? JSON.stringify({allow: [base]}) : "";
  const left = Object.assign({}, base), right = Object.assign({}, base);
  if (f.pod) { left.source_pod = [f.pod]; right.destination_pod = [f.pod]; }
  if (f.port) { left.source_port = [f.port]; right.destination_port = [f.port]; }
  return JSON.stringify({allow: [left, right]});
}

function query(extra) {
  const q = new URLSearchParams(extra || {});
  const ns = $("namespace").value; if (ns) q.set("namespace", ns);
  const f = filterParam(); if (f) q.set("filter", f);
  return q.toString();
}

function endpoint(ep, ip, port) {
  let host = ip || "";
  if (ep && ep.pod_name) host = (ep.namespace ? ep.namespace + "/" : "") + ep.pod_name;
  else if (ep && ep.labels) {
    const r = ep.labels.find((l) => l.startsWith("reserved:"));
    if (r) host = (ip ? ip + " " : "") + "(" + r.slice(9) + ")";
  }
  return port ? host + ":" + port : host;
}

function l4(f) {
  const l = f.l4 || {};
  for (const p of ["TCP", "UDP", "SCTP"]) if (l[p]) return [p, l[p].source_port, l[p].destination_port];
  for (const p of ["ICMPv4", "ICMPv6"]) if (l[p]) return [p, null, null];
  return ["", null, null];
}

function flowType(f) {
  const t = (f.event_type || {}).type;
  if (t === 4) return (f.trace_observation_point || "trace").toLowerCase().replace(/_/g, "-");
  if (t === 1) return f.drop_reason_desc || "drop";
  if (t === 5) return "policy-verdict " + (f.traffic_direction || "");
  return String(t);
}

function renderFlows() {
  const tb = document.querySelector("#flows tbody");
  const frag = document.createDocumentFragment();
  for (const r of rows.slice().reverse()) {
    const f = r.flow || {};
    const [proto, sp, dp] = l4(f);
    const tr = document.createElement("tr");
    tr.className = "flow " + (f.verdict || "");
    const cells = [
      (r.time || "").replace("T", " ").slice(0, 23), r.node_name || f.node_name || "",
      endpoint(f.source, (f.IP || {}).source, sp), endpoint(f.destination, (f.IP || {}).destination, dp),
      dp ? dp + "/" + proto : proto, flowType(f), f.verdict || "", f.Summary || ""];
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      td.textContent = c;
      if (i === 6) td.className = "verdict";
      tr.appendChild(td);
    });
    frag.appendChild(tr);
  }
  tb.replaceChildren(frag);
}

const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}

function renderMap(m) {
  const svg = $("servicemap");
  svg.replaceChildren();
  const defs = el("defs", {}, svg);
  for (const [v, c] of [["FORWARDED", "#2e9e4f"], ["DROPPED", "#d93030"], ["AUDIT", "#e39b12"], ["UNKNOWN", "#888"]]) {
    const mk = el("marker", {id: "arrow-" + v, viewBox: "0 0 10 10", refX: 10, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse"}, defs);
    el("path", {d: "M 0 0 L 10 5 L 0 10 z", fill: c}, mk);
  }
  const W = 900, H = 520, cx = W / 2, cy = H / 2;
  const n = m.nodes.length;
  const R = Math.min(W, H) / 2 - 60;
  const pos = {};
  m.nodes.forEach((node, i) => {
    const a = (2 * Math.PI * i) / Math.max(n, 1) - Math.PI / 2;
    pos[node.id] = n === 1 ? [cx, cy] : [cx + R * Math.cos(a), cy + R * Math.sin(a)];
  });
  const BW = 130, BH = 30;
  for (const e of m.edges) {
    if (!pos[e.source] || !pos[e.target]) continue;
    const [x1, y1] = pos[e.source], [x2, y2] = pos[e.target];
    const dx = x2 - x1, dy = y2 - y1, len = Math.hypot(dx, dy) || 1;
    // stop at the target box border so the arrow head stays visible
    const k = Math.min((BW / 2) / Math.abs(dx || 1e-9), (BH / 2) / Math.abs(dy || 1e-9), 1);
    const ex = x2 - dx * k, ey = y2 - dy * k;
    const g = el("g", {class: "edge-group", "data-source": e.source, "data-target": e.target,
      "data-verdict": e.verdict}, svg);
    el("path", {class: "edge " + e.verdict, d: `M ${x1} ${y1} L ${ex} ${ey}`,
      "marker-end": `url(#arrow-${e.verdict})`}, g);
    const t = el("text", {class: "elabel", x: (x1 + ex) / 2 - dy / len * 8, y: (y1 + ey) / 2 + dx / len * 8}, g);
    t.textContent = e.ports.join(",") + (e.verdicts.DROPPED ? " ✗" + e.verdicts.DROPPED : "");
  }
  for (const node of m.nodes) {
    const [x, y] = pos[node.id];
    const g = el("g", {class: "node " + node.kind, "data-id": node.id, transform: `translate(${x},${y})`}, svg);
    el("rect", {x: -BW / 2, y: -BH / 2, width: BW, height: BH}, g);
    const t = el("text", {x: 0, y: 0}, g);
    t.textContent = node.label.length > 20 ? node.label.slice(0, 19) + "…" : node.label;
    const title = el("title", {}, g);
    title.textContent = node.id;
  }
}

async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) throw new Error(url + ": HTTP " + r.status);
  return r.json();
}

async function refreshNamespaces() {
  const list = await getJSON("/api/namespaces");
  const sel = $("namespace");
  const have = new Set([...sel.options].map((o) => o.value));
  for (const ns of list) if (!have.has(ns)) {
    const o = document.createElement("option"); o.value = ns; o.textContent = ns; sel.appendChild(o);
  }
}

function resetFlows() { after = 0; rows = []; tick(); }

async function tick() {
  try {
    if (!$("f-pause").checked) {
      const got = await getJSON("/api/flows?" + query({after: after, limit: MAX_ROWS}));
      after = got.seq;
      rows = rows.concat(got.flows).slice(-MAX_ROWS);
      renderFlows();
    }
    renderMap(await getJSON("/api/servicemap?" + query()));
    await refreshNamespaces();
    const st = await getJSON("/api/status");
    const nodes = Object.entries(st.nodes).map(([n, s]) => n + ": " + s.state).join(", ");
    $("status").textContent = `${st.num_flows} flows · ${nodes}`;
    document.body.dataset.ready = "1";
  } catch (e) {
    $("status").textContent = "relay unreachable: " + e.message;
  }
}

for (const id of ["namespace", "f-verdict", "f-protocol"]) $(id).addEventListener("change", resetFlows);
for (const id of ["f-pod", "f-port"]) $(id).addEventListener("input", resetFlows);
tick();
setInterval(tick, 1000);
