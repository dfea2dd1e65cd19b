// Live dashboard of a running balancer: polls /api/services and /api/history once a
// second, keeps one card per service (charts + backend table) and updates it in place.
// A token (needed for writes, and for reads where the admin endpoint says so) comes from
// the field in the header or from the page's fragment, `/#token=...`; it is kept in this
// tab's sessionStorage and sent as `Authorization: Bearer`, never in a URL.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 300;
const cards = new Map(); // service name -> {root, meta, rows: Map(address -> row), charts}
let samples = []; // one-second samples, oldest first
let lastSample = null; // Unix time of the newest sample we hold

const $ = (tag, attrs = {}, ...children) => {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v);
  }
  for (const c of children) el.append(c);
  return el;
};

const TOKEN_KEY = "balancer-token";

function tokenHeaders() {
  const token = document.getElementById("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

// `#token=...` in the address: take it, keep it for this tab, and drop it from the address.
function tokenFromFragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = params.get("token");
  if (token === null) return;
  sessionStorage.setItem(TOKEN_KEY, token.trim());
  document.getElementById("token").value = token.trim();
  history.replaceState(null, "", location.pathname + location.search);
}

async function getJson(url) {
  const resp = await fetch(url, { cache: "no-store", headers: tokenHeaders() });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const why = body.error || `${resp.status} ${resp.statusText}`;
    const err = new Error(resp.status === 401
      ? `${why} (type the token above, or open this page as /#token=<token>)`
      : why);
    err.status = resp.status;
    throw err;
  }
  return body;
}

function showMessage(text) {
  const el = document.getElementById("message");
  el.textContent = text || "";
  el.hidden = !text;
}

const fmt = {
  rate: (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(1)),
  pct: (v) => (100 * v).toFixed(v > 0 && v < 0.01 ? 2 : 1) + " %",
  ms: (v) => (v >= 10 ? v.toFixed(1) : v.toFixed(2)) + " ms",
  age: (s) => (s === null || s === undefined ? "–" : s.toFixed(1) + " s ago"),
  int: (v) => Number(v).toLocaleString("en"),
};

async function setBackend(service, address, state) {
  const url = `/api/services/${encodeURIComponent(service)}/backends/${encodeURIComponent(address)}`;
  try {
    const resp = await fetch(url, {
      method: "PUT",
      headers: { "Content-Type": "application/json", ...tokenHeaders() },
      body: JSON.stringify({ state }),
    });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      showMessage(`${address}: ${body.error || resp.status + " " + resp.statusText}`);
    } else {
      showMessage("");
    }
  } catch (err) {
    showMessage(`${address}: ${err}`);
  }
  poll();
}

// -- charts (plain canvas) ------------------------------------------------------------------

function drawChart(canvas, points, color, unit) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== w * dpr || canvas.height !== h * dpr) {
    canvas.width = w * dpr;
    canvas.height = h * dpr;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const left = 44, right = 6, top = 6, bottom = 16;
  const now = Date.now() / 1000;
  const t0 = now - WINDOW_S;
  const max = Math.max(1e-9, ...points.map((p) => p[1])) * 1.15;
  const x = (t) => left + ((t - t0) / WINDOW_S) * (w - left - right);
  const y = (v) => top + (1 - v / max) * (h - top - bottom);
  ctx.strokeStyle = "#e3e6eb";
  ctx.fillStyle = "#6b7280";
  ctx.font = "10px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 3; i++) {
    const v = (max / 3) * i;
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, yy);
    ctx.lineTo(w - right, yy);
    ctx.stroke();
    ctx.fillText(v >= 100 ? v.toFixed(0) : v.toFixed(v >= 10 ? 1 : 2), 2, yy + 3);
  }
  for (let m = 0; m <= WINDOW_S / 60; m++) {
    const xx = x(now - m * 60);
    ctx.fillText(m === 0 ? "now" : `-${m}m`, Math.min(xx - 8, w - right - 18), h - 3);
  }
  ctx.fillText(unit, left + 4, top + 10);
  const visible = points.filter((p) => p[0] >= t0);
  if (!visible.length) return;
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  visible.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
  ctx.stroke();
}

// -- cards ----------------------------------------------------------------------------------

function makeCard(name) {
  const meta = $("div", { class: "meta" });
  const rpsCanvas = $("canvas", { "data-chart": "rps" });
  const p99Canvas = $("canvas", { "data-chart": "p99" });
  const rpsNow = $("span"), p99Now = $("span");
  const tbody = $("tbody");
  const head = $("tr");
  for (const h of ["backend", "state", "admin", "weight", "in flight", "req/s", "errors",
                   "requests", "failures", "last check", "reason", ""]) {
    head.append($("th", h === "reason" ? { text: h, class: "reason" } : { text: h }));
  }
  const root = $(
    "section",
    { class: "service", "data-service": name },
    $("h2", { text: name }),
    meta,
    $("div", { class: "charts" },
      $("div", { class: "chart" }, $("div", { class: "title" }, $("span", { text: "requests/s" }), rpsNow), rpsCanvas),
      $("div", { class: "chart" }, $("div", { class: "title" }, $("span", { text: "p99 latency" }), p99Now), p99Canvas)),
    $("table", {}, $("thead", {}, head), tbody),
  );
  const http = makeHttpTable();
  root.append(http.table);
  const tls = makeTlsTable();
  root.append(tls.table);
  document.getElementById("services").append(root);
  return { root, meta, tbody, rows: new Map(), rpsCanvas, p99Canvas, rpsNow, p99Now, http, tls };
}

// http mode's counters, one row (hidden for the other modes)
const HTTP_COLUMNS = [["requests", "requests"], ["responses", "responses"],
                      ["generated", "generated errors"], ["retries", "retries"],
                      ["upstream", "upstream connections"], ["tunnels", "tunnels"],
                      ["client_errors", "client errors"], ["bad_responses", "bad responses"],
                      ["routes", "routes"]];

function makeHttpTable() {
  const head = $("tr"), row = $("tr"), cells = {};
  for (const [key, label] of HTTP_COLUMNS) {
    head.append($("th", { text: label }));
    cells[key] = $("td", { "data-http": key });
    row.append(cells[key]);
  }
  const table = $("table", { class: "http" }, $("thead", {}, head), $("tbody", {}, row));
  table.hidden = true;
  return { table, cells };
}

const byKey = (counts, sep = " ") =>
  Object.entries(counts).map(([k, n]) => `${k}${sep}${fmt.int(n)}`).join(" · ") || "–";

function renderHttp(http, counts) {
  http.table.hidden = !counts;
  if (!counts) return;
  const c = http.cells;
  const up = counts.upstream_connections;
  c.requests.textContent = fmt.int(counts.requests);
  c.responses.textContent = byKey(counts.responses);
  c.generated.textContent = byKey(counts.generated, " ×");
  c.retries.textContent = `${fmt.int(counts.retries.backend)} backend · ` +
    `${fmt.int(counts.retries.keepalive_race)} keep-alive race`;
  c.upstream.textContent = `${fmt.int(up.new)} new · ${fmt.int(up.reused)} reused · ` +
    `${fmt.int(counts.idle_upstream_connections)} idle`;
  c.tunnels.textContent = fmt.int(counts.tunnels);
  c.client_errors.textContent = fmt.int(counts.client_errors);
  c.bad_responses.textContent = fmt.int(counts.bad_responses);
  c.routes.textContent = counts.routes.join(" · ") || "–";
}

// TLS and the PROXY protocol, one row (hidden for services without them)
const TLS_COLUMNS = [["certificates", "certificates (days left)"], ["handshakes", "handshakes"],
                     ["proxied", "PROXY headers"], ["errors", "closed before the mode"],
                     ["routed", "SNI routed"], ["backend", "backend TLS"]];

function makeTlsTable() {
  const head = $("tr"), row = $("tr"), cells = {};
  for (const [key, label] of TLS_COLUMNS) {
    head.append($("th", { text: label }));
    cells[key] = $("td", { "data-tls": key });
    row.append(cells[key]);
  }
  const table = $("table", { class: "tls" }, $("thead", {}, head), $("tbody", {}, row));
  table.hidden = true;
  return { table, cells };
}

function renderTls(tls, counts) {
  tls.table.hidden = !counts;
  if (!counts) return;
  const c = tls.cells;
  c.certificates.replaceChildren(...counts.certificates.map((cert, i) => $("span", {
    class: cert.days_left < 14 ? "cert expiring" : "cert",
    title: `${cert.subject} · ${cert.path}`,
    text: `${i ? " · " : ""}${cert.server_names[0] || cert.subject} ${Math.floor(cert.days_left)}d`,
  })));
  if (!counts.certificates.length) c.certificates.textContent = "–";
  c.handshakes.textContent = fmt.int(counts.handshakes);
  c.proxied.textContent = fmt.int(counts.proxied);
  c.errors.textContent = byKey(counts.errors, " ×");
  c.routed.textContent = byKey(counts.routed, " ×");
  c.backend.textContent = `${fmt.int(counts.backend_handshakes)} handshakes · ` +
    `${fmt.int(counts.backend_resumed)} resumed`;
}

function makeRow(card, service, address) {
  const cells = {};
  const row = $("tr", { "data-backend": address });
  for (const key of ["address", "state", "admin", "weight", "in_flight", "rps", "error_rate",
                     "requests", "failures", "last_check", "reason"]) {
    cells[key] = $("td", { class: key });
    row.append(cells[key]);
  }
  cells.address.textContent = address;
  const actions = $("td", { class: "actions" });
  const buttons = {};
  for (const [state, label] of [["drain", "Drain"], ["maint", "Maint"], ["up", "Return"]]) {
    const b = $("button", { type: "button", "data-action": state, text: label });
    b.addEventListener("click", () => setBackend(service, address, state));
    buttons[state] = b;
    actions.append(b);
  }
  row.append(actions);
  card.tbody.append(row);
  return { row, cells, buttons };
}

function badge(cell, text) {
  if (cell.dataset.value === text) return;
  cell.dataset.value = text;
  cell.replaceChildren($("span", { class: "s-" + text, text }));
}

function render(doc) {
  const seen = new Set();
  for (const [name, svc] of Object.entries(doc.services)) {
    seen.add(name);
    let card = cards.get(name);
    if (!card) {
      card = makeCard(name);
      cards.set(name, card);
    }
    const up = svc.backends.filter((b) => b.state === "up").length;
    card.meta.innerHTML = "";
    card.meta.append(
      `listen ${svc.listen} · ${svc.mode} mode · ${svc.algorithm} · `,
      $("b", { text: `${up}/${svc.backends.length}` }), " backends up · ",
      $("b", { text: fmt.rate(svc.rps || 0) }), " req/s · errors ",
      $("b", { text: fmt.pct(svc.error_rate || 0) }), " · p99 ",
      $("b", { text: fmt.ms(svc.p99_ms || 0) }), ` · ${fmt.int(svc.client_connections)} clients`,
    );
    renderHttp(card.http, svc.http);
    renderTls(card.tls, svc.tls);
    const rowsSeen = new Set();
    for (const b of svc.backends) {
      rowsSeen.add(b.address);
      let r = card.rows.get(b.address);
      if (!r) {
        r = makeRow(card, name, b.address);
        card.rows.set(b.address, r);
      }
      badge(r.cells.state, b.state);
      badge(r.cells.admin, b.admin_state);
      r.cells.weight.textContent = b.weight;
      r.cells.in_flight.textContent = fmt.int(b.in_flight);
      r.cells.rps.textContent = fmt.rate(b.rps || 0);
      r.cells.error_rate.textContent = fmt.pct(b.error_rate || 0);
      r.cells.requests.textContent = fmt.int(b.requests);
      r.cells.failures.textContent = fmt.int(b.failures);
      r.cells.last_check.textContent = fmt.age(b.last_check_age_s);
      r.cells.last_check.title = b.reason || "";
      // why a backend is down: the reason of its last failed check
      r.cells.reason.textContent = b.state === "up" ? "" : b.reason || "";
      r.buttons.drain.disabled = b.admin_state === "drain";
      r.buttons.maint.disabled = b.admin_state === "maint";
      r.buttons.up.disabled = b.admin_state === "ready";
    }
    for (const [address, r] of card.rows) {
      if (!rowsSeen.has(address)) {
        r.row.remove();
        card.rows.delete(address);
      }
    }
    const series = samples.filter((s) => s.services[name]);
    const rps = series.map((s) => [s.t, s.services[name].rps]);
    const p99 = series.map((s) => [s.t, s.services[name].p99_ms]);
    card.rpsNow.textContent = rps.length ? fmt.rate(rps[rps.length - 1][1]) + " req/s" : "";
    card.p99Now.textContent = p99.length ? fmt.ms(p99[p99.length - 1][1]) : "";
    drawChart(card.rpsCanvas, rps, "#2563eb", "req/s");
    drawChart(card.p99Canvas, p99, "#c2410c", "ms");
  }
  for (const [name, card] of cards) {
    if (!seen.has(name)) {
      card.root.remove();
      cards.delete(name);
    }
  }
}

let polling = false;
let refused = false; // the last poll was refused (shown in the message line)
async function poll() {
  if (polling) return;
  polling = true;
  const conn = document.getElementById("connection");
  try {
    const since = lastSample === null ? "" : `?since=${lastSample}`;
    const [status, history] = await Promise.all([
      getJson("/api/services"),
      getJson("/api/history" + since),
    ]);
    if (history.samples.length) {
      samples = samples.concat(history.samples);
      lastSample = samples[samples.length - 1].t;
      const cutoff = Date.now() / 1000 - WINDOW_S - 5;
      samples = samples.filter((s) => s.t >= cutoff);
    }
    render(status);
    conn.textContent = "live · " + new Date().toLocaleTimeString();
    conn.classList.remove("bad");
    if (refused) showMessage("");
    refused = false;
  } catch (err) {
    if (err.status) {
      conn.textContent = "admin endpoint refused the request";
      showMessage(err.message);
      refused = true;
    } else {
      conn.textContent = "admin endpoint not answering: " + err;
    }
    conn.classList.add("bad");
  } finally {
    polling = false;
  }
}

document.getElementById("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
tokenFromFragment();
window.addEventListener("hashchange", () => {
  tokenFromFragment();
  poll();
});
document.getElementById("token").addEventListener("change", (e) => {
  sessionStorage.setItem(TOKEN_KEY, e.target.value.trim());
  poll();
});
poll();
setInterval(poll, POLL_MS);
