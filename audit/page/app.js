// The meshward audit page: plain DOM over the read-only query API (/v1), no framework, no
// CDN. Filters live in the URL's query string and the open tab (and decision) in its
// hash, so any view can be shared as a link. Every value from a decision (paths,
// principals, headers) is attacker-controlled: it is only ever set as textContent.
"use strict";

const FORM_FILTERS = [
  "since", "allowed", "principal_prefix", "namespace", "workload", "policy",
  "path_prefix", "method", "reason", "dry_run_flip",
];
// Every filter the API takes: a shared link may carry one the form has no field for.
const API_FILTERS = new Set([
  ...FORM_FILTERS, "until", "engine", "rule", "principal", "source_namespace", "service",
  "status", "decision_id", "version",
]);
const BUCKETS = { "15m": 10, "1h": 60, "24h": 300, "7d": 3600, "30d": 14400 };
const PAGE_SIZE = 50;

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// -- state in the URL ----------------------------------------------------------------

function filters() {
  const params = new URLSearchParams(location.search);
  const out = new URLSearchParams();
  for (const [name, value] of params) {
    if (API_FILTERS.has(name) && value !== "") out.set(name, value);
  }
  if (!out.has("since") && !out.has("until") && !out.has("decision_id")) out.set("since", "24h");
  return out;
}

function tab() {
  const [name] = location.hash.slice(1).split("/");
  return ["overview", "decisions", "dry-run", "edges", "replay"].includes(name) ? name : "overview";
}

function openDecision() {
  const [name, id] = location.hash.slice(1).split("/");
  return name === "decisions" && id ? decodeURIComponent(id) : null;
}

function setFilters(params) {
  const search = params.toString();
  history.pushState(null, "", `${location.pathname}${search ? "?" + search : ""}${location.hash}`);
  render();
}

function formToFilters() {
  const form = $("#filters");
  const params = filters();
  for (const name of FORM_FILTERS) {
    const field = form.elements[name];
    const value = field.type === "checkbox" ? (field.checked ? "true" : "") : field.value.trim();
    if (value) params.set(name, value);
    else params.delete(name);
  }
  return params;
}

function filtersToForm() {
  const form = $("#filters");
  const params = filters();
  for (const name of FORM_FILTERS) {
    const field = form.elements[name];
    if (field.type === "checkbox") field.checked = params.get(name) === "true";
    else field.value = params.get(name) || (name === "since" ? "24h" : "");
  }
}

function applyFilter(name, value) {
  const params = filters();
  params.set(name, value);
  setFilters(params);
}

// -- the API -------------------------------------------------------------------------

async function api(path, params = new URLSearchParams()) {
  const query = params.toString();
  const response = await fetch(`/v1${path}${query ? "?" + query : ""}`);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || body.detail || `HTTP ${response.status}`);
  return body;
}

function showError(error) {
  const box = $("#error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

async function guarded(work) {
  try {
    await work();
  } catch (error) {
    showError(error);
  }
}

// -- rendering helpers ---------------------------------------------------------------

const fmtTime = (iso) => (iso || "").replace("T", " ").replace(/\.\d+Z$/, "Z");
const outcome = (d) => (d.allowed
  ? el("span", { class: "allow" }, "allow")
  : el("span", { class: "deny" }, `deny ${d.status || ""}`.trim()));

function table(node, headings, rows, empty = "nothing in this range") {
  node.replaceChildren();
  if (headings) node.append(el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))));
  const body = el("tbody");
  if (!rows.length) body.append(el("tr", {}, el("td", { class: "empty", colspan: headings ? headings.length : 1 }, empty)));
  body.append(...rows);
  node.append(body);
}

function bar(count, max, kind) {
  const width = max ? Math.max(1, Math.round((count / max) * 80)) : 0;
  return el("span", { class: `bar ${kind}`, style: `width:${width}px` });
}

function decisionLink(id) {
  return el("a", { href: `#decisions/${encodeURIComponent(id)}` }, el("code", {}, id.slice(0, 12)));
}

// -- overview ------------------------------------------------------------------------

async function loadOverview() {
  const params = filters();
  const since = params.get("since");
  const bucket = BUCKETS[since] || 300;
  const series = await api("/aggregates/series", new URLSearchParams([...params, ["bucket", bucket]]));
  // The whole window, not just the buckets that have decisions: a burst looks like one.
  const from = Date.parse(series.filters.since) * 1000;
  const to = series.filters.until ? Date.parse(series.filters.until) * 1000 : Date.now() * 1000;
  drawChart(series.points, bucket, from, to);
  const denied = new URLSearchParams(params);
  if (!denied.has("allowed")) denied.set("allowed", "false");
  await Promise.all([
    topTable("#top-principals", "principal", "principal", denied),
    topTable("#top-policies", "policy", "policy", denied),
    topTable("#top-rules", "rule", null, denied),
  ]);
}

async function topTable(selector, by, filterName, params) {
  const body = await api("/aggregates/top", new URLSearchParams([...params, ["by", by], ["limit", 10]]));
  const max = Math.max(0, ...body.rows.map((r) => r.count));
  table($(selector), ["", "denied", ""], body.rows.map((row) => el(
    "tr",
    { class: filterName ? "row" : null, onclick: filterName ? () => applyFilter(filterName, row.value) : null },
    el("td", {}, el("code", {}, row.value)),
    el("td", { class: "num" }, row.count),
    el("td", {}, bar(row.count, max, "deny")),
  )));
}

function drawChart(points, bucket, windowStart, windowEnd) {
  const chart = $("#chart");
  const allowed = points.reduce((n, p) => n + p.allowed, 0);
  const denied = points.reduce((n, p) => n + p.denied, 0);
  $("#series-total").replaceChildren(
    el("span", { class: "allow", id: "total-allowed" }, `${allowed} allowed`), " · ",
    el("span", { class: "deny", id: "total-denied" }, `${denied} denied`),
    ` · per ${bucket >= 3600 ? bucket / 3600 + " h" : bucket >= 60 ? bucket / 60 + " min" : bucket + " s"}`,
  );
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const width = 1000;
  const height = 220;
  const pad = { left: 40, right: 8, top: 8, bottom: 20 };
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const add = (name, attrs, text) => {
    const node = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  if (!points.length) {
    add("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis" }, "no decisions in this range");
    chart.replaceChildren(svg);
    return;
  }
  const start = Math.min(windowStart || points[0].time_us, points[0].time_us);
  const end = Math.max(windowEnd || 0, points[points.length - 1].time_us + bucket * 1e6);
  const span = Math.max(end - start, bucket * 1e6);
  const max = Math.max(...points.map((p) => p.allowed + p.denied));
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const barW = Math.max(1, (plotW * bucket * 1e6) / span - 1);
  for (const p of points) {
    const x = pad.left + ((p.time_us - start) / span) * plotW;
    const hAllow = (p.allowed / max) * plotH;
    const hDeny = (p.denied / max) * plotH;
    const y0 = pad.top + plotH;
    add("rect", { x, y: y0 - hAllow, width: barW, height: hAllow, fill: "var(--allow)" })
      .append(Object.assign(document.createElementNS(ns, "title"), { textContent: `${fmtTime(new Date(p.time_us / 1000).toISOString())}: ${p.allowed} allowed` }));
    add("rect", { x, y: y0 - hAllow - hDeny, width: barW, height: hDeny, fill: "var(--deny)" })
      .append(Object.assign(document.createElementNS(ns, "title"), { textContent: `${p.denied} denied` }));
  }
  add("text", { x: pad.left - 4, y: pad.top + 10, "text-anchor": "end", class: "axis" }, String(max));
  add("text", { x: pad.left - 4, y: pad.top + plotH, "text-anchor": "end", class: "axis" }, "0");
  add("text", { x: pad.left, y: height - 4, class: "axis" }, fmtTime(new Date(start / 1000).toISOString()));
  add("text", { x: width - pad.right, y: height - 4, "text-anchor": "end", class: "axis" }, fmtTime(new Date(end / 1000).toISOString()));
  chart.replaceChildren(svg);
}

// -- decisions -----------------------------------------------------------------------

let nextCursor = null;
let listed = 0;

async function loadDecisions(reset) {
  const params = filters();
  params.set("limit", PAGE_SIZE);
  if (!reset && nextCursor) params.set("cursor", nextCursor);
  const page = await api("/decisions", params);
  const body = $("#decision-list tbody");
  if (reset) {
    body.replaceChildren();
    listed = 0;
  }
  for (const d of page.items) {
    body.append(el(
      "tr",
      { class: "row", "data-id": d.decision_id, onclick: () => { location.hash = `decisions/${d.decision_id}`; } },
      el("td", {}, fmtTime(d.time)),
      el("td", {}, outcome(d)),
      el("td", {}, el("code", {}, d.source_principal || d.source_ip || "-")),
      el("td", {}, `${d.destination_namespace || "-"}/${d.destination_workload || "-"}`),
      el("td", {}, el("code", {}, `${d.method || ""} ${d.path || ""}`)),
      el("td", {}, el("code", {}, d.policy_id || d.reason)),
    ));
  }
  listed += page.items.length;
  if (reset && !page.items.length) {
    body.append(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "no decisions match")));
  }
  nextCursor = page.next_cursor;
  $("#more").hidden = !nextCursor;
  $("#list-count").textContent = `${listed}${nextCursor ? "+" : ""} shown`;
}

async function showExplanation(id) {
  const panel = $("#explanation");
  for (const row of document.querySelectorAll("#decision-list tr.row")) {
    row.classList.toggle("selected", row.dataset.id === id);
  }
  if (!id) {
    panel.hidden = true;
    delete panel.dataset.decision;
    return;
  }
  const report = await api(`/decisions/${encodeURIComponent(id)}/explain`);
  const d = report.decision;
  $("#explain-id").textContent = d.decision_id;
  const body = $("#explain-body");
  const facts = [
    ["time", fmtTime(d.time)],
    ["outcome", outcome(d), ` (${d.reason}), engine ${d.engine}`],
    ["decided by", el("code", { id: "explain-decided-by" }, d.policy_id || d.reason)],
    ["from", el("code", {}, d.source_principal || "no client certificate"), d.source_ip ? ` (${d.source_ip})` : ""],
    d.request_principal ? ["end user", el("code", {}, d.request_principal)] : null,
    ["to", `${d.destination_namespace || "-"}/${d.destination_workload || "-"}`, d.destination_port ? ` port ${d.destination_port}` : ""],
    ["request", el("code", {}, `${d.method || ""} ${d.path || ""}`), d.host ? ` (host ${d.host})` : ""],
    ["policy set", `${report.policy_set.version || "-"} (${report.policy_set.kept ? "kept" : "not kept"})`],
    ["latency", d.latency_us !== null ? `${d.latency_us} µs` : "-"],
  ].filter(Boolean);
  const parts = [el("dl", {}, facts.map(([term, ...value]) => [el("dt", {}, term), el("dd", {}, value)]))];
  if (report.istio) {
    const istio = report.istio;
    parts.push(el("h3", {}, "Istio"));
    const rows = istio.policies.map((m) => el(
      "tr", {},
      el("td", {}, m.action + (m.dry_run ? " (dry-run)" : "")),
      el("td", {}, el("code", {}, m.policy)),
      el("td", {}, m.matched_rule ? el("code", {}, m.matched_rule) : el("span", { class: "empty" }, "no rule matched")),
    ));
    const policies = el("table", { id: "explain-policies" });
    table(policies, ["action", "policy", "matched"], rows, "no AuthorizationPolicy applies");
    parts.push(policies);
    parts.push(el("p", {}, `verdict: ${istio.allowed ? "allowed" : "denied"} (${istio.reason})`,
      istio.policy_id ? [", by ", el("code", {}, istio.policy_id)] : ""));
    for (const engine of ["allow", "deny"]) {
      const shadow = istio[`dry_run_${engine}`];
      if (shadow) parts.push(el("p", {}, `dry-run ${engine.toUpperCase()} shadow: ${shadow.result}`, shadow.policy ? [" by ", el("code", {}, shadow.policy)] : ""));
    }
  }
  if (report.rego) {
    parts.push(el("h3", {}, "Rego"), el("p", {}, el("code", {}, report.rego.decision), ` (package ${report.rego.package})`));
    parts.push(el("pre", {}, JSON.stringify(report.rego.result, null, 2)));
  }
  if (d.dry_run_flips.length) {
    parts.push(el("h3", {}, "Dry-run policies that would have changed it"));
    parts.push(el("ul", {}, d.dry_run_flips.map((f) => el("li", {}, `${f.engine} `, el("code", {}, f.policy), ` → ${f.to}`))));
  }
  if (report.reevaluated) {
    const again = report.reevaluated;
    const same = again.not_reevaluable ? "not comparable (see the note)" : again.reproduced ? "the same as recorded" : "NOT what was recorded";
    const of = again.not_reevaluable ? " of the stored request" : "";
    parts.push(el("p", { id: "explain-reevaluated" }, `evaluated again${of}: ${again.allowed ? "allowed" : "denied"} (${again.reason}), ${same}`));
  }
  for (const note of report.notes || []) parts.push(el("p", { class: "note" }, note));
  if (report.request) {
    parts.push(el("details", {}, el("summary", {}, "stored request (redacted)"), el("pre", {}, JSON.stringify(report.request, null, 2))));
  }
  body.replaceChildren(...parts);
  panel.hidden = false;
  panel.dataset.decision = d.decision_id;  // rendered in full, for the browser test
}

// -- dry-run and edges ---------------------------------------------------------------

async function loadDryRun() {
  const body = await api("/aggregates/dry-run", filters());
  const max = Math.max(0, ...body.policies.map((p) => p.count));
  table($("#dry-run-table"), ["engine", "dry-run policy", "would turn into", "decisions", "", "examples"],
    body.policies.map((p) => el(
      "tr", {},
      el("td", {}, p.engine),
      el("td", {}, el("code", {}, p.policy)),
      el("td", { class: p.to === "deny" ? "deny" : "allow" }, p.to),
      el("td", { class: "num" }, p.count),
      el("td", {}, bar(p.count, max, p.to === "deny" ? "deny" : "allow")),
      el("td", {}, p.examples.map((id) => [decisionLink(id), " "])),
    )), "no dry-run policy would have changed a decision in this range");
}

async function loadEdges() {
  const body = await api("/aggregates/edges", filters());
  const max = Math.max(0, ...body.edges.map((e) => e.count));
  table($("#edge-table"), ["source", "destination", "allowed", "denied", ""],
    body.edges.map((e) => el(
      "tr", {},
      el("td", {}, el("code", {}, e.source)),
      el("td", {}, `${e.namespace || "-"}/${e.workload || "-"}`),
      el("td", { class: "num allow" }, e.allowed),
      el("td", { class: "num deny" }, e.denied),
      el("td", {}, bar(e.allowed, max, "allow"), bar(e.denied, max, "deny")),
    )));
}

// -- replay --------------------------------------------------------------------------

async function runReplay(event) {
  event.preventDefault();
  const form = event.target;
  const result = $("#replay-result");
  result.replaceChildren(el("p", { class: "hint" }, "replaying…"));
  const params = filters();
  params.set("policies", form.elements.policies.value.trim());
  params.set("limit", form.elements.limit.value);
  let report;
  try {
    report = await api("/replay", params);
  } catch (error) {
    result.replaceChildren(el("p", { class: "note" }, String(error.message || error)));
    return;
  }
  const skipped = Object.values(report.not_reevaluable).reduce((a, b) => a + b, 0);
  const summary = el("div", { class: "summary", id: "replay-summary" },
    el("div", {}, el("b", {}, report.considered), "recorded"),
    el("div", {}, el("b", {}, report.reevaluated), "re-evaluated"),
    el("div", {}, el("b", { class: "deny", id: "replay-allow-to-deny" }, report.flips.allow_to_deny), "allow → deny"),
    el("div", {}, el("b", { class: "allow", id: "replay-deny-to-allow" }, report.flips.deny_to_allow), "deny → allow"),
    el("div", {}, el("b", {}, skipped), "not re-evaluable"),
  );
  const groups = el("table", { id: "replay-groups" });
  table(groups, ["flip", "caller", "decided by", "decisions", "examples"], report.groups.map((g) => el(
    "tr", {},
    el("td", { class: g.direction === "allow_to_deny" ? "deny" : "allow" }, g.direction === "allow_to_deny" ? "allow → deny" : "deny → allow"),
    el("td", {}, el("code", {}, g.principal || "(no principal)")),
    el("td", {}, el("code", {}, g.policy)),
    el("td", { class: "num" }, g.count),
    el("td", {}, g.examples.map((ex) => [decisionLink(ex.decision_id), ` ${ex.method || ""} ${ex.path || ""} `])),
  )), "nothing would flip");
  const why = Object.entries(report.not_reevaluable).map(([reason, n]) => el("li", {}, `${n}: ${reason}`));
  const notes = (report.notes || []).map((note) => el("p", { class: "note" }, note));
  result.replaceChildren(
    el("p", {}, `policy set ${report.version} from `, el("code", {}, report.policies)),
    report.truncated ? el("p", { class: "note", id: "replay-truncated" }, `stopped at the limit of ${report.limit}: more recorded decisions match (narrow the filters, or raise the limit)`) : "",
    ...notes,
    summary, groups,
    why.length ? el("ul", { class: "hint" }, why) : "",
  );
}

// -- wiring --------------------------------------------------------------------------

let renderedSearch = null;

async function render() {
  renderedSearch = location.search;
  showError(null);
  filtersToForm();
  const current = tab();
  for (const link of document.querySelectorAll("#tabs a")) link.classList.toggle("active", link.dataset.tab === current);
  for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== current;
  await guarded(async () => {
    if (current === "overview") await loadOverview();
    else if (current === "decisions") {
      await loadDecisions(true);
      await showExplanation(openDecision());
    } else if (current === "dry-run") await loadDryRun();
    else if (current === "edges") await loadEdges();
  });
  document.body.dataset.loaded = String(Date.now());
}

$("#filters").addEventListener("submit", (event) => {
  event.preventDefault();
  setFilters(formToFilters());
});
$("#clear").addEventListener("click", () => setFilters(new URLSearchParams()));
$("#more").addEventListener("click", () => guarded(() => loadDecisions(false)));
$("#close-explain").addEventListener("click", () => { location.hash = "decisions"; });
$("#replay-form").addEventListener("submit", runReplay);
// Back/forward across filters; a hash change (a tab, a decision) fires popstate too, and
// the hashchange listener alone handles it, so the list is not fetched twice.
window.addEventListener("popstate", () => { if (location.search !== renderedSearch) render(); });
window.addEventListener("hashchange", () => {
  if (tab() === "decisions" && document.querySelector("#decision-list tr.row")) {
    guarded(() => showExplanation(openDecision()));
    for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== "decisions";
    for (const link of document.querySelectorAll("#tabs a")) link.classList.toggle("active", link.dataset.tab === "decisions");
  } else {
    render();
  }
});
render();
