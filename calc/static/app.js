// The margin dashboard: connects to calc's websocket API (schemas/calc.py) and authenticates with a first
// `auth` message, keeps the desk's accounts live (table, chart, drivers), runs what-ifs and lists alerts;
// reconnects. The token comes once in the page's #token= fragment (a fragment is never sent to a server,
// so it is in no log); it is kept in sessionStorage (this tab only) and removed from the address bar.

import { band, clock, greeks, modelName, money, pct, signed, signedPct } from "./format.js";
import { MarginChart } from "./chart.js";
import { sparkline } from "./sparkline.js";

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const MAX_POINTS = 200_000; // per account; older points are thinned beyond this
const TREND_MS = 5 * 60_000; // sparkline window
const MAX_ALERTS = 300;
const REPLY_TIMEOUT_MS = 15_000;
const BACKOFF_MS = [500, 1000, 2000, 4000, 5000];

const TOKEN_KEY = "marginflow.token";

function takeToken() {
  const fromFragment = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromFragment) {
    sessionStorage.setItem(TOKEN_KEY, fromFragment);
    history.replaceState(null, "", location.pathname + location.search); // out of the address bar and history
  }
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

const state = {
  token: takeToken(),
  desk: "",
  accounts: [],
  rows: new Map(), // account -> latest margin row (drivers parsed)
  series: new Map(), // account -> {t: ms[], margin: [], collateral: []}
  open: new Map(), // account -> first margin of the day (from history) or first seen
  openFromHistory: new Set(), // accounts whose `open` is the rdb's first row of the day
  selected: null,
  active: new Map(), // account -> Set of raised rule names
  alertCount: 0,
  syms: new Set(),
  pending: new Map(), // request id -> {kind, account, timer}
  nextId: 1,
  lastMsg: 0,
  tableEls: new Map(), // account -> {tr, cells}
  dirty: new Set(), // accounts whose row needs repainting
  frame: false,
  forecasts: new Map(), // account -> {next, eod, "t+1"}: its latest forecast row per horizon
  checks: [], // the parallel run's rows (callcheck), newest last
};
const MAX_CHECKS = 500;
const HORIZON_LABEL = { next: "Next cycle", eod: "End of day", "t+1": "T+1" };

const chart = new MarginChart($("chart"));
const cssVar = (n) => getComputedStyle(document.documentElement).getPropertyValue(n).trim();
const sparkColors = { up: cssVar("--adverse"), down: cssVar("--favourable"), flat: cssVar("--muted") };

// ---- connection -----------------------------------------------------------------------------------
let ws = null;
let attempt = 0;
let refused = false;

function setConn(s, text) {
  const c = $("conn");
  c.dataset.state = s;
  $("conn-text").textContent = text;
}

function connect() {
  if (!state.token) {
    setConn("refused", "no token");
    notice("This page needs an access token: open the link <code>marginflow tokens url</code> prints (<code>/#token=…</code>).");
    return;
  }
  const proto = location.protocol === "https:" ? "wss" : "ws";
  setConn(attempt ? "reconnecting" : "connecting", attempt ? `reconnecting (attempt ${attempt + 1})` : "connecting");
  ws = new WebSocket(`${proto}://${location.host}/ws`);
  ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: state.token }));
  ws.onmessage = (ev) => {
    state.lastMsg = Date.now();
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    handle(msg);
  };
  ws.onclose = () => {
    ws = null;
    for (const [id, p] of state.pending) failPending(id, p, "connection lost before the reply");
    if (refused) return;
    const delay = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
    attempt += 1;
    setConn("reconnecting", `reconnecting in ${(delay / 1000).toFixed(1)} s`);
    setTimeout(connect, delay);
  };
}

function send(msg) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(msg));
  return true;
}

function request(kind, msg, account) {
  const id = state.nextId++;
  const timer = setTimeout(() => {
    const p = state.pending.get(id);
    if (p) failPending(id, p, "no reply from calc");
  }, REPLY_TIMEOUT_MS);
  state.pending.set(id, { kind, account, timer });
  if (!send({ ...msg, id })) {
    failPending(id, state.pending.get(id), "not connected");
    return 0;
  }
  return id;
}

function failPending(id, p, reason) {
  clearTimeout(p.timer);
  state.pending.delete(id);
  if (p.kind === "what_if") showWhatIfError(reason);
  if (p.kind === "history") historyFailed(p.account, reason);
}

function notice(html, kind = "error") {
  const n = $("notice");
  n.innerHTML = html;
  n.dataset.kind = kind;
  n.hidden = !html;
}

// ---- messages -------------------------------------------------------------------------------------
function handle(msg) {
  switch (msg.type) {
    case "auth_reply":
      onAuth(msg);
      break;
    case "snapshot":
    case "margin":
      onRows(msg.rows, msg.type === "margin");
      break;
    case "alert":
      onAlerts(msg.rows);
      break;
    case "forecast":
      onForecast(msg.rows);
      break;
    case "callcheck":
      onChecks(msg.rows);
      break;
    case "what_if_reply":
      settle(msg.id) && showWhatIf(msg.result);
      break;
    case "history":
      settle(msg.id) && onHistory(msg);
      break;
    case "error":
      onError(msg);
      break;
    default:
      break;
  }
}

function settle(id) {
  const p = state.pending.get(id);
  if (!p) return false;
  clearTimeout(p.timer);
  state.pending.delete(id);
  return true;
}

function onError(msg) {
  const p = msg.id ? state.pending.get(msg.id) : null;
  if (p) {
    settle(msg.id);
    if (p.kind === "what_if") showWhatIfError(msg.reason);
    else historyFailed(p.account, msg.reason);
    return;
  }
  if (!state.desk && /token|permitted|authenticat/i.test(msg.reason)) {
    refused = true;
    sessionStorage.removeItem(TOKEN_KEY);
    setConn("refused", "access refused");
    notice(`Access refused: ${escapeHtml(msg.reason)}. Open the link <code>marginflow tokens url</code> prints.`);
    ws && ws.close();
    return;
  }
  notice(`calc: ${escapeHtml(msg.reason)}`, "warn");
}

function onAuth(msg) {
  const first = !state.desk;
  state.desk = msg.desk;
  state.accounts = msg.accounts;
  attempt = 0;
  notice("");
  $("desk").textContent = msg.desk;
  document.title = `marginflow · ${msg.desk}`;
  setConn("live", "live");
  buildTable();
  buildAccountSelect();
  send({ type: "subscribe", accounts: [] });
  if (first && !state.selected && msg.accounts.length) select(msg.accounts[0]);
  else if (state.selected) requestHistory(state.selected); // fill the gap while disconnected
}

function onRows(rows, live) {
  for (const r of rows) {
    let drivers = [];
    try {
      drivers = typeof r.drivers === "string" ? JSON.parse(r.drivers) : r.drivers || [];
    } catch {
      drivers = [];
    }
    for (const d of drivers) if (d.sym && d.sym !== "*other*") state.syms.add(d.sym);
    let components = null;
    try {
      components = r.components && r.components !== "{}" ? JSON.parse(r.components) : null;
    } catch {
      components = null;
    }
    const prev = state.rows.get(r.account);
    const row = { ...r, drivers, components, t: r.time ? r.time / 1e6 : prev?.t };
    state.rows.set(r.account, row);
    if (!state.open.has(r.account)) state.open.set(r.account, r.margin);
    if (live && row.t) append(r.account, row.t, r.margin, r.collateral);
    state.dirty.add(r.account);
  }
  updateSyms();
  schedule();
}

function seriesOf(account) {
  let s = state.series.get(account);
  if (!s) {
    s = { t: [], margin: [], collateral: [] };
    state.series.set(account, s);
  }
  return s;
}

function append(account, t, m, c) {
  const s = seriesOf(account);
  const n = s.t.length;
  if (n && t < s.t[n - 1]) return;
  s.t.push(t);
  s.margin.push(m);
  s.collateral.push(c);
  if (s.t.length > MAX_POINTS) {
    for (const k of ["t", "margin", "collateral"]) s[k] = s[k].filter((_, i) => i % 2 === 0 || i === s.t.length - 1);
  }
}

// ---- history + chart ------------------------------------------------------------------------------
function requestHistory(account) {
  $("chart-status").textContent = "loading history…";
  request("history", { type: "history_request", account }, account);
}

function onHistory(msg) {
  const live = seriesOf(msg.account);
  const t = msg.time.map((ns) => ns / 1e6);
  const lastHist = t.length ? t[t.length - 1] : -Infinity;
  const merged = { t: t.slice(), margin: msg.margin.slice(), collateral: msg.collateral.slice() };
  for (let i = 0; i < live.t.length; i++) {
    if (live.t[i] > lastHist) {
      merged.t.push(live.t[i]);
      merged.margin.push(live.margin[i]);
      merged.collateral.push(live.collateral[i]);
    }
  }
  state.series.set(msg.account, merged);
  if (msg.margin.length) {
    state.open.set(msg.account, msg.margin[0]);
    state.openFromHistory.add(msg.account);
  }
  if (msg.account === state.selected) {
    $("chart-status").textContent = t.length ? `${t.length.toLocaleString("en-US")} rows from rdb since ${clock(t[0])}` : "no history in rdb yet: live only";
    $("chart-status").dataset.kind = "";
    renderDetail();
  }
}

function historyFailed(account, reason) {
  if (account !== state.selected) return;
  $("chart-status").textContent = `history unavailable (${reason}); showing live rows`;
  $("chart-status").dataset.kind = "warn";
}

// ---- selection ------------------------------------------------------------------------------------
function select(account) {
  if (!account) return;
  state.selected = account;
  for (const [a, { tr }] of state.tableEls) tr.classList.toggle("selected", a === account);
  $("wi-account").value = account;
  requestHistory(account);
  renderDetail();
}

// ---- rendering ------------------------------------------------------------------------------------
function schedule() {
  if (state.frame) return;
  state.frame = true;
  requestAnimationFrame(() => {
    state.frame = false;
    for (const a of state.dirty) renderRow(a);
    const selectedDirty = state.dirty.has(state.selected);
    state.dirty.clear();
    renderKpis();
    if (selectedDirty) renderDetail();
  });
}

function buildTable() {
  const body = $("accounts").tBodies[0];
  body.replaceChildren();
  state.tableEls.clear();
  for (const a of state.accounts) {
    const tr = el("tr");
    tr.dataset.account = a;
    tr.tabIndex = 0;
    const cells = {};
    const add = (key, cls) => {
      const td = el("td", cls);
      td.dataset.col = key;
      tr.append(td);
      cells[key] = td;
      return td;
    };
    const acc = add("account", "acc");
    acc.append(el("span", "alert-dot"), el("span", "acc-name", a));
    add("model", "model");
    add("margin", "num strong");
    add("change", "num");
    add("collateral", "num");
    const u = add("utilisation", "util");
    const bar = el("div", "bar");
    bar.append(el("i"), el("b", "mark"));
    u.append(bar, el("span", "num pct"));
    add("headroom", "num");
    const tc = add("trend", "trend");
    const cv = el("canvas");
    tc.append(cv);
    cells.spark = cv;
    add("updated", "num dim");
    tr.addEventListener("click", () => select(a));
    tr.addEventListener("keydown", (e) => {
      const i = state.accounts.indexOf(a);
      if (e.key === "Enter") select(a);
      else if (e.key === "ArrowDown" && i + 1 < state.accounts.length) state.tableEls.get(state.accounts[i + 1]).tr.focus();
      else if (e.key === "ArrowUp" && i > 0) state.tableEls.get(state.accounts[i - 1]).tr.focus();
      else return;
      e.preventDefault();
    });
    body.append(tr);
    state.tableEls.set(a, { tr, cells });
    if (a === state.selected) tr.classList.add("selected");
    renderRow(a);
  }
  $("accounts-meta").textContent = `${state.accounts.length} account${state.accounts.length === 1 ? "" : "s"}`;
}

/** Colour of a change in margin (money, whole units shown): up is adverse, down favourable. */
function changeClass(x) {
  return x >= 0.5 ? "adverse" : x <= -0.5 ? "favourable" : "flat";
}

function renderRow(a) {
  const e = state.tableEls.get(a);
  const r = state.rows.get(a);
  if (!e) return;
  const { tr, cells } = e;
  tr.classList.toggle("alerting", (state.active.get(a)?.size || 0) > 0);
  if (!r) {
    cells.margin.textContent = "—";
    return;
  }
  cells.model.textContent = modelName(r.model);
  cells.margin.textContent = money(r.margin);
  cells.margin.dataset.value = r.margin;
  cells.change.textContent = (r.change >= 0.5 ? "▲ " : r.change <= -0.5 ? "▼ " : "") + signed(r.change);
  cells.change.className = "num " + changeClass(r.change);
  cells.collateral.textContent = money(r.collateral);
  const b = band(r.utilisation);
  const u = cells.utilisation;
  u.dataset.band = b;
  u.querySelector("i").style.width = `${Math.min(100, Math.max(0, r.utilisation * 100))}%`;
  u.querySelector(".pct").textContent = pct(r.utilisation);
  u.dataset.value = r.utilisation;
  const head = r.collateral - r.margin;
  cells.headroom.textContent = money(head);
  cells.headroom.className = "num" + (head < 0 ? " adverse strong" : "");
  cells.updated.textContent = r.t ? clock(r.t) : "—";
  const s = state.series.get(a);
  if (s) sparkline(cells.spark, s.t, s.margin, TREND_MS, sparkColors);
}

function renderKpis() {
  let m = 0;
  let c = 0;
  for (const a of state.accounts) {
    const r = state.rows.get(a);
    if (!r) continue;
    m += r.margin;
    c += r.collateral;
  }
  $("kpi-margin").textContent = money(m);
  $("kpi-collateral").textContent = money(c);
  $("kpi-headroom").textContent = money(c - m);
  $("kpi-headroom").className = c - m < 0 ? "adverse" : "";
  const u = c > 0 ? m / c : NaN;
  $("kpi-util").textContent = pct(u);
  $("kpi-util").dataset.band = band(u);
  let active = 0;
  for (const s of state.active.values()) active += s.size;
  $("kpi-alerts").textContent = String(active);
  $("kpi-alerts").className = active ? "adverse" : "";
}

function renderDetail() {
  const a = state.selected;
  const r = state.rows.get(a);
  $("detail-account").textContent = a || "—";
  $("detail-model").textContent = r ? modelName(r.model) : "";
  $("detail-meta").textContent = r ? `param ${r.param_id || "—"} · seq ${Number(r.last_seq).toLocaleString("en-US")}` : "";
  const set = (id, v) => ($(id).textContent = v);
  if (r) {
    set("f-margin", money(r.margin));
    const open = state.open.get(a);
    const d = r.margin - open;
    set("f-open", `${signed(d)} (${signedPct(open ? d / open : NaN)})`);
    set("f-open-label", state.openFromHistory.has(a) ? "Since open" : "Since page load");
    $("f-open").className = changeClass(d);
    set("f-var", money(r.var));
    set("f-es", r.es ? money(r.es) : "—");
    set("f-stress", r.stress ? money(r.stress) : "—");
    set("f-collateral", money(r.collateral));
    set("f-util", pct(r.utilisation));
    $("f-util").dataset.band = band(r.utilisation);
  }
  renderComponents(r && r.components);
  renderForecast(a);
  chart.setData(seriesOf(a));
  renderDrivers(r);
}

// A CCP model's margin in its parts (schemas/calc.py CcpComponents), e.g. Prisma's filtered and stressed ES.
const COMPONENTS = [
  ["filtered", "Filtered"], ["stressed", "Stressed"], ["base", "Base"], ["apc", "APC"],
  ["liquidity", "Liquidity"], ["concentration", "Concentration"], ["option_credit", "Option credit"],
];

function renderComponents(c) {
  const p = $("detail-components");
  p.hidden = !c;
  if (!c) return;
  p.replaceChildren();
  for (const [k, label] of COMPONENTS) {
    const v = k === "option_credit" ? -c[k] : c[k];
    const span = el("span", "part", "");
    span.dataset.key = k;
    span.append(el("span", "dim", label + " "), el("span", "num", k === "option_credit" ? signed(v) : money(v)));
    p.append(span);
  }
  const total = el("span", "part total", "");
  total.append(el("span", "dim", "→ Margin "), el("span", "num", money(c.margin)));
  p.append(total);
}

function renderDrivers(r) {
  const body = $("drivers").tBodies[0];
  body.replaceChildren();
  if (!r || !r.drivers.length) {
    const tr = el("tr", "empty");
    const td = el("td", "", r ? "No positions." : "Select an account.");
    td.colSpan = 4;
    tr.append(td);
    body.append(tr);
    return;
  }
  const total = r.drivers.reduce((s, d) => s + d.contribution, 0);
  const maxPos = Math.max(0, ...r.drivers.map((d) => d.contribution));
  const maxNeg = Math.max(0, ...r.drivers.map((d) => -d.contribution));
  const span = maxPos + maxNeg || 1;
  const zero = (maxNeg / span) * 100;
  for (const d of r.drivers) {
    const tr = el("tr");
    tr.dataset.sym = d.sym;
    const other = d.sym === "*other*";
    const name = el("td", "sym" + (other ? " dim" : ""), other ? "Other" : d.sym);
    const gk = greeks(d);
    if (gk) name.append(el("div", "greeks", gk));  // an option: its position's delta, gamma, vega
    tr.append(name);
    const ex = el("td", "num", signed(d.exposure));
    ex.title = gk ? "delta equivalent (delta x underlying price)" : d.exposure >= 0 ? "long" : "short";
    tr.append(ex);
    const td = el("td", "contrib");
    const bar = el("div", "dbar");
    const fill = el("i", d.contribution >= 0 ? "pos" : "neg");
    const w = (Math.abs(d.contribution) / span) * 100;
    fill.style.left = `${d.contribution >= 0 ? zero : zero - w}%`;
    fill.style.width = `${w}%`;
    const axis = el("b");
    axis.style.left = `${zero}%`;
    bar.append(fill, axis);
    td.append(bar, el("span", "num v", money(d.contribution)));
    tr.append(td);
    tr.append(el("td", "num dim", total ? pct(d.contribution / total) : "—"));
    body.append(tr);
  }
}

// ---- the forecast of the call and the parallel run (calc/projection.py) ---------------------------
function onForecast(rows) {
  for (const r of rows) {
    const f = state.forecasts.get(r.account) || {};
    f[r.horizon] = r;
    state.forecasts.set(r.account, f);
  }
  if (rows.some((r) => r.account === state.selected)) renderForecast(state.selected);
}

function until(ns) {
  const s = Math.max(0, Math.round((ns / 1e6 - Date.now()) / 1000));
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}`;
}

function renderForecast(a) {
  const t = $("detail-forecast");
  const f = a && state.forecasts.get(a);
  t.hidden = !f;
  if (!f) return;
  const body = t.tBodies[0];
  body.replaceChildren();
  let method = "";
  for (const h of ["next", "eod", "t+1"]) {
    const r = f[h];
    if (!r) continue;
    method = r.method;
    const tr = el("tr");
    tr.dataset.horizon = h;
    tr.append(
      el("td", "", HORIZON_LABEL[h]),
      el("td", "", `${r.ccp} ${r.cycle} ${r.business_date} ${clock(r.cycle_time / 1e6).slice(0, 5)} UTC`),
      el("td", "num dim", until(r.cycle_time)),
      el("td", "num", money(r.p50)),
      el("td", "num dim", money(r.p95)),
      el("td", "num " + (r.call_p50 > 0 ? "adverse" : ""), signed(r.call_p50)),
      el("td", "num dim", signed(r.call_p95)),
    );
    body.append(tr);
  }
  $("forecast-method").textContent =
    method === "replica" ? "replica (calc's margin, the CCP's rounding) and its recent error band" : `trained forecast ${method}`;
}

function onChecks(rows) {
  state.checks.push(...rows);
  if (state.checks.length > MAX_CHECKS) state.checks.splice(0, state.checks.length - MAX_CHECKS);
  const body = $("calls").tBodies[0];
  body.querySelector(".empty")?.remove();
  for (const r of rows) {
    const tr = el("tr", r.covered ? "" : "uncovered");
    tr.dataset.account = r.account;
    tr.append(
      el("td", "acc-name", r.account),
      el("td", "", `${r.cycle} ${r.business_date}`),
      el("td", "num dim", r.lead_s >= 3600 ? `${r.lead_s / 3600} h` : `${r.lead_s / 60} min`),
      el("td", "num", money(r.p50)),
      el("td", "num", money(r.actual)),
      el("td", "num " + (r.error < 0 ? "adverse" : ""), signed(r.error)),
    );
    tr.addEventListener("click", () => select(r.account));
    body.prepend(tr);
  }
  while (body.children.length > MAX_CHECKS) body.lastChild.remove();
  renderAccuracy();
}

// The running accuracy per lead time: the same figures as calc/projection.py accuracy() (/health).
function renderAccuracy() {
  const by = new Map();
  for (const r of state.checks) {
    if (!by.has(r.lead_s)) by.set(r.lead_s, []);
    by.get(r.lead_s).push(r);
  }
  const t = $("calls-accuracy");
  t.hidden = by.size === 0;
  const body = t.tBodies[0];
  body.replaceChildren();
  for (const [lead, rs] of [...by.entries()].sort((x, y) => x[0] - y[0])) {
    const n = rs.length;
    const mean = (f) => rs.reduce((s, r) => s + f(r), 0) / n;
    const tr = el("tr");
    tr.dataset.lead = String(lead);
    tr.append(
      el("td", "", lead >= 3600 ? `${lead / 3600} h` : `${lead / 60} min`),
      el("td", "num", String(n)),
      el("td", "num", money(mean((r) => Math.abs(r.error)))),
      el("td", "num", signed(mean((r) => r.error))),
      el("td", "num", pct(mean((r) => (Math.abs(r.error) <= 0.05 * r.actual ? 1 : 0)))),
      el("td", "num", pct(mean((r) => r.covered))),
    );
    body.append(tr);
  }
  $("calls-meta").textContent = `predicted vs actual · ${state.checks.length} matched`;
}

// ---- alerts ---------------------------------------------------------------------------------------
function onAlerts(rows) {
  const list = $("alerts");
  list.querySelector(".empty")?.remove();
  const now = Date.now();
  for (const r of rows) {
    const set = state.active.get(r.account) || new Set();
    if (r.state === "raised") set.add(r.rule);
    else set.delete(r.rule);
    state.active.set(r.account, set);
    state.alertCount += 1;
    const li = el("li", r.state);
    li.dataset.account = r.account;
    li.dataset.rule = r.rule;
    li.dataset.state = r.state;
    li.append(
      el("time", "num dim", clock(r.time ? r.time / 1e6 : now)),
      el("span", "badge " + r.state, r.state === "raised" ? "RAISED" : "CLEARED"),
      el("span", "acc-name", r.account),
      el("span", "rule", r.rule),
      el("span", "msg", r.message),
    );
    li.title = `value ${r.value} threshold ${r.threshold} · seq ${r.last_seq}`;
    li.addEventListener("click", () => select(r.account));
    list.prepend(li);
    state.dirty.add(r.account);
  }
  while (list.children.length > MAX_ALERTS) list.lastChild.remove();
  let active = 0;
  for (const s of state.active.values()) active += s.size;
  $("alerts-meta").textContent = `${active} active · ${state.alertCount} received`;
  schedule();
}

// ---- what-if --------------------------------------------------------------------------------------
function buildAccountSelect() {
  const s = $("wi-account");
  const keep = s.value || state.selected;
  s.replaceChildren(...state.accounts.map((a) => el("option", "", a)));
  if (keep && state.accounts.includes(keep)) s.value = keep;
}

function updateSyms() {
  const dl = $("syms");
  if (dl.children.length === state.syms.size) return;
  dl.replaceChildren(...[...state.syms].sort().map((s) => {
    const o = el("option");
    o.value = s;
    return o;
  }));
}

let lastTrade = null;

$("whatif").addEventListener("submit", (e) => {
  e.preventDefault();
  const f = new FormData(e.target);
  const account = f.get("account");
  const sym = String(f.get("sym") || "").trim().toUpperCase();
  const qty = Number(f.get("qty"));
  const side = f.get("side");
  if (!sym) return showWhatIfError("instrument: enter a symbol");
  if (!Number.isFinite(qty) || qty <= 0) return showWhatIfError("quantity: enter a number > 0");
  const out = $("whatif-result");
  out.dataset.state = "running";
  out.replaceChildren(el("p", "hint", `Running ${side === "B" ? "buy" : "sell"} ${money(qty)} ${sym} on ${account}…`));
  lastTrade = { sym, qty, side };
  const compare = f.get("compare") === "on";
  request("what_if", { type: "what_if", account, trades: [{ sym, qty, side }], compare }, account);
});

function tile(label, value, cls, key, raw) {
  const d = el("div", "tile");
  const v = el("dd", "num " + cls, value);
  v.dataset.key = key;
  if (raw !== undefined) v.dataset.value = raw;
  d.append(el("dt", "", label), v);
  return d;
}

function showWhatIf(res) {
  const out = $("whatif-result");
  out.dataset.state = "done";
  const before = res.margin_before;
  const after = res.margin_after;
  const change = res.change;
  const uBefore = res.collateral ? before / res.collateral : NaN;
  const head = el("p", "wi-head");
  const trade = lastTrade ? `${lastTrade.side === "B" ? "Buy" : "Sell"} ${money(lastTrade.qty)} ${lastTrade.sym}` : "";
  head.append(el("span", "acc-name", res.account), el("span", "dim", ` · ${modelName(res.model)} · ${trade} · ${clock(Date.now())} UTC`));
  const tiles = el("dl", "tiles");
  const u = tile("Utilisation", `${pct(uBefore)} → ${pct(res.utilisation_after)}`, "", "utilisation", res.utilisation_after);
  u.querySelector("dd").dataset.band = band(res.utilisation_after);
  tiles.append(
    tile("Margin before", money(before), "", "before", before),
    tile("Margin after", money(after), "strong", "after", after),
    tile("Change", `${signed(change)} (${signedPct(before ? change / before : NaN)})`, changeClass(change), "change", change),
    u,
  );
  const parts = [head, tiles];
  if (res.forecast) {  // the call at the account's next cycle, before and after (calc/projection.py)
    const f = res.forecast;
    const p = el("p", "wi-forecast");
    p.dataset.cycle = f.cycle;
    p.append(
      el("span", "dim", `Call at ${f.ccp} ${f.cycle} (in ${until(f.cycle_time)}): `),
      el("span", "num", `${signed(f.before.call_p50)} → `),
      el("span", "num strong " + (f.after.call_p50 > 0 ? "adverse" : ""), signed(f.after.call_p50)),
      el("span", "dim", ` · P95 ${signed(f.after.call_p95)}`),
    );
    parts.push(p);
  }
  if (res.compare) {  // the same trade under every configured model (hvar and the CCP models)
    const t = el("table", "grid-table compare");
    t.createTHead().append(...["Model", "Before", "After", "Δ"].map((h, i) => el("th", i ? "num" : "", h)));
    const tb = t.createTBody();
    for (const [name, m] of Object.entries(res.compare)) {
      const tr = el("tr");
      tr.dataset.model = name;
      if (m.error) tr.title = m.error;  // the model cannot margin this book (e.g. a contract it lacks)
      tr.append(el("td", "sym", modelName(name)), el("td", "num dim", money(m.margin_before)),
        el("td", "num", money(m.margin_after)), el("td", "num " + changeClass(m.change), signed(m.change)));
      tb.append(tr);
    }
    parts.push(t);
  }
  const moves = driverMoves(res.drivers_before || [], res.drivers || []);
  if (moves.length) {
    const t = el("table", "grid-table moves");
    t.createTHead().append(...["Largest driver moves", "Before", "After", "Δ"].map((h, i) => el("th", i ? "num" : "", h)));
    const tb = t.createTBody();
    for (const m of moves) {
      const tr = el("tr");
      tr.append(el("td", "sym", m.sym === "*other*" ? "Other" : m.sym), el("td", "num dim", money(m.before)),
        el("td", "num", money(m.after)), el("td", "num " + changeClass(m.after - m.before), signed(m.after - m.before)));
      tb.append(tr);
    }
    parts.push(t);
  }
  out.replaceChildren(...parts);
}

function driverMoves(before, after) {
  const b = new Map(before.map((d) => [d.sym, d.contribution]));
  const a = new Map(after.map((d) => [d.sym, d.contribution]));
  const syms = new Set([...b.keys(), ...a.keys()]);
  return [...syms]
    .map((sym) => ({ sym, before: b.get(sym) || 0, after: a.get(sym) || 0 }))
    .sort((x, y) => Math.abs(y.after - y.before) - Math.abs(x.after - x.before))
    .slice(0, 3);
}

function showWhatIfError(reason) {
  const out = $("whatif-result");
  out.dataset.state = "error";
  out.replaceChildren(el("p", "error", reason));
}

// ---- misc -----------------------------------------------------------------------------------------
function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function tick() {
  $("clock").textContent = `${clock(Date.now())} UTC`;
  if (state.desk && ws && ws.readyState === WebSocket.OPEN) {
    const age = (Date.now() - state.lastMsg) / 1000;
    setConn(age > 10 ? "stale" : "live", age > 10 ? `no update for ${Math.round(age)} s` : "live");
  }
}

setInterval(tick, 1000);
tick();
connect();
