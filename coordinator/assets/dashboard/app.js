// Gantry dashboard: plain JavaScript, no build step, no external asset.
// Pages: /login, /agents, /runs, /runs/N (the DAG, live), /jobs/R.I (the log, live),
// /deployments. Data comes from /api/... (JSON) and live streams (Server-Sent Events).
// Text from the server is only ever inserted as text (textContent), never as HTML.
'use strict';

// The SVG namespace is a name, not something fetched.
const SVG_NS = 'http://www.w3.org/2000/svg';
const CSRF = { 'X-Gantry-CSRF': '1' };
const TERMINAL = new Set(['succeeded', 'failed', 'timed-out', 'lost', 'cancelled', 'skipped']);
const page = { me: null, timers: [], streams: [], generation: 0 };

// ---------- small helpers ----------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') el.setAttribute('class', v);
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) if (c) el.append(c);
  return el;
}

// Replaces an element's children, skipping the null, undefined and false that
// conditional children leave (the DOM's replaceChildren would show them as text).
function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function badge(state) {
  return h('span', { class: 'badge s-' + state, 'data-state': state, text: state });
}

function ago(ms) {
  if (!ms) return '–';
  return span(Date.now() - ms) + ' ago';
}

function span(ms) {
  if (ms < 0 || !Number.isFinite(ms)) return '–';
  const sec = Math.floor(ms / 1000);
  if (sec < 1) return ms + 'ms';
  if (sec < 60) return sec + 's';
  if (sec < 3600) return Math.floor(sec / 60) + 'm' + (sec % 60) + 's';
  if (sec < 86400) return Math.floor(sec / 3600) + 'h' + Math.floor((sec % 3600) / 60) + 'm';
  return Math.floor(sec / 86400) + 'd' + Math.floor((sec % 86400) / 3600) + 'h';
}

function bytes(n) {
  if (!n) return '0';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + units[i];
}

function jobId(id) { return id.run + '.' + id.index; }

function when(start, end) {
  if (!start) return '–';
  return span((end || Date.now()) - start);
}

function banner(message) {
  const el = document.getElementById('banner');
  el.textContent = message || '';
  el.hidden = !message;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options) {
  const opts = Object.assign({ credentials: 'same-origin', headers: {} }, options || {});
  if (opts.method && opts.method !== 'GET') opts.headers = Object.assign({}, CSRF, opts.headers);
  const res = await fetch(path, opts);
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (res.status === 401 && path !== '/api/login') {
    page.me = null;
    go('/login', true);
    throw new HttpError(401, (body && body.error) || 'log in again');
  }
  if (!res.ok) throw new HttpError(res.status, (body && body.error) || res.statusText);
  return body;
}

function every(ms, fn) {
  const gen = page.generation;
  const tick = async () => {
    if (gen !== page.generation) return;
    if (!document.hidden) {
      try { await fn(); banner(''); } catch (e) { if (e.status !== 401) banner(e.message); }
    }
  };
  page.timers.push(setInterval(tick, ms));
}

// Opens a live stream. The browser reconnects by itself when a stream ends normally
// (it resumes a log from the last event id); when the server refuses it (503: all
// stream slots busy, or any error answer) it gives up, so we open a new one after 5 s,
// calling `handlers.reopen` first (a new stream starts from the beginning).
function live(url, handlers) {
  const gen = page.generation;
  const open = () => {
    if (gen !== page.generation) return;
    const source = new EventSource(url);
    page.streams.push(source);
    for (const [name, fn] of Object.entries(handlers)) {
      if (name === 'reopen') continue;
      source.addEventListener(name, (ev) => {
        let data = null;
        try { data = JSON.parse(ev.data); } catch (_) { return; }
        if (name === 'problem') source.close();
        fn(data, source);
      });
    }
    source.addEventListener('open', () => banner(''));
    source.addEventListener('error', () => {
      if (source.readyState !== EventSource.CLOSED || gen !== page.generation) return;
      banner('Live updates interrupted; reconnecting in 5 s…');
      setTimeout(() => {
        if (gen !== page.generation) return;
        if (handlers.reopen) handlers.reopen();
        open();
      }, 5000);
    });
  };
  open();
}

function leave() {
  page.generation++;
  for (const t of page.timers) clearInterval(t);
  for (const s of page.streams) s.close();
  page.timers = [];
  page.streams = [];
  banner('');
}

function go(path, replace) {
  if (replace) history.replaceState(null, '', path); else history.pushState(null, '', path);
  render();
}

document.addEventListener('click', (ev) => {
  const a = ev.target.closest && ev.target.closest('a[href^="/"]');
  if (!a || ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button !== 0) return;
  ev.preventDefault();
  go(a.getAttribute('href'));
});
window.addEventListener('popstate', render);

function mount(name, ...children) {
  const main = document.getElementById('main');
  fill(main, ...children);
  document.body.dataset.page = name;
  delete document.body.dataset.ready;
  for (const a of document.querySelectorAll('#nav a')) {
    a.classList.toggle('active', a.dataset.nav === name || (name === 'run' && a.dataset.nav === 'runs') || (name === 'job' && a.dataset.nav === 'runs'));
  }
}

function ready(name) { document.body.dataset.ready = name; }

function showWho() {
  const who = document.getElementById('who');
  if (!page.me) { fill(who); return; }
  fill(who,
    h('span', { text: page.me.name }),
    h('span', { class: 'role', 'data-role': page.me.role, text: page.me.role }),
    h('button', { class: 'ghost', id: 'logout', onclick: async () => {
      try { await api('/api/logout', { method: 'POST' }); } catch (_) { /* logged out anyway */ }
      page.me = null;
      go('/login');
    } }, 'Log out'));
}

function can(action) { return !!(page.me && page.me.can && page.me.can[action]); }

// ---------- pages ----------

async function render() {
  leave();
  const path = location.pathname;
  if (path === '/login') return pageLogin();
  if (!page.me) {
    try { page.me = await api('/api/me'); } catch (e) { if (e.status !== 401) banner(e.message); return; }
  }
  showWho();
  let m;
  try {
    if (path === '/' || path === '/runs') return await pageRuns();
    if (path === '/agents') return await pageAgents();
    if (path === '/deployments') return await pageDeployments();
    if ((m = path.match(/^\/runs\/(\d+)$/))) return await pageRun(Number(m[1]));
    if ((m = path.match(/^\/jobs\/(\d+)\.(\d+)$/))) return await pageJob(m[1] + '.' + m[2]);
    mount('missing', h('h1', { text: 'Not found' }), h('p', { class: 'muted', text: 'No page at ' + path + '.' }));
  } catch (e) {
    if (e.status !== 401) mount('error', h('h1', { text: 'Cannot show this page' }), h('p', { class: 'muted', text: e.message }));
  }
}

function pageLogin() {
  page.me = null;
  showWho();
  const input = h('input', { id: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false', placeholder: 'glt1_…' });
  const error = h('div', { class: 'error', id: 'login-error' });
  const form = h('form', { id: 'login-form', onsubmit: async (ev) => {
    ev.preventDefault();
    error.textContent = '';
    try {
      await api('/api/login', { method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ token: input.value.trim() }) });
      page.me = null;
      go('/runs');
    } catch (e) { error.textContent = e.message; }
  } },
    h('label', { for: 'token', text: 'Login token' }), input,
    h('p', { class: 'muted', text: 'An admin issues tokens with `gantry admin token --role viewer|operator|admin`.' }),
    h('button', { class: 'primary', type: 'submit', id: 'login-button' }, 'Log in'),
    error);
  mount('login', h('div', { class: 'login' }, h('h1', { text: 'Log in to Gantry' }), h('div', { class: 'panel' }, form)));
  input.focus();
  ready('login');
}

async function pageAgents() {
  const body = h('tbody');
  const table = h('div', { class: 'panel' }, h('table', { id: 'agents' },
    h('thead', {}, h('tr', {}, ['Host', 'State', 'CPU', 'Memory', 'Disk free', 'Load', 'Slots', 'Labels', 'Last seen'].map((t) => h('th', { text: t })))),
    body));
  const count = h('span', { class: 'muted' });
  mount('agents', h('div', { class: 'head' }, h('div', { class: 'grow' }, h('h1', { text: 'Agents' }), count)), table);
  const refresh = async () => {
    const agents = await api('/api/agents');
    const connected = agents.filter((a) => a.state === 'Connected').length;
    count.textContent = connected + ' connected of ' + agents.length + ' enrolled';
    fill(body, ...(agents.length ? agents.map(agentRow) : [h('tr', {}, h('td', { class: 'empty', colspan: 9, text: 'No agents enrolled yet: `gantry token create`, then `gantry-agent enroll`.' }))]));
  };
  await refresh();
  ready('agents');
  every(5000, refresh);
}

function meter(used, total, label) {
  const pct = total ? Math.min(100, Math.round((100 * used) / total)) : 0;
  const level = h('span');
  level.style.width = pct + '%';
  return h('span', { class: 'meter' }, h('span', { class: pct >= 90 ? 'bar hot' : 'bar' }, level), label);
}

function agentRow(a) {
  const f = a.figures || {};
  const labels = Object.entries(a.labels || {}).filter(([k]) => !k.startsWith('gantry.capability/'));
  return h('tr', { 'data-agent': a.agent_id },
    h('td', {}, h('div', { text: a.hostname || '(unknown)' }), h('div', { class: 'muted mono', text: a.agent_id + (a.agent_version ? ' · v' + a.agent_version : '') })),
    h('td', {}, badge(a.state.toLowerCase())),
    h('td', {}, a.figures ? meter(f.cpu_percent, 100, Math.round(f.cpu_percent) + '% of ' + f.cpu_count) : '–'),
    h('td', {}, a.figures ? meter(f.memory_used_bytes, f.memory_total_bytes, bytes(f.memory_used_bytes) + ' / ' + bytes(f.memory_total_bytes)) : '–'),
    h('td', { text: a.figures ? bytes(f.disk_free_bytes) + ' of ' + bytes(f.disk_total_bytes) : '–' }),
    h('td', { class: 'mono', text: a.figures ? f.load_average.map((x) => x.toFixed(2)).join(' ') : '–' }),
    h('td', { text: String(a.slots || '–') }),
    h('td', {}, h('div', { class: 'chips' }, labels.map(([k, v]) => h('span', { class: 'chip', text: k + '=' + v })), (a.capabilities || []).map((c) => h('span', { class: 'chip', text: '+' + c })))),
    h('td', { text: a.state === 'Connected' ? 'now' : ago(a.last_seen) }));
}

async function pageRuns() {
  const body = h('tbody');
  mount('runs', h('div', { class: 'head' }, h('div', { class: 'grow' }, h('h1', { text: 'Pipeline runs' }), h('span', { class: 'muted', text: 'Newest first; live.' }))),
    h('div', { class: 'panel' }, h('table', { id: 'runs' },
      h('thead', {}, h('tr', {}, ['Run', 'Pipeline', 'State', 'Ref', 'Jobs', 'Started', 'Duration', 'By'].map((t) => h('th', { text: t })))),
      body)));
  const refresh = async () => {
    const runs = await api('/api/runs?limit=50');
    fill(body, ...(runs.length ? runs.map(runRow) : [h('tr', {}, h('td', { class: 'empty', colspan: 8, text: 'No runs yet: `gantry run gantry.yml`.' }))]));
  };
  await refresh();
  ready('runs');
  every(3000, refresh);
}

function runRow(r) {
  const done = r.jobs.filter((j) => j.state === 'succeeded').length;
  return h('tr', { class: 'link', 'data-run': r.run, onclick: () => go('/runs/' + r.run) },
    h('td', {}, h('a', { href: '/runs/' + r.run, text: '#' + r.run })),
    h('td', { text: r.pipeline }),
    h('td', {}, badge(r.state)),
    h('td', { class: 'mono', text: r.git_ref + (r.commit ? ' @ ' + r.commit.slice(0, 8) : '') }),
    h('td', {}, h('div', { class: 'dots', title: done + ' of ' + r.jobs.length + ' succeeded' }, r.jobs.map((j) => h('span', { class: 'dot s-' + j.state, title: j.name + ': ' + j.state })))),
    h('td', { text: ago(r.created_at) }),
    h('td', { text: when(r.created_at, r.finished_at) }),
    h('td', { class: 'muted', text: r.created_by }));
}

// ----- a run: its DAG, live -----

async function pageRun(n) {
  let run = await api('/api/runs/' + n);
  const title = h('h1');
  const meta = h('div', { class: 'meta' });
  const actions = h('div', { class: 'actions' });
  const dag = h('div', { class: 'panel dag', id: 'dag' });
  const jobsBody = h('tbody');
  const tests = h('div', { id: 'tests' });
  mount('run', h('div', { class: 'head' }, h('div', { class: 'grow' }, title, meta), actions),
    dag,
    h('h2', { text: 'Jobs' }),
    h('div', { class: 'panel' }, h('table', { id: 'jobs' },
      h('thead', {}, h('tr', {}, ['Job', 'State', 'Agent', 'Attempt', 'Exit', 'Duration', 'Log'].map((t) => h('th', { text: t })))),
      jobsBody)),
    tests);

  const draw = () => {
    title.textContent = 'Run #' + run.run + ' · ' + run.pipeline;
    fill(meta, badge(run.state),
      h('span', {}, 'ref ', h('b', { class: 'mono', text: run.git_ref })),
      run.commit ? h('span', {}, 'commit ', h('b', { class: 'mono', text: run.commit.slice(0, 12) })) : null,
      h('span', {}, 'by ', h('b', { text: run.created_by })),
      h('span', {}, run.event + ', ' + ago(run.created_at)),
      h('span', {}, 'took ', h('b', { text: when(run.created_at, run.finished_at) })));
    fill(actions,
      can('retry_run') ? h('button', { class: 'primary', id: 'retry', 'data-action': 'retry', onclick: retry }, 'Run again') : null,
      can('cancel_run') && !run.finished_at ? h('button', { class: 'danger', id: 'cancel', 'data-action': 'cancel', onclick: cancel }, 'Cancel') : null);
    fill(dag, drawDag(run.jobs));
    fill(jobsBody, ...run.jobs.map((j) => h('tr', { class: 'link', 'data-job': jobId(j.job), onclick: () => go('/jobs/' + jobId(j.job)) },
      h('td', {}, h('a', { href: '/jobs/' + jobId(j.job), text: j.name }), h('span', { class: 'muted mono', text: '  ' + jobId(j.job) })),
      h('td', {}, badge(j.state),
        j.state === 'awaiting-approval' && can('approve_job') ? h('button', { 'data-action': 'approve', onclick: (ev) => { ev.stopPropagation(); approve(jobId(j.job)); } }, 'Approve') : null),
      h('td', { class: 'mono', text: j.agent || '–' }),
      h('td', { text: String(j.attempt || '–') }),
      h('td', { text: j.exit_code === null || j.exit_code === undefined ? '–' : String(j.exit_code) }),
      h('td', { text: when(j.started_at, j.finished_at) }),
      h('td', { text: (j.log_bytes ? bytes(j.log_bytes) : '–') + (j.log_incomplete ? ' (incomplete: the coordinator ran out of space)' : '') }))));
    fill(tests, testReports(run));
  };
  const retry = async () => {
    try { const next = await api('/api/runs/' + n + '/retry', { method: 'POST' }); go('/runs/' + next.run); } catch (e) { banner(e.message); }
  };
  const cancel = async () => {
    try { await api('/api/runs/' + n + '/cancel', { method: 'POST' }); } catch (e) { banner(e.message); }
  };
  const approve = async (job) => {
    try { await api('/api/jobs/' + job + '/approve', { method: 'POST' }); } catch (e) { banner(e.message); }
  };
  draw();
  ready('run');
  if (!run.finished_at) {
    live('/api/runs/' + n + '/events', {
      // A new stream sends every job's state again.
      job: (view) => {
        const i = run.jobs.findIndex((j) => jobId(j.job) === jobId(view.job));
        if (i >= 0) run.jobs[i] = view;
        draw();
      },
      end: async (_, source) => {
        source.close();
        try { run = await api('/api/runs/' + n); draw(); } catch (e) { banner(e.message); }
      },
    });
    every(1000, async () => { if (!run.finished_at) fill(meta.lastChild, 'took ', h('b', { text: when(run.created_at, null) })); });
  }
}

// Each job's test report (reports: in the pipeline): counts, coverage, every failed
// test with its output (folded), and the notes about files that could not be read.
function testReports(run) {
  const reports = run.reports || {};
  const jobs = run.jobs.filter((j) => reports[jobId(j.job)]);
  if (!jobs.length) return [];
  return [h('h2', { text: 'Tests' }), h('div', { class: 'panel' }, jobs.map((j) => {
    const r = reports[jobId(j.job)];
    const more = r.failed - r.failures.length;
    return h('div', { class: 'report', 'data-job': jobId(j.job) },
      h('div', {}, h('b', { text: j.name }), ' ', h('span', { class: 'report-summary', text: r.summary })),
      r.failures.map((f) => h('details', { class: 'failure' },
        h('summary', {}, h('span', { class: 'mono test-name', text: f.name }), h('span', { class: 'muted', text: '  ' + f.file + (f.error ? ', error' : '') })),
        h('pre', { class: 'log', text: f.output }))),
      more > 0 ? h('div', { class: 'muted', text: 'and ' + more + ' more failed' }) : null,
      r.notes.map((n) => h('div', { class: 'muted report-note', text: '⚠ ' + n })));
  }))];
}

// Layered layout: a job's column is one more than its deepest need; within a column,
// jobs are ordered by the mean row of their needs, which keeps most edges straight.
function drawDag(jobs) {
  const W = 184, H = 48, GX = 72, GY = 16, PAD = 8;
  const byName = new Map(jobs.map((j, i) => [j.name, i]));
  const needs = jobs.map((j) => (j.needs || []).map((n) => byName.get(n)).filter((i) => i !== undefined));
  const depth = new Array(jobs.length).fill(-1);
  const depthOf = (i, seen) => {
    if (depth[i] >= 0) return depth[i];
    if (seen.has(i)) return 0; // a cycle cannot be submitted; stay finite anyway
    seen.add(i);
    depth[i] = needs[i].length ? 1 + Math.max(...needs[i].map((n) => depthOf(n, seen))) : 0;
    return depth[i];
  };
  jobs.forEach((_, i) => depthOf(i, new Set()));
  const columns = [];
  jobs.forEach((_, i) => { (columns[depth[i]] = columns[depth[i]] || []).push(i); });
  const row = new Array(jobs.length).fill(0);
  columns.forEach((col, c) => {
    if (c > 0) {
      const key = (i) => needs[i].length ? needs[i].reduce((a, n) => a + row[n], 0) / needs[i].length : 0;
      col.sort((a, b) => key(a) - key(b) || a - b);
    }
    col.forEach((i, r) => { row[i] = r; });
  });
  const rows = Math.max(1, ...columns.map((c) => c.length));
  const width = PAD * 2 + columns.length * W + Math.max(0, columns.length - 1) * GX;
  const height = PAD * 2 + rows * H + (rows - 1) * GY;
  const pos = (i) => {
    const colHeight = columns[depth[i]].length * H + (columns[depth[i]].length - 1) * GY;
    const offset = (height - PAD * 2 - colHeight) / 2;
    return { x: PAD + depth[i] * (W + GX), y: PAD + offset + row[i] * (H + GY) };
  };
  const svg = s('svg', { width, height, viewBox: '0 0 ' + width + ' ' + height, role: 'img', 'aria-label': 'job graph' },
    s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
      s('path', { d: 'M 0 0 L 10 5 L 0 10 z', fill: '#b9c0cc' }))));
  jobs.forEach((j, i) => {
    for (const n of needs[i]) {
      const a = pos(n), b = pos(i);
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x - 2, y2 = b.y + H / 2;
      svg.append(s('path', { class: jobs[n].state === 'succeeded' ? 'edge done' : 'edge', 'marker-end': 'url(#arrow)',
        d: 'M ' + x1 + ' ' + y1 + ' C ' + (x1 + GX / 2) + ' ' + y1 + ', ' + (x2 - GX / 2) + ' ' + y2 + ', ' + x2 + ' ' + y2 }));
    }
  });
  jobs.forEach((j, i) => {
    const p = pos(i);
    const name = j.name.length > 22 ? j.name.slice(0, 21) + '…' : j.name;
    const id = jobId(j.job);
    svg.append(s('g', { class: 'node s-' + j.state, 'data-job': id, 'data-state': j.state, transform: 'translate(' + p.x + ',' + p.y + ')', onclick: () => go('/jobs/' + id) },
      s('title', { text: j.name + ' (' + id + '): ' + j.state }),
      s('rect', { width: W, height: H, rx: 9 }),
      s('circle', { class: 'bead', cx: 16, cy: H / 2, r: 5 }),
      s('text', { class: 'name', x: 30, y: 20, text: name }),
      s('text', { class: 'state', x: 30, y: 37, text: j.state + (j.attempt > 1 ? ' · attempt ' + j.attempt : '') + (j.started_at ? ' · ' + when(j.started_at, j.finished_at) : '') })));
  });
  return svg;
}

// ----- a job: its log, live -----

const ANSI = new RegExp(String.fromCharCode(27) + '\\[[0-9;?]*[ -/]*[@-~]', 'g');

async function pageJob(id) {
  let job = await api('/api/jobs/' + id);
  const title = h('h1');
  const meta = h('div', { class: 'meta' });
  const actions = h('div', { class: 'actions' });
  const log = h('pre', { class: 'log', id: 'log', 'aria-live': 'off' });
  mount('job', h('div', { class: 'head' }, h('div', { class: 'grow' }, title, meta), actions), log);
  const draw = () => {
    title.textContent = job.name + ' · job ' + id;
    fill(meta, badge(job.state),
      h('span', {}, 'run ', h('a', { href: '/runs/' + job.job.run, text: '#' + job.job.run })),
      h('span', {}, 'agent ', h('b', { class: 'mono', text: job.agent || '–' })),
      h('span', {}, 'attempt ', h('b', { text: String(job.attempt || '–') })),
      job.exit_code !== null && job.exit_code !== undefined ? h('span', {}, 'exit ', h('b', { text: String(job.exit_code) })) : null,
      h('span', {}, 'took ', h('b', { text: when(job.started_at, job.finished_at) })));
    fill(actions, job.state === 'awaiting-approval' && can('approve_job')
      ? h('button', { class: 'primary', 'data-action': 'approve', onclick: async () => {
        try { await api('/api/jobs/' + id + '/approve', { method: 'POST' }); } catch (e) { banner(e.message); }
      } }, 'Approve') : null);
  };
  draw();
  let lines = 0;
  const append = (text) => {
    const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 24;
    log.append(document.createTextNode(text.replace(ANSI, '')));
    lines++;
    if (stick) log.scrollTop = log.scrollHeight;
  };
  const note = (text) => { log.append(h('span', { class: 'note', text })); };
  if (job.attempt === 0 && TERMINAL.has(job.state)) {
    note('(this job never ran: ' + job.state + ')\n');
    ready('job');
    return;
  }
  live('/api/jobs/' + id + '/log', {
    reopen: () => { fill(log); lines = 0; },
    log: (chunk) => append(chunk.text),
    job: (view) => { job = view; draw(); },
    end: async (end, source) => {
      source.close();
      try { job = await api('/api/jobs/' + id); } catch (_) { job.state = end.state; }
      draw();
      note((lines ? '\n' : '') + '(end of log: ' + end.state + ')\n');
      document.body.dataset.logEnded = '1';
    },
    problem: (p) => note('(' + p.error + ')\n'),
  });
  ready('job');
}

// ----- deployments -----

async function pageDeployments() {
  const list = await api('/api/deployments');
  const panel = h('div', { class: 'panel', id: 'deployments' });
  if (!list.length) {
    panel.append(h('div', { class: 'empty' },
      h('p', { text: 'No deployments yet.' }),
      h('p', { class: 'muted', text: 'Deployments with their per-host progress and history appear here once the coordinator runs them.' })));
  } else {
    const cols = ['ID', 'Environment', 'App', 'Release', 'Strategy', 'State', 'Hosts', 'By', 'Created'];
    const hosts = (d) => h('span', {}, d.hosts.map((x) =>
      h('span', { class: 'chip state-' + x.state, title: x.hostname + ': ' + x.state + (x.reason ? ' (' + x.reason + ')' : ''), text: x.state })));
    panel.append(h('table', {}, h('thead', {}, h('tr', {}, cols.map((k) => h('th', { text: k })))),
      h('tbody', {}, list.map((d) => h('tr', {},
        h('td', { text: String(d.id) }),
        h('td', { text: d.environment }),
        h('td', { text: d.app }),
        h('td', { text: d.release.id + ' (' + d.release.version + ')' }),
        h('td', { text: d.strategy }),
        h('td', { text: d.state + (d.reason ? ': ' + d.reason : '') }),
        h('td', {}, hosts(d)),
        h('td', { text: d.created_by }),
        h('td', { text: new Date(d.created_at).toISOString().replace('T', ' ').slice(0, 19) }))))));
  }
  mount('deployments', h('div', { class: 'head' }, h('div', { class: 'grow' }, h('h1', { text: 'Deployments' }))), panel);
  ready('deployments');
}

render();
