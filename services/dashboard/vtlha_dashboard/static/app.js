// The vtl-ha dashboard: the status and the event timeline, kept live by Server-Sent
// Events (/api/stream); operator actions go to /api/action/<verb> with the operator's
// token in the Authorization header (never a cookie). Everything shown is set as text.
"use strict";

const TOKEN_KEY = "vtlha-token";
const TIMELINE_MAX = 500;
const ACTION_TIMEOUT_MS = 15000;
let actions = [];

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function setText(node, text, cls) {
  if (node.textContent !== text) node.textContent = text;
  if (cls !== undefined && node.className !== cls) node.className = cls;
}

function secs(x) { return x === null || x === undefined ? "–" : `${x.toFixed(2)} s`; }

function show(id, text) {
  const p = $(id);
  p.hidden = !text;
  p.textContent = text || "";
}

// ---- signing in ---------------------------------------------------------------------
function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function whoami(t) {
  const r = await fetch("/api/whoami", { headers: { Authorization: `Bearer ${t}` },
                                          signal: AbortSignal.timeout(ACTION_TIMEOUT_MS) });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

function signedIn(who) {
  $("who").textContent = who ? `signed in as ${who.operator} (NATS user ${who.nats_user})` : "";
  $("token").hidden = !!who;
  $("signin-btn").hidden = !!who;
  $("signout-btn").hidden = !who;
}

$("signin").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const t = $("token").value.trim();
  if (!t) return;
  try {
    const who = await whoami(t);
    sessionStorage.setItem(TOKEN_KEY, t);
    $("token").value = "";
    signedIn(who);
    show("error", "");
  } catch (e) {
    show("error", `Sign-in refused: ${e.message}`);
  }
});

$("signout-btn").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  signedIn(null);
});

// ---- actions --------------------------------------------------------------------------
async function act(verb, body, question) {
  if (question && !window.confirm(question)) return;
  show("message", ""); show("error", "");
  const headers = { "Content-Type": "application/json" };
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;  // without: the server says to sign in
  try {
    const r = await fetch(`/api/action/${verb}`, {
      method: "POST", headers, body: JSON.stringify(body),
      signal: AbortSignal.timeout(ACTION_TIMEOUT_MS) });
    const out = await r.json();
    if (r.ok) show("message", `${verb}: ${out.status}`);
    else show("error", `${verb} refused (HTTP ${r.status}): ${out.error || out.status}`);
  } catch (e) {
    show("error", `${verb}: no answer from the dashboard (${e.message})`);
  }
}

function button(label, verb, body, question) {
  const b = el("button", { type: "button", "data-action": verb }, label);
  b.addEventListener("click", () => act(verb, body, question));
  return b;
}

// ---- the status -----------------------------------------------------------------------
// A table of one row per name: the name, an empty cell per class (filled by
// renderStatus), and a cell for the row's buttons.
function table(cls, headers, names, attr, cells, buttons) {
  const t = el("table", { class: cls }, el("tr", {}, ...[...headers, ""].map((h) => el("th", {}, h))));
  for (const name of names) {
    const actionsCell = el("td", {});
    buttons(name, actionsCell);
    t.append(el("tr", { [attr]: name }, el("td", { class: "name" }, name),
                ...cells.map((c) => el("td", { class: c })), actionsCell));
  }
  return t;
}

function pairSection(p) {
  const sec = el("section", { class: "pair", "data-pair": p.name });
  const head = el("div", { class: "pair-head" }, el("h2", {}, `Pair ${p.name}`),
    el("span", { class: "badge maintenance" }), el("span", { class: "badge failback" }),
    el("span", { class: "badge held" }), el("span", { class: "badge standby" }));
  if (actions.includes("failback"))
    head.append(button("Failback", "failback", { pair: p.name },
                       `Move every group of ${p.name} away from home back home?`));
  if (actions.includes("maintenance")) {
    head.append(button("Maintenance on", "maintenance", { pair: p.name, on: true }));
    head.append(button("Maintenance off", "maintenance", { pair: p.name, on: false }));
  }
  const nodes = table("nodes", ["node", "up", "heartbeat", "checks", "storage", "management",
                                 "leases", "held"], p.nodes, "data-node",
                      ["up", "hb", "checks", "storage", "mgmt", "leases", "held"], (n, cell) => {
    if (!actions.includes("standby")) return;
    cell.append(button("Standby on", "standby", { pair: p.name, node: n, on: true },
                       `Put ${n} in standby (move its groups away and keep them away)?`));
    cell.append(button("Standby off", "standby", { pair: p.name, node: n, on: false }));
  });
  const groups = table("groups", ["group", "kind", "home", "owner", "epoch", "state", "served",
                                  "lease valid for"], p.groups, "data-group",
                       ["kind", "home", "owner", "epoch", "state", "served", "lease"], (g, cell) => {
    if (actions.includes("switchover"))
      cell.append(button("Switchover", "switchover", { group: g },
                         `Move ${g} to the companion of the node serving it now?`));
  });
  sec.append(head, el("h3", {}, "Nodes"), nodes, el("h3", {}, "Groups"), groups);
  return sec;
}

function layoutKey(st) {
  return JSON.stringify([actions, st.pairs.map((p) => [p.name, p.nodes, p.groups])]);
}

function renderStatus(doc) {
  actions = doc.actions || [];
  $("signin").hidden = doc.signin === false;
  const st = doc.status;
  show("status-error", doc.error ? `Status: ${doc.error}` : "");
  if (!st) return;
  setText($("cluster"), st.cluster);
  setText($("version"), `vtl-ha ${st.version}`);
  setText($("health"), st.ok ? "healthy" : "problems", `badge ${st.ok ? "ok" : "bad"}`);
  setText($("arbiter"), st.arbiter ? `active arbiter ${st.arbiter.node}, term ${st.arbiter.term}`
                                   : "no active arbiter");
  const pairs = $("pairs");
  const key = layoutKey(st);
  if (pairs.dataset.layout !== key) {
    pairs.replaceChildren(...st.pairs.map(pairSection));
    pairs.dataset.layout = key;
  }
  for (const p of st.pairs) {
    const sec = pairs.querySelector(`[data-pair="${CSS.escape(p.name)}"]`);
    setText(sec.querySelector(".maintenance"), p.maintenance ? "maintenance on" : "maintenance off",
            `badge maintenance ${p.maintenance ? "warn" : "off"}`);
    setText(sec.querySelector(".failback"), `failback ${p.failback}`);
    setText(sec.querySelector(".held"), p.held_down.length ? `held down: ${p.held_down.join(", ")}`
                                                          : "none held down",
            `badge held ${p.held_down.length ? "bad" : "off"}`);
    const standby = p.standby || [];
    setText(sec.querySelector(".standby"), standby.length ? `standby: ${standby.join(", ")}`
                                                          : "none in standby",
            `badge standby ${standby.length ? "warn" : "off"}`);
  }
  for (const n of st.nodes) {
    const row = pairs.querySelector(`tr[data-node="${CSS.escape(n.name)}"]`);
    if (!row) continue;
    const c = (k) => row.querySelector(`.${k}`);
    setText(c("up"), n.up ? "up" : "DOWN", `up ${n.up ? "ok" : "bad"}`);
    setText(c("hb"), secs(n.heartbeat_age_s));
    const failing = n.checks.filter((x) => !x.ok).map((x) => x.name);
    setText(c("checks"), n.checks.length ? (failing.length ? `failing: ${failing.join(", ")}`
                                                          : `${n.checks.length} ok`) : "–",
            `checks ${failing.length ? "bad" : ""}`);
    const lost = n.devices.filter((d) => !d.reachable).map((d) => d.device);
    setText(c("storage"), n.storage_ok === null
            ? (n.storage_age_s === null ? "not heard" : `stale (${secs(n.storage_age_s)})`)
            : lost.length ? `lost: ${lost.join(", ")}` : `${n.devices.length} devices ok`,
            `storage ${n.storage_ok === false ? "bad" : ""}`);
    setText(c("mgmt"), n.mgmt ? (n.mgmt.healthy ? "healthy" : n.mgmt.detail || "failed") : "not heard",
            `mgmt ${n.mgmt && !n.mgmt.healthy ? "bad" : ""}`);
    setText(c("leases"), n.leases.map((l) => `${l.group}@${l.epoch} ${l.phase} ${secs(l.valid_for_s)}`)
                                  .join("; ") || "–");
    setText(c("held"), n.held_down ? "held down" : "–", `held ${n.held_down ? "bad" : ""}`);
  }
  for (const g of st.groups) {
    const row = pairs.querySelector(`tr[data-group="${CSS.escape(g.name)}"]`);
    if (!row) continue;
    const c = (k) => row.querySelector(`.${k}`);
    setText(c("kind"), g.kind);
    setText(c("home"), g.home);
    setText(c("owner"), g.owner || "none", `owner ${g.at_home === false ? "warn" : ""}`);
    setText(c("epoch"), g.epoch === null ? "–" : String(g.epoch));
    setText(c("state"), g.state || "–");
    setText(c("served"), g.served === null ? "unknown" : g.served ? "served" : "NOT served",
            `served ${g.served ? "ok" : "bad"}`);
    row.querySelector(".served").title = g.served_detail;
    setText(c("lease"), secs(g.lease_valid_for_s));
  }
  $("problems").replaceChildren(...st.problems.map((p) =>
    el("li", { class: p.severity }, `${p.severity}: ${p.text}`)));
  $("problems-box").hidden = st.problems.length === 0;
}

// ---- the timeline ---------------------------------------------------------------------
function addEvent(e) {
  const list = $("timeline");
  if (list.querySelector(`[data-seq="${e.seq}"]`)) return;  // again after a reconnect
  const when = e.sent_at ? new Date(e.sent_at * 1000).toLocaleTimeString() : "";
  const move = e.group ? ` ${e.group}${e.old || e.new ? ` ${e.old || "-"} → ${e.new || "-"}` : ""}` : "";
  const who = e.operator ? ` [${e.operator}]` : "";
  const li = el("li", { "data-seq": String(e.seq), "data-kind": e.kind },
    `#${e.seq} ${when} `, el("span", { class: "kind" }, e.kind), `${move}${who} — ${e.reason}`);
  // newest first: before the first item with a lower number
  const after = [...list.children].find((x) => Number(x.dataset.seq) < e.seq);
  list.insertBefore(li, after || null);
  while (list.children.length > TIMELINE_MAX) list.lastElementChild.remove();
}

// ---- the live stream ------------------------------------------------------------------
function connect() {
  const es = new EventSource("/api/stream");
  es.addEventListener("open", () => setText($("live"), "live", "badge ok"));
  es.addEventListener("error", () => setText($("live"), "reconnecting", "badge bad"));
  es.addEventListener("status", (m) => renderStatus(JSON.parse(m.data)));
  es.addEventListener("event", (m) => addEvent(JSON.parse(m.data)));
}

(async () => {
  const t = token();
  if (t) {
    try { signedIn(await whoami(t)); } catch { sessionStorage.removeItem(TOKEN_KEY); signedIn(null); }
  } else signedIn(null);
  connect();
})();
