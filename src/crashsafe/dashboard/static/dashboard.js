// crashsafe dashboard. Every value from the server is user data (workflow ids, step
// names, errors): it is only ever set with textContent or setAttribute, never parsed
// as HTML. The token lives in sessionStorage and travels in the Authorization header.
"use strict";

const TOKEN_KEY = "crashsafe-dashboard-token";
const SVG = "http://www.w3.org/2000/svg";
const ACTIVE = new Set(["running", "waiting", "cancelling", "enqueued"]);
// The statuses the server rolls back from (_server.ROLLBACK_FROM): not while a step runs.
const ROLLBACK_FROM = new Set(["waiting", "succeeded", "failed", "cancelled", "dead_letter"]);
let refreshTimer = null;

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function takeTokenFromFragment() {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) {
    let value = m[1];
    try { value = decodeURIComponent(value); } catch (e) { /* a malformed %-escape: keep it as typed */ }
    sessionStorage.setItem(TOKEN_KEY, value);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "onclick" || k === "onsubmit" || k === "onchange") node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function tooltip(node, text) { node.append(svg("title", {}, text)); return node; }

async function api(path, body) {
  const headers = { "Accept": "application/json" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  const init = { headers, cache: "no-store" };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = { error: resp.statusText }; }
  if (!resp.ok) {
    const err = new Error((data && data.error) || ("HTTP " + resp.status));
    err.status = resp.status;
    throw err;
  }
  return data;
}

function flash(message, bad) {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = "flash" + (bad ? " bad" : "");
  box.setAttribute("role", bad ? "alert" : "status");
  box.hidden = false;
}

function when(ts) {
  if (!ts) return "-";
  const d = new Date(ts * 1000);
  if (Number.isNaN(d.getTime())) return String(ts) + " s";  // beyond the calendar
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
         `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

function dur(s) {
  if (s === null || s === undefined) return "-";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
  if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function badge(text, cls) {
  return el("span", { class: "badge " + String(cls || text).replace(/\s+/g, "-") }, text);
}

function confirmAction(title, body, detail) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-body").textContent = body;
  const pre = document.getElementById("confirm-detail");
  pre.textContent = detail || "";
  pre.hidden = !detail;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    document.getElementById("confirm-no").focus();
  });
}

// -- session ------------------------------------------------------------------------
async function session() {
  const state = document.getElementById("token-state");
  try {
    const s = await api("/api/session");
    if (s.database) document.getElementById("database").textContent = s.database;
    state.textContent = s.authorized ? "token accepted" :
      (token() ? "token refused" : (s.reads_need_token ? "token needed" : "read-only: no token"));
    state.className = "token-state" + (s.authorized ? " set" : "");
    return s;
  } catch (e) {
    state.textContent = "offline";
    return null;
  }
}

function setupTokenForm() {
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("token-input");
    if (input.value.trim()) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    route();
  });
}

// -- list page ----------------------------------------------------------------------
async function listPage(main) {
  const q = new URLSearchParams(location.search);
  const form = el("form", { class: "filters", id: "filters" });
  const status = el("select", { name: "status", id: "f-status" }, el("option", { value: "" }, "any status"));
  const name = el("input", { name: "name", id: "f-name", placeholder: "exact name", value: q.get("name") || "" });
  const prefix = el("input", { name: "prefix", id: "f-prefix", placeholder: "id starts with", value: q.get("prefix") || "" });
  form.append(el("label", {}, "status", status), el("label", {}, "workflow name", name),
              el("label", {}, "id prefix", prefix), el("button", { type: "submit", class: "primary" }, "Filter"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) next.set(k, v);
    history.pushState(null, "", "/" + (next.toString() ? "?" + next : ""));
    route();
  });
  const listPanel = el("section", { class: "panel" }, el("h2", {}, "Workflows"), form);
  const tableBox = el("div", { id: "workflows" }, el("p", { class: "muted" }, "Loading…"));
  listPanel.append(tableBox);
  const side = el("div", {}, el("section", { class: "panel", id: "alerts" }),
                  el("section", { class: "panel", id: "breakers" }));
  main.replaceChildren(el("div", { class: "grid" }, listPanel, side));

  const params = new URLSearchParams();
  for (const k of ["status", "name", "prefix"]) if (q.get(k)) params.set(k, q.get(k));
  try {
    const data = await api("/api/workflows?" + params);
    for (const s of data.statuses) {
      status.append(el("option", { value: s, selected: q.get("status") === s }, s));
    }
    tableBox.replaceChildren(workflowTable(data.workflows));
    if (data.workflows.length >= data.limit) {
      tableBox.append(el("p", { class: "muted" }, `The newest ${data.limit} shown; narrow the filters to see others.`));
    }
  } catch (e) {
    tableBox.replaceChildren(el("p", { class: "error" }, e.message));
  }
  renderAlerts(document.getElementById("alerts"), q.get("since") || "3600");
  renderBreakers(document.getElementById("breakers"));
}

function workflowTable(rows) {
  if (!rows.length) return el("p", { class: "muted" }, "No workflows match.");
  const body = el("tbody");
  for (const r of rows) {
    body.append(el("tr", { "data-id": r.id },
      el("td", { class: "id" }, el("a", { href: "/workflow?id=" + encodeURIComponent(r.id) }, r.id)),
      el("td", {}, r.name), el("td", {}, badge(r.status)),
      el("td", { class: "mono nowrap" }, when(r.created_at)), el("td", { class: "mono nowrap" }, when(r.updated_at)),
      el("td", {}, String(r.recovery_attempts))));
  }
  return el("table", { id: "workflow-table" },
    el("thead", {}, el("tr", {}, ["id", "name", "status", "created", "updated", "recoveries"].map((h) => el("th", {}, h)))),
    body);
}

function checkValue(v, unit) {
  if (v === null || v === undefined) return "-";
  if (unit === "ratio") return (v * 100).toFixed(2) + " %";
  if (unit === "s") return dur(v);
  if (unit === "bytes") return (v / 1024).toFixed(1) + " KB";
  return String(v);
}

async function renderAlerts(box, since) {
  const windows = [["900", "last 15 min"], ["3600", "last hour"], ["86400", "last day"], ["", "all time"]];
  const pick = el("select", { id: "alert-window", "aria-label": "alert window" },
    windows.map(([v, t]) => el("option", { value: v, selected: v === since }, t)));
  pick.addEventListener("change", () => renderAlerts(box, pick.value));
  box.replaceChildren(el("h2", {}, "Alerts ", pick), el("p", { class: "muted" }, "Computing…"));
  try {
    const data = await api("/api/checks" + (since ? "?since=" + encodeURIComponent(since) : ""));
    const body = el("tbody");
    const signs = { "above": ">", "below": "<", "at least": "≥" };
    for (const c of data.checks) {
      body.append(el("tr", { class: "check" },
        el("td", {}, c.name, el("div", { class: "detail muted" }, c.detail)),
        el("td", { class: "mono nowrap" }, checkValue(c.value, c.unit)),
        el("td", { class: "mono nowrap" }, signs[c.alert_when] + " " + checkValue(c.threshold, c.unit)),
        el("td", {}, badge(c.status))));
    }
    box.replaceChildren(el("h2", {}, "Alerts ", pick, " ",
      data.alerts ? badge(data.alerts + " ALERT", "ALERT") : badge("all OK", "OK")),
      el("p", { class: "muted" }, `${data.workflows} workflows in the window`),
      el("table", { id: "checks" }, el("thead", {}, el("tr", {}, ["figure", "value", "alert when", ""].map((h) => el("th", {}, h)))), body));
  } catch (e) {
    box.append(el("p", { class: "error" }, e.message));
  }
}

async function renderBreakers(box) {
  box.replaceChildren(el("h2", {}, "Circuit breakers"));
  try {
    const data = await api("/api/breakers");
    if (!data.breakers.length) { box.append(el("p", { class: "muted" }, "No breakers recorded yet.")); return; }
    const body = el("tbody");
    for (const b of data.breakers) {
      body.append(el("tr", {}, el("td", { class: "mono" }, b.name), el("td", {}, badge(b.state)),
        el("td", {}, `${b.successes} ok / ${b.failures} failed`), el("td", {}, String(b.trips)),
        el("td", { class: "detail" }, b.why || "", b.open_until ? " (probe after " + when(b.open_until) + ")" : "")));
    }
    box.append(el("table", { id: "breaker-table" },
      el("thead", {}, el("tr", {}, ["breaker", "state", "window", "trips", "why"].map((h) => el("th", {}, h)))), body));
  } catch (e) {
    box.append(el("p", { class: "error" }, e.message));
  }
}

// -- one workflow ---------------------------------------------------------------------
async function workflowPage(main) {
  const q = new URLSearchParams(location.search);
  const id = q.get("id") || "";
  const before = q.get("before");
  let data;
  try {
    data = await api("/api/workflow?id=" + encodeURIComponent(id) +
                     (before ? "&before=" + encodeURIComponent(before) : ""));
  } catch (e) {
    main.replaceChildren(el("p", {}, el("a", { href: "/" }, "← all workflows")),
                         el("p", { class: "error", id: "load-error" }, e.message));
    return;
  }
  const w = data.workflow;
  const focused = document.activeElement && document.activeElement.id;
  const kept = {};
  for (const f of ["sig-name", "sig-payload", "rb-to", "rb-force"]) {
    const node = document.getElementById(f);
    if (node && node.dataset.edited) kept[f] = node.type === "checkbox" ? node.checked : node.value;
  }
  const head = el("section", { class: "panel" },
    el("p", {}, el("a", { href: "/" }, "← all workflows")),
    el("h1", { id: "wf-id" }, w.id),
    el("div", { class: "meta" },
      el("span", {}, "workflow ", el("b", {}, w.name), " v", w.version),
      el("span", { id: "wf-status" }, badge(w.status)),
      el("span", {}, "created ", el("b", {}, when(w.created_at))),
      el("span", {}, "updated ", el("b", {}, when(w.updated_at))),
      el("span", {}, "recoveries ", el("b", {}, String(w.recovery_attempts))),
      w.owner ? el("span", {}, "owner ", el("b", { class: "mono" }, w.owner)) : null,
      w.parent_id ? el("span", {}, "child of ", el("a", { href: "/workflow?id=" + encodeURIComponent(w.parent_id) }, w.parent_id)) : null),
    w.reason ? el("div", { class: "meta", id: "wf-reason" }, "reason: ", w.reason) : null,
    w.error ? el("div", { class: "error", id: "wf-error" }, "error: ", w.error) : null,
    w.result !== null ? el("div", { class: "meta", id: "wf-result" }, "result: ", el("span", { class: "mono" }, w.result)) : null);
  const picture = el("section", { class: "panel" }, el("h2", {}, "Timeline"), drawTimeline(data.timeline, data.now, ACTIVE.has(w.status)), legend());
  main.replaceChildren(head, actionsPanel(data), picture, journalPanel(data));
  for (const [f, v] of Object.entries(kept)) {
    const n = document.getElementById(f);
    if (n.type === "checkbox") n.checked = v; else n.value = v;
    n.dataset.edited = "1";
  }
  if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
  clearTimeout(refreshTimer);
  if (ACTIVE.has(w.status)) {
    refreshTimer = setTimeout(() => {
      if (!document.getElementById("confirm").open) workflowPage(main);
      else refreshTimer = setTimeout(() => workflowPage(main), 1500);
    }, 1500);
  }
}

function actionsPanel(data) {
  const w = data.workflow;
  const edited = (ev) => { ev.target.dataset.edited = "1"; };
  const sigName = el("input", { id: "sig-name", value: data.waiting_for || "", placeholder: "signal name" });
  const sigPayload = el("textarea", { id: "sig-payload", spellcheck: "false" }, "null");
  sigName.addEventListener("input", edited); sigPayload.addEventListener("input", edited);
  const signal = el("div", { class: "action" }, el("h3", {}, "Send a signal"),
    el("span", { class: "hint", id: "sig-hint" }, data.waiting_for ? `waiting for "${data.waiting_for}"` : "name and JSON payload"),
    sigName, sigPayload,
    el("button", { id: "btn-signal", class: "primary", disabled: !(w.status === "running" || w.status === "waiting"), onclick: () => act("signal",
      { id: w.id, name: sigName.value, payload: sigPayload.value },
      "Send signal?", `Send the signal "${sigName.value}" to workflow ${w.id} with this JSON payload:`, sigPayload.value) }, "Send signal…"));
  const rbTo = el("select", { id: "rb-to" });
  rbTo.addEventListener("change", edited);
  rbTo.append(el("option", { value: "latest" }, data.checkpoints.length ? "latest checkpoint" : "(no checkpoint)"));
  for (const c of data.checkpoints) {
    rbTo.append(el("option", { value: "ckpt:#" + c.n }, `checkpoint #${c.n}${c.label ? " " + c.label : ""} (entry ${c.index}, kept)`));
  }
  for (const e of data.journal) {
    if (e.kind === "step") rbTo.append(el("option", { value: "index:" + e.index }, `before step ${e.index} ${e.name}`));
  }
  const rbForce = el("input", { type: "checkbox", id: "rb-force" });
  rbForce.addEventListener("change", edited);
  const canRollBack = ROLLBACK_FROM.has(w.status);
  const rollback = el("div", { class: "action" }, el("h3", {}, "Roll back"),
    el("span", { class: "hint" }, canRollBack
      ? "rolled-back entries are kept for audit; a serving worker resumes"
      : `not while it is ${w.status}: cancel it first, or wait until it waits or ends`),
    rbTo,
    el("label", { class: "hint" }, rbForce, " without the compensations this dashboard cannot run"),
    el("button", { id: "btn-rollback", disabled: !canRollBack, onclick: () => {
      const v = rbTo.value;
      const to = v === "latest" ? null : v.startsWith("index:") ? Number(v.slice(6)) : v.slice(5);
      const force = rbForce.checked;
      const point = `Roll workflow ${w.id} back to: ${rbTo.options[rbTo.selectedIndex].text}.`;
      act("rollback", { id: w.id, to, force }, "Roll back?", force
        ? point + " Forced: the compensations of rolled-back steps whose code this dashboard's " +
          "process does not register do NOT run; what those steps did stays done, and the " +
          "resumed workflow does it again."
        : point + " Compensations of rolled-back steps run only where their code is registered: " +
          "if this dashboard's process cannot run them, the rollback is refused (tick " +
          "\"without the compensations\" to force it).");
    } }, "Roll back…"));
  const control = el("div", { class: "action" }, el("h3", {}, "Cancel or resume"),
    el("span", { class: "hint" }, "cancel stops at the next durable call and runs compensations"),
    el("div", {},
      el("button", { id: "btn-cancel", class: "danger", disabled: !ACTIVE.has(w.status), onclick: () => act("cancel", { id: w.id }, "Cancel workflow?", `Cancel workflow ${w.id}? It stops at its next durable call; compensations of its completed steps run.`) }, "Cancel…"),
      " ",
      el("button", { id: "btn-resume", disabled: !(w.status === "cancelled" || w.status === "dead_letter"), onclick: () => act("resume", { id: w.id }, "Resume workflow?", `Resume workflow ${w.id} from where its journal ends?`) }, "Resume…")));
  return el("section", { class: "panel" }, el("h2", {}, "Control"), el("div", { class: "actions" }, signal, control, rollback));
}

async function act(kind, body, title, text, detail) {
  if (!(await confirmAction(title, text, detail))) return;
  try {
    const res = await api("/api/" + kind, body);
    flash(res.message, false);
  } catch (e) {
    flash(e.message, true);
    return;
  }
  route();
}

function journalPanel(data) {
  const body = el("tbody");
  const t0 = data.workflow.created_at;
  for (const e of data.journal) {
    body.append(el("tr", {},
      el("td", {}, String(e.index)), el("td", {}, e.kind), el("td", { class: "mono" }, e.name),
      el("td", { class: "mono nowrap" }, "+" + dur(Math.max(0, e.started_at - t0))),
      el("td", { class: "mono nowrap" }, e.kind === "step" ? dur(Math.max(0, e.ended_at - e.started_at)) : ""),
      el("td", {}, e.kind === "step" ? String(e.attempts) : ""),
      el("td", { class: e.error ? "detail error" : "detail" }, e.error || e.preview, e.note ? el("div", {}, "↳ " + e.note) : null)));
  }
  const parts = [el("h2", {}, "Journal")];
  if (data.truncated) {
    const first = data.journal.length ? data.journal[0].index : (data.before || 0);
    const earlier = "/workflow?id=" + encodeURIComponent(data.workflow.id) + "&before=" + first;
    parts.push(el("p", { class: "muted", id: "journal-truncated" },
      `${data.truncated} earlier entries not shown. `,
      el("a", { href: earlier, id: "journal-earlier" }, "Show earlier entries")));
  }
  if (data.before !== null && data.before !== undefined) {
    parts.push(el("p", { class: "muted" }, `Entries before #${data.before}. `,
      el("a", { href: "/workflow?id=" + encodeURIComponent(data.workflow.id) }, "Show the latest entries")));
  }
  parts.push(
    data.journal.length ? el("table", { id: "journal" }, el("thead", {}, el("tr", {},
      ["#", "kind", "name", "at", "took", "attempts", "result / note"].map((h) => el("th", {}, h)))), body)
      : el("p", { class: "muted" }, "No journal entries yet."));
  if (data.rewound.length) {
    parts.push(el("h2", { class: "spaced" }, "Rolled back (kept for audit)"),
      el("ul", {}, data.rewound.map((r) => el("li", {}, `${when(r.at)}: #${r.index} ${r.kind} ${r.name} — ${r.why}`))));
    if (data.rewound_truncated) parts.push(el("p", { class: "muted" }, `${data.rewound_truncated} earlier rolled-back entries not shown`));
  }
  return el("section", { class: "panel" }, ...parts);
}

// -- the timeline picture -------------------------------------------------------------
function drawTimeline(tl, now, active) {
  const labelW = 230, rowH = 22, top = 34, right = 24;
  const width = Math.max(720, Math.min(1360, (document.getElementById("main").clientWidth || 1100) - 34));
  const plotW = width - labelW - right;
  const rows = tl.rows;
  const height = top + rows.length * rowH + 16;
  const start = tl.start, span = Math.max(tl.end - tl.start, 1e-3);
  const x = (t) => labelW + ((t - start) / span) * plotW;
  const root = svg("svg", { class: "timeline", id: "timeline", viewBox: `0 0 ${width} ${height}`,
                            width, height, role: "img", "aria-label": "workflow timeline" });
  // axis ticks
  const steps = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60,
                 120, 300, 600, 1800, 3600, 7200, 21600, 43200, 86400];
  const step = steps.find((s) => span / s <= 8) || span / 8;
  for (let t = 0; t <= span + 1e-9; t += step) {
    const px = x(start + t);
    root.append(svg("line", { class: "grid", x1: px, x2: px, y1: top - 6, y2: height - 10 }));
    root.append(svg("text", { class: "tick", x: px, y: top - 12, "text-anchor": t ? "middle" : "start" }, t ? "+" + dur(t) : "0"));
  }
  rows.forEach((row, i) => {
    const y = top + i * rowH;
    if (i % 2 === 0) root.append(svg("rect", { class: "rowbg", x: 0, y, width, height: rowH }));
    const full = (row.index !== null && row.index !== undefined ? row.index + " " : "") + row.label;
    const label = full.length > 30 ? full.slice(0, 29) + "…" : full;
    root.append(tooltip(svg("text", { class: "label", x: 6, y: y + 15 }, label), row.label));
    for (const s of row.segments) {
      const x1 = x(s.start), w = Math.max(2, x(s.end) - x1);
      const rect = svg("rect", { class: "seg seg-" + s.style, x: x1, y: y + 4, width: w, height: rowH - 8, rx: 2,
                                 "data-style": s.style });
      root.append(tooltip(rect, s.title));
    }
    for (const m of row.marks) {
      const cx = x(m.at), cy = y + rowH / 2;
      const shape = m.style === "checkpoint"
        ? svg("polygon", { points: `${cx},${cy - 7} ${cx + 7},${cy} ${cx},${cy + 7} ${cx - 7},${cy}` })
        : svg("circle", { cx, cy, r: m.style === "instant" ? 3 : 5.5 });
      shape.setAttribute("class", "mark mark-" + m.style);
      shape.setAttribute("data-style", m.style);
      root.append(tooltip(shape, m.title));
    }
  });
  for (const ev of tl.events) {
    const px = x(ev.at);
    root.append(tooltip(svg("line", { class: "event ev-" + ev.style, x1: px, x2: px, y1: top - 4, y2: height - 10,
                                      "data-style": ev.style }), ev.title));
    root.append(tooltip(svg("text", { class: "ev-text-" + ev.style, x: px + 3, y: height - 2 }, ev.style), ev.title));
  }
  if (active) {
    const px = x(now);
    root.append(tooltip(svg("line", { class: "now-line", x1: px, x2: px, y1: top - 6, y2: height - 10 }), "now"));
  }
  const box = el("div", { class: "timeline-box" }, root);
  if (tl.hidden) box.append(el("p", { class: "muted" }, `${tl.hidden} more rows not drawn`));
  return box;
}

function legend() {
  const items = [["ok", "step"], ["failed", "failed"], ["retry", "failed attempt"], ["backoff", "retry delay"],
    ["crashed", "attempt cut off by a crash"], ["waiting", "waiting for a signal"], ["sleep", "durable sleep"],
    ["compensate", "compensation"], ["rewound", "rolled back"]];
  const box = el("div", { class: "legend" });
  for (const [cls, text] of items) {
    const sw = svg("svg", { width: 14, height: 10 });
    sw.append(svg("rect", { class: "seg-" + cls, width: 14, height: 10, rx: 2 }));
    box.append(el("span", {}, sw, " " + text));
  }
  box.append(el("span", {}, "◆ checkpoint"), el("span", {}, "● signal received"),
             el("span", {}, "┆ last seen alive / recovered / rollback"));
  return box;
}

// -- routing --------------------------------------------------------------------------
async function route() {
  clearTimeout(refreshTimer);
  const main = document.getElementById("main");
  await session();
  if (location.pathname === "/workflow") await workflowPage(main);
  else await listPage(main);
}

document.addEventListener("DOMContentLoaded", () => {
  takeTokenFromFragment();
  setupTokenForm();
  window.addEventListener("popstate", route);
  route();
});
