// peerlink fleet console: renders the directory's /console/events stream (server-sent events,
// one `fleet` document per second) into tables and SVG plots. Every string from the document
// is set with textContent or as an attribute value; no HTML is ever built from data.
'use strict';

const SVG_NS = 'http://www.w3.org/2000/svg';
// Percentile axis of the HDR plots: x = log10(1 / (1 - q)), 0 .. 4 (0 % .. 99.99 %).
const X_MAX = 4;
const X_TICKS = [[0, '0%'], [1, '90%'], [2, '99%'], [3, '99.9%'], [4, '99.99%']];

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmtUs(us) {
  if (us === null || us === undefined) return '–';
  if (us >= 1e6) return (us / 1e6).toFixed(2) + ' s';
  if (us >= 1e3) return (us / 1e3).toFixed(us >= 1e4 ? 1 : 2) + ' ms';
  return us + ' µs';
}

function fmtRate(v) {
  if (v === null || v === undefined) return '–';
  if (v >= 1e6) return (v / 1e6).toFixed(1) + 'M';
  if (v >= 1e4) return (v / 1e3).toFixed(1) + 'k';
  return v.toFixed(v >= 100 ? 0 : 1);
}

function fmtAge(ms) {
  if (ms === null || ms === undefined) return '–';
  return ms < 1000 ? ms + ' ms ago' : (ms / 1000).toFixed(1) + ' s ago';
}

// A "nice" upper bound for an axis holding values up to v.
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

const PLOT = { w: 640, h: 300, l: 64, r: 16, t: 16, b: 40 };

function frame(svg, yMax, xTicks, yFmt) {
  const { w, h, l, r, t, b } = PLOT;
  const ih = h - t - b;
  for (let i = 0; i <= 4; i++) {
    const y = t + ih - (ih * i) / 4;
    svg.appendChild(svgEl('line', { class: 'grid', x1: l, x2: w - r, y1: y, y2: y }));
    svg.appendChild(svgEl('text', { x: l - 6, y: y + 4, 'text-anchor': 'end' }, yFmt((yMax * i) / 4)));
  }
  for (const [x, label] of xTicks) {
    svg.appendChild(svgEl('line', { class: 'grid', x1: x, x2: x, y1: t, y2: h - b }));
    svg.appendChild(svgEl('text', { x, y: h - b + 16, 'text-anchor': 'middle' }, label));
  }
  svg.appendChild(svgEl('line', { class: 'axis', x1: l, x2: l, y1: t, y2: h - b }));
  svg.appendChild(svgEl('line', { class: 'axis', x1: l, x2: w - r, y1: h - b, y2: h - b }));
}

function legend(svg, names) {
  names.forEach((n, i) => {
    const x = PLOT.l + 10 + i * 190;
    svg.appendChild(svgEl('rect', { class: 's' + i, x, y: PLOT.t + 4, width: 10, height: 10 }));
    svg.appendChild(svgEl('text', { x: x + 14, y: PLOT.t + 13 }, n));
  });
}

function empty(svg, msg) {
  svg.appendChild(svgEl('text', { class: 'empty', x: PLOT.w / 2, y: PLOT.h / 2, 'text-anchor': 'middle' }, msg));
}

// HdrHistogram-style percentile plot: series = [{name, ladder}], ladder.points = [[q, µs]].
function hdrPlot(svg, series) {
  svg.replaceChildren();
  const { w, h, l, r, t, b } = PLOT;
  const iw = w - l - r, ih = h - t - b;
  const live = series.filter((s) => s.ladder && s.ladder.count > 0);
  let yMax = 0;
  for (const s of live) for (const [, v] of s.ladder.points) yMax = Math.max(yMax, v);
  yMax = niceMax(yMax);
  const xOf = (q) => l + (iw * Math.min(X_MAX, Math.log10(1 / Math.max(1e-12, 1 - q)))) / X_MAX;
  frame(svg, yMax, X_TICKS.map(([x, label]) => [l + (iw * x) / X_MAX, label]), fmtUs);
  svg.setAttribute('data-series', String(live.length));
  svg.setAttribute('data-count', String(live.reduce((a, s) => a + s.ladder.count, 0)));
  if (live.length === 0) return empty(svg, 'no samples yet');
  series.forEach((s, i) => {
    if (!s.ladder || s.ladder.count === 0) return;
    const d = s.ladder.points
      .map(([q, v], j) => (j ? 'L' : 'M') + xOf(q).toFixed(1) + ',' + (t + ih - (ih * v) / yMax).toFixed(1))
      .join(' ');
    svg.appendChild(svgEl('path', { class: 'line s' + i, d, 'data-name': s.name }));
  });
  legend(svg, series.map((s) => s.name + (s.ladder ? ' (' + s.ladder.count + ')' : ' (none)')));
}

// Percentiles over time: history = [{t, p50, p99, p999, p9999}].
function historyPlot(svg, history) {
  svg.replaceChildren();
  const { w, h, l, r, t, b } = PLOT;
  const iw = w - l - r, ih = h - t - b;
  const keys = [['p50', 'p50'], ['p99', 'p99'], ['p999', 'p99.9'], ['p9999', 'p99.99']];
  svg.setAttribute('data-points', String(history.length));
  if (history.length === 0) {
    frame(svg, 1, [], fmtUs);
    return empty(svg, 'no samples yet');
  }
  const t0 = history[0].t, t1 = Math.max(history[history.length - 1].t, t0 + 1);
  let yMax = 0;
  for (const p of history) for (const [k] of keys) yMax = Math.max(yMax, p[k]);
  yMax = niceMax(yMax);
  const xOf = (tt) => l + (iw * (tt - t0)) / (t1 - t0);
  const ticks = [0, 0.5, 1].map((f) => {
    const tt = t0 + f * (t1 - t0);
    return [xOf(tt), new Date(tt).toLocaleTimeString()];
  });
  frame(svg, yMax, ticks, fmtUs);
  keys.forEach(([k], i) => {
    const d = history
      .map((p, j) => (j ? 'L' : 'M') + xOf(p.t).toFixed(1) + ',' + (t + ih - (ih * p[k]) / yMax).toFixed(1))
      .join(' ');
    svg.appendChild(svgEl('path', { class: 'line s' + i, d }));
  });
  legend(svg, keys.map(([, n]) => n));
}

function setText(id, v) {
  const e = document.getElementById(id);
  if (e) e.textContent = String(v);
}

function cell(text, cls) {
  return el('td', cls ? { class: cls } : {}, text);
}

function relayState(r) {
  if (!r.healthy) return ['down', 'state-down'];
  if (r.draining) return ['draining', 'state-draining'];
  return ['healthy', 'state-healthy'];
}

function renderRelays(relays) {
  const body = document.getElementById('relays');
  body.replaceChildren();
  for (const r of relays) {
    const [state, cls] = relayState(r);
    const s = r.stats;
    const lat = s && (s.latency_recent || s.latency_total);
    const tr = el('tr', { 'data-relay-id': r.relay_id, 'data-turn': r.turn_addr, 'data-state': state });
    tr.append(
      cell(r.relay_id),
      cell(r.region),
      cell(r.turn_addr),
      cell(state, cls + ' state'),
      cell(r.allocations + ' / ' + r.capacity, 'num'),
      cell((r.load * 100).toFixed(0) + '%', 'num'),
      cell(s ? fmtRate(s.packets_per_s) : '–', 'num'),
      cell(s ? s.auth_failures : '–', 'num'),
      cell(lat ? fmtUs(lat.p50) : '–', 'num'),
      cell(lat ? fmtUs(lat.p99) : '–', 'num'),
      cell(lat ? fmtUs(lat.p999) : '–', 'num'),
      cell(lat ? fmtUs(lat.p9999) : '–', 'num'),
      cell(fmtAge(r.last_heartbeat_age_ms)),
    );
    body.appendChild(tr);
  }
  // One percentile plot per relay, kept across updates (by relay id).
  const plots = document.getElementById('relay-plots');
  const want = new Set(relays.map((r) => r.relay_id));
  for (const f of Array.from(plots.children)) if (!want.has(f.getAttribute('data-relay-id'))) f.remove();
  for (const r of relays) {
    let fig = Array.from(plots.children).find((f) => f.getAttribute('data-relay-id') === r.relay_id);
    if (!fig) {
      fig = el('figure', { 'data-relay-id': r.relay_id });
      fig.appendChild(el('h3', {}, 'relay ' + r.relay_id));
      fig.appendChild(svgEl('svg', { class: 'plot small relay-hdr', viewBox: '0 0 640 300', role: 'img' }));
      plots.appendChild(fig);
    }
    const s = r.stats;
    hdrPlot(fig.querySelector('svg'), [
      { name: 'since start', ladder: s && s.latency_total },
      { name: 'last interval', ladder: s && s.latency_recent },
    ]);
  }
}

function renderNodes(nodes) {
  const body = document.getElementById('nodes');
  body.replaceChildren();
  for (const n of nodes) {
    const s = n.stats;
    const tr = el('tr', { 'data-node-id': n.node_id });
    tr.append(
      cell(n.node_id),
      cell(n.epoch, 'num'),
      cell(s ? s.sessions_open : '–', 'num'),
      cell(s ? s.invites : '–', 'num'),
      cell(s ? fmtRate(s.invites_per_s) : '–', 'num'),
      cell(s ? s.errors : '–', 'num'),
      cell(s ? fmtRate(s.errors_per_s) : '–', 'num'),
      cell(s ? s.login_failures : '–', 'num'),
      cell((n.load * 100).toFixed(0) + '%', 'num'),
      cell(fmtAge(n.last_heartbeat_age_ms)),
    );
    body.appendChild(tr);
  }
}

function renderReplicas(replicas) {
  const body = document.getElementById('replicas');
  body.replaceChildren();
  for (const r of replicas) {
    const tr = el('tr', { 'data-replica-id': r.replica_id });
    tr.append(
      cell(r.replica_id + (r.this ? ' (this one)' : '')),
      cell(r.listen),
      cell(r.store),
      cell(r.version),
      cell(r.console ? 'on' : 'off'),
      cell(fmtAge(r.age_ms)),
    );
    body.appendChild(tr);
  }
}

let updates = 0;

function render(doc) {
  updates += 1;
  document.body.setAttribute('data-updates', String(updates));
  const f = doc.fleet;
  setText('updated', 'updated ' + new Date(doc.generated_unix_ms).toLocaleTimeString() + ' by ' + doc.replica_id +
    (doc.store_ok ? '' : ' — store unavailable'));
  setText('c-relays', f.relays_healthy + ' / ' + f.relays);
  setText('c-draining', f.relays_draining);
  setText('c-allocations', f.allocations);
  setText('c-pps', fmtRate(f.packets_per_s));
  setText('c-nodes', f.nodes);
  setText('c-sessions', f.sessions);
  setText('c-ips', fmtRate(f.invites_per_s));
  const lat = f.latency_recent || f.latency_total;
  setText('c-p99', lat ? fmtUs(lat.p99) : '–');
  hdrPlot(document.getElementById('fleet-hdr'), [
    { name: 'since start', ladder: f.latency_total },
    { name: 'last interval', ladder: f.latency_recent },
  ]);
  historyPlot(document.getElementById('fleet-history'), f.history);
  renderRelays(doc.relays);
  renderNodes(doc.nodes);
  renderReplicas(doc.replicas);
}

function setConn(up, text) {
  const c = document.getElementById('conn');
  c.className = 'conn ' + (up ? 'up' : 'down');
  c.textContent = text;
}

function connect() {
  const es = new EventSource('/console/events');
  es.addEventListener('open', () => setConn(true, 'live'));
  es.addEventListener('fleet', (ev) => {
    try {
      render(JSON.parse(ev.data));
      setConn(true, 'live');
    } catch (e) {
      setConn(false, 'bad update: ' + e.message);
    }
  });
  es.addEventListener('error', () => {
    // EventSource reconnects by itself; a refused token (401) closes it for good.
    setConn(false, es.readyState === EventSource.CLOSED ? 'disconnected (reload to sign in)' : 'reconnecting…');
  });
}

document.addEventListener('DOMContentLoaded', connect);
