// The Ferry dashboard: one page, reading the JSON API. Every string comes from
// the catalogue of the user's language (/assets/i18n/{zh,en}.json).
"use strict";

const S = { user: null, lang: "zh", t: {}, sort: { key: "id", dir: 1 }, filter: "", timer: null };

function t(key, vars) {
  let s = S.t[key] || key;
  for (const [k, v] of Object.entries(vars || {})) s = s.split("{" + k + "}").join(String(v));
  return s;
}

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && S.user) headers["X-CSRF-Token"] = S.user.csrf;
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "same-origin" });
  const data = await r.json().catch(() => ({}));
  if (r.status === 401 && path !== "/api/login") { S.user = null; render(); throw new Error(data.error || "401"); }
  if (!r.ok) throw new Error(data.error || String(r.status));
  return data;
}

async function loadLanguage(lang) {
  S.lang = lang === "en" ? "en" : "zh";
  S.t = await (await fetch("/assets/i18n/" + S.lang + ".json")).json();
  document.documentElement.lang = S.lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-t]").forEach(n => { n.textContent = t(n.dataset.t); });
  document.getElementById("lang").textContent = t("lang.switch");
}

function time(ms) {
  if (!ms) return t("never");
  const d = new Date(ms);
  const p = n => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

function badge(kind, key) { return el("span", { class: "badge " + kind }, t(key)); }

function table(cols, rows, onSort) {
  const head = el("tr", {}, cols.map(c => el("th", {
    class: (c.num ? "num " : "") + (onSort && c.key ? "sort" : ""),
    "data-key": c.key || "",
    onclick: () => onSort && c.key && onSort(c.key),
  }, t(c.title))));
  const body = rows.length ? rows.map(r => el("tr", {}, cols.map(c => el("td", { class: c.num ? "num" : "" }, c.cell(r)))))
    : [el("tr", {}, el("td", { colspan: cols.length, class: "muted" }, t("empty")))];
  return el("table", {}, el("thead", {}, head), el("tbody", {}, body));
}

function main(...kids) {
  const m = document.getElementById("main");
  m.replaceChildren(...kids);
}

function loginPage(message) {
  document.getElementById("top").hidden = true;
  const name = el("input", { type: "text", id: "name", autocomplete: "username" });
  const pass = el("input", { type: "password", id: "password", autocomplete: "current-password" });
  const err = el("div", { class: "error", id: "login-error" }, message || "");
  const form = el("form", {
    class: "login", id: "login", onsubmit: async ev => {
      ev.preventDefault();
      try {
        S.user = await api("POST", "/api/login", { name: name.value, password: pass.value });
        await loadLanguage(S.user.language);
        render();
      } catch (e) { err.textContent = e.message; }
    }
  }, el("h1", {}, t("login.title")), el("label", { for: "name" }, t("login.name")), name,
    el("label", { for: "password" }, t("login.password")), pass,
    el("button", { class: "primary", type: "submit", id: "login-submit" }, t("login.submit")), err);
  main(form);
}

async function overview() {
  const [o, agents] = await Promise.all([api("GET", "/api/overview"), api("GET", "/api/agents")]);
  const cards = el("div", { class: "cards" }, ["healthy", "lagging", "offline", "alarm"].map(h =>
    el("div", { class: "card " + h, id: "count-" + h }, el("div", { class: "n" }, o.counts[h]), el("div", { class: "l" }, t("health." + h)))));
  const filter = el("input", { type: "text", id: "filter", placeholder: t("overview.filter"), value: S.filter });
  const holder = el("div", { id: "agents" });
  const draw = () => {
    const k = S.sort.key;
    const rows = agents.filter(a => a.department.startsWith(S.filter)).sort((a, b) => {
      const x = a[k], y = b[k];
      return (typeof x === "number" ? x - y : String(x).localeCompare(String(y))) * S.sort.dir;
    });
    holder.replaceChildren(table([
      { key: "id", title: "col.agent", cell: a => el("a", { href: "#/agent/" + encodeURIComponent(a.id), class: "agent-link" }, a.id) },
      { key: "department", title: "col.department", cell: a => a.department },
      { key: "health", title: "col.health", cell: a => badge(a.health, "health." + a.health) },
      { key: "state", title: "col.connection", cell: a => [badge(a.state, "state." + a.state), " ", el("span", { class: "muted" }, a.connection.transport)] },
      { key: "last_seen_unix_ms", title: "col.last_seen", cell: a => time(a.last_seen_unix_ms) },
      { key: "streams", title: "col.streams", num: true, cell: a => a.streams.length },
      { key: "alarms", title: "col.alarms", num: true, cell: a => a.alarms },
    ], rows, key => { S.sort = { key, dir: S.sort.key === key ? -S.sort.dir : 1 }; draw(); }));
  };
  filter.addEventListener("input", () => { S.filter = filter.value.trim(); draw(); });
  draw();
  const districts = table([
    { title: "col.district", cell: d => d.district },
    ...["healthy", "lagging", "offline", "alarm"].map(h => ({ title: "health." + h, num: true, cell: d => d.counts[h] })),
  ], o.districts);
  main(el("h1", {}, t("overview.title")), cards, el("div", { class: "toolbar" }, filter, el("span", { class: "muted" }, t("overview.agents", { n: o.agents }))),
    holder, el("h2", {}, t("overview.districts")), districts, ...(S.user.role === "admin" ? enrollForm() : []));
}

// Administrators enrol an agent: its certificate is issued here and its files
// offered for download once (the exchange keeps no agent key).
function enrollForm() {
  const id = el("input", { type: "text", id: "enroll-id", placeholder: t("enroll.agent_id") });
  const dept = el("input", { type: "text", id: "enroll-department", placeholder: t("enroll.department") });
  const replace = el("input", { type: "checkbox", id: "enroll-replace" });
  const out = el("div", { id: "enroll-result" });
  const go = el("button", { class: "primary", id: "enroll-submit", onclick: async () => {
    out.replaceChildren();
    try {
      const r = await api("POST", "/api/enroll", { agent_id: id.value.trim(), department: dept.value.trim(), replace: replace.checked });
      const links = Object.entries(r.files).map(([name, text]) => {
        const url = URL.createObjectURL(new Blob([text], { type: "application/octet-stream" }));
        return el("a", { href: url, download: name, class: "enroll-file" }, name);
      });
      out.replaceChildren(el("p", {}, t("enroll.done", { id: r.agent_id, serial: r.serial })),
        el("div", { class: "toolbar" }, ...links), el("p", { class: "error" }, t("enroll.key_once")));
    } catch (e) { out.replaceChildren(el("div", { class: "error" }, e.message)); }
  } }, t("enroll.submit"));
  return [el("h2", {}, t("enroll.title")),
    el("div", { class: "toolbar" }, id, dept, el("label", { for: "enroll-replace" }, replace, " ", t("enroll.replace")), go), out];
}

async function agentPage(id) {
  const r = await api("GET", "/api/agents/" + encodeURIComponent(id));
  const a = r.agent;
  const facts = el("dl", { class: "facts" },
    el("dt", {}, t("col.department")), el("dd", {}, a.department),
    el("dt", {}, t("col.connection")), el("dd", {}, badge(a.state, "state." + a.state)),
    el("dt", {}, t("agent.transport")), el("dd", {}, a.connection.transport),
    el("dt", {}, t("agent.remote")), el("dd", { class: "mono" }, a.connection.remote),
    el("dt", {}, t("col.last_seen")), el("dd", {}, time(a.last_seen_unix_ms)),
    el("dt", {}, t("agent.host")), el("dd", {}, a.host),
    el("dt", {}, t("agent.software")), el("dd", {}, a.software),
    el("dt", {}, t("agent.buffer")), el("dd", {}, `${a.buffer_bytes} / ${a.buffer_max_bytes}`),
    el("dt", {}, t("agent.cert")), el("dd", { class: "mono" }, a.cert_serial),
    el("dt", {}, t("agent.cert_expiry")), el("dd", {}, time(a.cert_not_after_unix * 1000)));
  const streams = table([
    { title: "col.stream", cell: s => el("a", { href: streamHref(a.id, s.name), class: "stream-link" }, s.name) },
    { title: "col.kind", cell: s => s.kind },
    { title: "col.head", num: true, cell: s => s.head_seq },
    { title: "col.acked", num: true, cell: s => s.acked_seq },
    { title: "col.backlog", num: true, cell: s => s.backlog_bytes },
    { title: "col.position", cell: s => el("span", { class: "mono" }, s.position) },
    { title: "col.error", cell: s => s.error || s.ship_error },
  ], a.streams);
  const charts = await historyCharts(a.id);
  const kids = [el("h1", {}, t("agent.title", { id: a.id })), facts, el("h2", {}, t("col.streams")), streams,
    el("h2", {}, t("chart.title")), ...charts,
    el("h2", {}, t("nav.alarms")), alarmTable(r.alarms, () => agentPage(id))];
  if (S.user.role === "admin") {
    const out = el("span", { class: "muted", id: "revoke-result" });
    kids.push(el("h2", {}, ""), el("div", { class: "toolbar" }, el("button", {
      class: "danger", id: "revoke", onclick: async () => {
        if (!confirm(t("agent.revoke_confirm", { id: a.id }))) return;
        try { const x = await api("POST", "/api/agents/" + encodeURIComponent(a.id) + "/revoke"); out.textContent = t("agent.revoked", { n: x.closed_connections }); }
        catch (e) { out.textContent = e.message; }
      }
    }, t("agent.revoke")), out));
  }
  main(...kids);
}

function streamHref(agent, stream) {
  return "#/agent/" + encodeURIComponent(agent) + "/stream/" + encodeURIComponent(stream);
}

// One stream: its declaration, what is stored and delivered, 24 h of
// throughput, and its last records' metadata (never their contents).
async function streamPage(agent, name) {
  const r = await api("GET", "/api/agents/" + encodeURIComponent(agent) + "/streams/" + encodeURIComponent(name));
  const rep = r.reported || {};
  const declared = r.declared.length ? r.declared[r.declared.length - 1] : null;
  const facts = el("dl", { class: "facts", id: "stream-facts" },
    el("dt", {}, t("col.agent")), el("dd", {}, el("a", { href: "#/agent/" + encodeURIComponent(agent) }, agent)),
    el("dt", {}, t("col.kind")), el("dd", {}, rep.kind || ""),
    el("dt", {}, t("stream.catalog")), el("dd", { class: "mono", id: "stream-catalog" }, declared ? declared.catalog_id : ""),
    el("dt", {}, t("stream.sharing")), el("dd", { id: "stream-sharing" }, declared ? t("sharing." + declared.sharing) : ""),
    el("dt", {}, t("col.head")), el("dd", {}, rep.head_seq ?? ""),
    el("dt", {}, t("col.acked")), el("dd", {}, rep.acked_seq ?? ""),
    el("dt", {}, t("stream.stored_up_to")), el("dd", { id: "stream-stored" }, r.stored_up_to),
    el("dt", {}, t("col.position")), el("dd", { class: "mono" }, rep.position || ""),
    el("dt", {}, t("stream.incarnation")), el("dd", { class: "mono" }, r.incarnation),
    el("dt", {}, t("col.error")), el("dd", {}, rep.error || rep.ship_error || ""),
    ...(r.held ? [el("dt", {}, t("stream.held")), el("dd", { class: "error" }, JSON.stringify(r.held))] : []));
  const history = r.declared.length > 1 ? table([
    { title: "stream.declared_from", num: true, cell: c => c.from_seq },
    { title: "stream.catalog", cell: c => el("span", { class: "mono" }, c.catalog_id) },
    { title: "stream.sharing", cell: c => t("sharing." + c.sharing) },
    { title: "col.since", cell: c => time(c.since_unix_ms) },
  ], r.declared) : null;
  const times = r.points.map(p => p.t);
  const charts = r.points.length >= 2
    ? el("div", { class: "charts" }, chart(t("chart.throughput"), times, r.points.map(p => p.records)),
      chart(t("chart.backlog"), times, r.points.map(p => p.backlog_bytes)))
    : el("p", { class: "muted" }, t("chart.none"));
  const gaps = table([
    { title: "col.from", num: true, cell: g => g.from },
    { title: "col.to", num: true, cell: g => g.to },
    { title: "col.since", cell: g => time(g.detected_unix_ms) },
    { title: "col.reason", cell: g => g.reason },
  ], r.gaps);
  const deliveries = table([
    { title: "col.delivery", cell: d => d.delivery },
    { title: "col.checkpoint", num: true, cell: d => d.checkpoint },
    { title: "col.lag_records", num: true, cell: d => d.lag_records },
    { title: "col.lag_seconds", num: true, cell: d => d.lag_seconds.toFixed(1) },
    { title: "col.error", cell: d => d.last_error || (d.stopped ? "stopped" : "") },
  ], r.deliveries);
  const last = table([
    { title: "col.seq", num: true, cell: x => x.seq },
    { title: "col.time", cell: x => x.time },
    { title: "col.stored", cell: x => x.stored },
    { title: "col.kind", cell: x => x.kind },
    { title: "col.table", cell: x => x.table || "" },
    { title: "col.op", cell: x => x.op || "" },
    { title: "col.bytes", num: true, cell: x => x.bytes },
    { title: "col.position", cell: x => el("span", { class: "mono" }, x.position) },
  ], r.last_records);
  main(el("h1", {}, t("stream.title", { agent, stream: name })), facts, ...(history ? [history] : []),
    el("h2", {}, t("chart.title")), charts,
    el("h2", {}, t("stream.gaps")), gaps,
    el("h2", {}, t("stream.deliveries")), deliveries,
    el("h2", {}, t("stream.last_records")), el("p", { class: "muted" }, t("stream.no_contents")), el("div", { id: "last-records" }, last));
}

// A line chart of `values` over `times` (Unix ms), drawn as SVG here.
function chart(title, times, values) {
  const W = 560, H = 140, L = 56, B = 22, T = 10;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  const max = Math.max(1, ...values);
  const t0 = times[0], t1 = Math.max(times[times.length - 1], t0 + 1);
  const x = t => L + (W - L - 8) * (t - t0) / (t1 - t0);
  const y = v => T + (H - T - B) * (1 - v / max);
  add("line", { x1: L, y1: y(0), x2: W - 8, y2: y(0), class: "axis" });
  add("line", { x1: L, y1: y(max), x2: W - 8, y2: y(max), class: "grid" });
  add("text", { x: L - 6, y: y(max) + 4, "text-anchor": "end", class: "tick" }, max.toLocaleString());
  add("text", { x: L - 6, y: y(0) + 4, "text-anchor": "end", class: "tick" }, "0");
  add("text", { x: L, y: H - 4, class: "tick" }, time(t0).slice(11, 16));
  add("text", { x: W - 8, y: H - 4, "text-anchor": "end", class: "tick" }, time(t1).slice(11, 16));
  add("polyline", { points: times.map((t, i) => `${x(t).toFixed(1)},${y(values[i]).toFixed(1)}`).join(" "), class: "line" });
  return el("figure", { class: "chart" }, el("figcaption", {}, title), svg);
}

async function historyCharts(id) {
  const h = await api("GET", "/api/agents/" + encodeURIComponent(id) + "/history?hours=24");
  const out = [];
  for (const s of h.streams) {
    if (s.points.length < 2) continue;
    const times = s.points.map(p => p.t);
    out.push(el("div", { class: "charts" }, el("h3", {}, s.stream),
      chart(t("chart.throughput"), times, s.points.map(p => p.records)),
      chart(t("chart.backlog"), times, s.points.map(p => p.backlog_bytes))));
  }
  return out.length ? out : [el("p", { class: "muted" }, t("chart.none"))];
}

// An alarm's message in the user's language: its catalogue text with its
// values, else (a source's own error text) as the exchange has it.
// Values named *_ms are times (Unix ms), shown as every other time is.
function alarmText(x) {
  const key = x.text_key ? "alarm_text." + x.text_key : "";
  if (!key || !S.t[key]) return x.message;
  const args = {};
  for (const [k, v] of Object.entries(x.args || {})) args[k] = k.endsWith("_ms") ? time(Number(v)) : v;
  return t(key, args);
}

function alarmTable(list, again) {
  const canAck = S.user.role === "admin" || S.user.role === "operator";
  return table([
    { title: "col.kind_alarm", cell: x => el("span", {}, badge(x.active ? "active" : "cleared", x.active ? "alarms.active" : "alarms.cleared"), " ", t("alarm." + x.kind)) },
    { title: "col.agent", cell: x => el("a", { href: "#/agent/" + encodeURIComponent(x.agent) }, x.agent) },
    { title: "col.stream", cell: x => x.stream },
    { title: "col.since", cell: x => time(x.since_unix_ms) },
    { title: "col.message", cell: x => alarmText(x) },
    { title: "col.ack", cell: x => {
      if (x.acknowledged) return t("alarms.acked_by", { by: x.acknowledged.by, note: x.acknowledged.note });
      if (!x.active || !canAck) return "";
      const note = el("input", { type: "text", class: "ack-note", placeholder: t("alarms.note") });
      return el("span", { class: "toolbar" }, note, el("button", {
        class: "primary ack", "data-alarm": x.id, onclick: async () => {
          await api("POST", "/api/alarms/" + encodeURIComponent(x.id) + "/ack", { note: note.value });
          again();
        }
      }, t("alarms.ack")));
    } },
  ], list);
}

async function alarmsPage() {
  const list = await api("GET", "/api/alarms");
  main(el("h1", {}, t("alarms.title")), alarmTable(list, alarmsPage));
}

async function auditPage() {
  const list = await api("GET", "/api/audit");
  main(el("h1", {}, t("audit.title")), table([
    { title: "#", num: true, cell: e => e.seq },
    { title: "col.time", cell: e => time(e.time_unix_ms) },
    { title: "col.actor", cell: e => e.actor },
    { title: "col.action", cell: e => el("span", { class: "audit-action" }, e.action) },
    { title: "col.target", cell: e => e.target },
    { title: "col.detail", cell: e => el("span", { class: "mono" }, JSON.stringify(e.detail)) },
  ], list.slice().reverse()));
}

// Every 3 s, unless someone is typing (a filter, a note) or an enrolment's
// files wait to be downloaded (they are offered once).
function refresh() {
  const typing = document.activeElement && document.activeElement.tagName === "INPUT" && document.activeElement.value !== "";
  const holding = document.querySelector("#enroll-result > *") !== null;
  if (typing || holding) S.timer = setTimeout(refresh, 3000);
  else render();
}

async function usersPage() {
  const list = await api("GET", "/api/users");
  const name = el("input", { type: "text", id: "new-name", placeholder: t("login.name") });
  const role = el("select", { id: "new-role" }, ["operator", "auditor", "admin"].map(r => el("option", { value: r }, t("role." + r))));
  const pass = el("input", { type: "password", id: "new-password", placeholder: t("login.password") });
  const err = el("span", { class: "error", id: "users-error" });
  const add = el("button", { class: "primary", id: "add-user", onclick: async () => {
    try { await api("POST", "/api/users", { name: name.value, role: role.value, password: pass.value }); usersPage(); }
    catch (e) { err.textContent = e.message; }
  } }, t("users.add"));
  main(el("h1", {}, t("users.title")), table([
    { title: "login.name", cell: u => u.name },
    { title: "users.role", cell: u => t("role." + u.role) },
    { title: "users.credential", cell: u => t("credential." + (u.credential || "password")) },
    { title: "users.created", cell: u => time(u.created_unix_ms) },
    { title: "users.locked", cell: u => u.locked ? time(u.locked_until_unix_ms) : "" },
    { title: "", cell: u => u.name === S.user.name ? "" : el("button", { class: "link", onclick: async () => {
      if (!confirm(t("users.remove_confirm", { name: u.name }))) return;
      await api("POST", "/api/users/" + encodeURIComponent(u.name) + "/remove"); usersPage();
    } }, t("users.remove")) },
  ], list), el("h2", {}, t("users.add")), el("div", { class: "toolbar" }, name, role, pass, add, err));
}

async function render() {
  if (S.timer) { clearTimeout(S.timer); S.timer = null; }
  if (!S.user) { loginPage(); return; }
  document.getElementById("top").hidden = false;
  document.getElementById("who").textContent = `${S.user.name} · ${t("role." + S.user.role)}`;
  document.getElementById("nav-audit").hidden = !(S.user.role === "auditor" || S.user.role === "admin");
  document.getElementById("nav-users").hidden = S.user.role !== "admin";
  const route = location.hash.replace(/^#\//, "").split("/");
  document.querySelectorAll("header nav a").forEach(a => a.classList.toggle("on", a.id === "nav-" + (route[0] || "overview")));
  try {
    if (route[0] === "agent" && route[1] && route[2] === "stream" && route[3]) await streamPage(decodeURIComponent(route[1]), decodeURIComponent(route[3]));
    else if (route[0] === "agent" && route[1]) await agentPage(decodeURIComponent(route[1]));
    else if (route[0] === "alarms") await alarmsPage();
    else if (route[0] === "audit") await auditPage();
    else if (route[0] === "users") await usersPage();
    else await overview();
  } catch (e) { if (S.user) main(el("div", { class: "error" }, e.message)); }
  // Refreshed while nobody types.
  if (S.user) S.timer = setTimeout(refresh, 3000);
}

window.addEventListener("hashchange", render);
window.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("lang").addEventListener("click", async () => {
    const next = S.lang === "zh" ? "en" : "zh";
    if (S.user) { await api("POST", "/api/language", { language: next }); S.user.language = next; }
    await loadLanguage(next);
    render();
  });
  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("POST", "/api/logout"); } catch (e) { /* gone already */ }
    S.user = null; render();
  });
  try { S.user = await api("GET", "/api/session"); } catch (e) { S.user = null; }
  await loadLanguage(S.user ? S.user.language : "zh");
  render();
});
