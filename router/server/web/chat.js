// Switchyard chat page: rooms, direct messages (dialog channels, announced through the
// peer's user:{id} inbox), history, a cluster view, and reconnects that neither lose nor
// repeat messages (each channel resubscribes with recovery: from = {offset, epoch}).
'use strict';

const $ = (id) => document.getElementById(id);
const SHOWN = 50;            // messages loaded when a conversation opens, and per "older" page
const DEFAULT_ROOMS = ['room:lobby'];

const state = {
  mode: 'off', devTokens: false, loginKind: null, // 'dev' | 'token'
  token: null, user: null,
  ws: null, connected: false, nextId: 1, waiting: new Map(),
  channels: new Map(),       // name -> {name, kind, title, epoch, offset, msgs: Map(offset -> msg), unread, knocked}
  active: null,
  outbox: [], flushing: false,
  hold: false, backoff: 300, timer: null,
};

// === wire ===

function setStatus(s, detail) {
  $('status').dataset.state = s;
  $('status').textContent = detail ? `${s} (${detail})` : s;
}

function notice(text) { $('notice').textContent = text || ''; }

function cmd(op, fields) {
  return new Promise((resolve, reject) => {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return reject({ code: 'disconnected', message: 'not connected' });
    const id = state.nextId++;
    state.waiting.set(id, { resolve, reject });
    ws.send(JSON.stringify(Object.assign({ id, op }, fields)));
  });
}

function onFrame(m) {
  if (m.push === 'message') return onMessage(m, true);
  if (m.push === 'unsubscribed') {
    const ch = state.channels.get(m.channel);
    if (ch) { ch.subscribed = false; resubscribe(ch); }
    return;
  }
  if (m.push === 'disconnect') return notice(`disconnected by the server: ${m.reason} (${m.code})`);
  const w = state.waiting.get(m.id);
  if (!w) return;
  state.waiting.delete(m.id);
  if (m.error) w.reject(m.error); else w.resolve(m.ok);
}

function openSocket() {
  clearTimeout(state.timer);
  if (state.ws || state.hold || !state.token) return;
  setStatus(state.connected ? 'reconnecting' : 'connecting');
  const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws', 'switchyard.v1');
  state.ws = ws;
  ws.onmessage = (e) => { try { onFrame(JSON.parse(e.data)); } catch (err) { console.error(err); } };
  ws.onopen = async () => {
    try {
      const ok = await cmd('connect', { token: state.token, name: 'chat' });
      state.user = ok.user || state.user;
      $('me').textContent = state.user ? `signed in as ${state.user}` : 'anonymous';
      state.connected = true;
      state.backoff = 300;
      setStatus('connected');
      for (const ch of state.channels.values()) await resubscribe(ch);
      flushOutbox();
    } catch (e) {
      notice(`connect failed: ${e.message || e.code}`);
    }
  };
  ws.onclose = async (e) => {
    if (state.ws === ws) state.ws = null;
    for (const w of state.waiting.values()) w.reject({ code: 'disconnected', message: 'connection closed' });
    state.waiting.clear();
    for (const ch of state.channels.values()) ch.subscribed = false;
    setStatus('reconnecting', e.code);
    if (e.code === 4001) {
      if (state.loginKind === 'dev') {
        try { await mintDevToken(state.user); } catch (err) { return showLogin(`token refused: ${err.message}`); }
      } else {
        return showLogin('the token was refused (4001): paste a new one');
      }
    }
    if (e.code === 4009) notice('too many open sessions for this user; retrying');
    state.timer = setTimeout(openSocket, state.backoff);
    state.backoff = Math.min(state.backoff * 2, 5000);
  };
}

// === channels ===

function channel(name, kind, title) {
  let ch = state.channels.get(name);
  if (!ch) {
    ch = { name, kind, title: title || name, epoch: null, offset: null, msgs: new Map(), unread: 0, subscribed: false, knocked: false };
    state.channels.set(name, ch);
    renderNav();
    if (state.connected && state.ws) resubscribe(ch);
  }
  return ch;
}

// Subscribes: a channel never seen starts SHOWN messages back; a known one recovers exactly
// from the last offset it delivered, or starts over when the stream lost continuity.
async function resubscribe(ch) {
  if (ch.subscribed || ch.subscribing) return;
  ch.subscribing = true;
  try {
    if (ch.epoch !== null && ch.offset !== null) {
      const ok = await cmd('subscribe', { channel: ch.name, from: { offset: ch.offset, epoch: ch.epoch } });
      ch.subscribed = true;
      if (ok.recovered === false) {
        notice(`${ch.title}: the stream changed while offline (epoch ${ok.epoch}); history reloaded`);
        ch.msgs.clear();
        ch.epoch = ok.epoch;
        ch.offset = ok.offset;
        await loadOlder(ch, ok.offset + 1);
      }
    } else {
      const top = await cmd('history', { channel: ch.name, limit: 1 });
      const from = Math.max(0, top.offset - SHOWN);
      ch.epoch = top.epoch;
      ch.offset = from;
      const ok = await cmd('subscribe', { channel: ch.name, from });
      ch.subscribed = true;
      if (ok.epoch !== ch.epoch) { ch.epoch = ok.epoch; ch.msgs.clear(); ch.offset = ok.offset; }
    }
  } catch (e) {
    if (e.code !== 'disconnected') {
      notice(`${ch.title}: ${e.code}: ${e.message}`);
      if (e.code === 'forbidden' || e.code === 'bad_request') ch.denied = true;
    }
  } finally {
    ch.subscribing = false;
    render();
  }
}

// Adds the page of messages just below offset `below` (history is inclusive of since+1..).
async function loadOlder(ch, below) {
  const since = Math.max(0, below - 1 - SHOWN);
  if (below <= 1) return;
  const page = await cmd('history', { channel: ch.name, since, limit: below - 1 - since });
  if (page.epoch !== ch.epoch) return;
  for (const m of page.messages) onMessage(m, false);
}

function onMessage(m, live) {
  const ch = state.channels.get(m.channel);
  if (!ch) return;
  if (m.epoch !== ch.epoch) { ch.msgs.clear(); ch.epoch = m.epoch; }
  if (live) {
    if (ch.offset !== null && m.offset <= ch.offset) return; // already delivered
    ch.offset = m.offset;
  }
  if (ch.msgs.has(m.offset)) return;
  ch.msgs.set(m.offset, m);
  if (ch.kind === 'inbox' && m.data && typeof m.data.dialog === 'string' && m.from) {
    openDialog(m.from);
  }
  if (state.active !== ch.name && live) ch.unread++;
  render();
}

function dialogName(a, b) { return a < b ? `dialog:${a}:${b}` : `dialog:${b}:${a}`; }

function openDialog(peer) {
  if (!state.user || peer === state.user) return null;
  return channel(dialogName(state.user, peer), 'dm', peer);
}

// === sending (queued; an unacknowledged publish is resent after a reconnect with the same
// idempotency key, so it is stored once) ===

function publish(channelName, data) {
  state.outbox.push({ channel: channelName, data, idempotency_key: `${state.user || 'anon'}-${Date.now()}-${Math.random().toString(36).slice(2)}` });
  flushOutbox();
}

async function flushOutbox() {
  if (state.flushing) return;
  state.flushing = true;
  try {
    while (state.outbox.length && state.connected && state.ws) {
      const item = state.outbox[0];
      try {
        await cmd('publish', item);
        state.outbox.shift();
      } catch (e) {
        if (e.code === 'disconnected') break;
        if (e.code === 'rate_limited') { await new Promise((r) => setTimeout(r, 500)); continue; }
        state.outbox.shift();
        notice(`not sent to ${item.channel}: ${e.code}: ${e.message}`);
      }
    }
  } finally {
    state.flushing = false;
  }
}

function sendText(text) {
  const ch = state.channels.get(state.active);
  if (!ch || !text) return;
  if (ch.kind === 'dm' && !ch.knocked) {
    ch.knocked = true; // tell the peer's page which dialog to open
    publish(`user:${ch.title}`, { dialog: ch.name });
  }
  publish(ch.name, { text });
}

// === rendering ===

function renderNav() {
  const item = (ch) => {
    const li = document.createElement('li');
    li.dataset.channel = ch.name;
    li.textContent = ch.title;
    if (ch.unread) {
      const u = document.createElement('span');
      u.className = 'unread';
      u.textContent = ch.unread;
      li.appendChild(u);
    }
    if (ch.name === state.active) li.className = 'active';
    li.onclick = () => select(ch.name);
    return li;
  };
  const rooms = $('rooms'), dms = $('dms');
  rooms.replaceChildren(); dms.replaceChildren();
  for (const ch of state.channels.values()) (ch.kind === 'room' ? rooms : dms).appendChild(item(ch));
}

function render() {
  renderNav();
  const ch = state.channels.get(state.active);
  const list = $('messages');
  if (!ch) { list.replaceChildren(); $('title').textContent = ''; return; }
  $('title').textContent = ch.kind === 'dm' ? `Dialog with ${ch.title}` : ch.title;
  const offsets = [...ch.msgs.keys()].sort((a, b) => a - b);
  const items = [];
  if (offsets.length && offsets[0] > 1) {
    const li = document.createElement('li');
    const b = document.createElement('button');
    b.textContent = 'load older';
    b.id = 'older';
    b.onclick = () => loadOlder(ch, offsets[0]).catch((e) => notice(e.message));
    li.appendChild(b);
    items.push(li);
  }
  for (const o of offsets) {
    const m = ch.msgs.get(o);
    const li = document.createElement('li');
    li.dataset.offset = m.offset;
    li.dataset.from = m.from || '';
    const from = document.createElement('span');
    from.className = 'from';
    from.textContent = m.from || 'anonymous';
    const text = document.createElement('span');
    text.className = 'text';
    const d = m.data;
    text.textContent = d && typeof d.text === 'string' ? d.text : d && d.dialog ? `opened ${d.dialog}` : JSON.stringify(d);
    const meta = document.createElement('span');
    meta.className = 'meta';
    meta.textContent = `#${m.offset} ${new Date(m.ts).toLocaleTimeString()}`;
    li.append(from, text, meta);
    items.push(li);
  }
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.replaceChildren(...items);
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function select(name) {
  state.active = name;
  const ch = state.channels.get(name);
  if (ch) ch.unread = 0;
  render();
}

// Renders any JSON generically: objects as key/value tables, arrays of objects as tables
// with the union of their keys, long arrays of scalars summarized (value x count).
function renderJson(v) {
  if (Array.isArray(v)) {
    if (v.length && v.every((x) => x && typeof x === 'object' && !Array.isArray(x))) {
      const keys = [...new Set(v.flatMap(Object.keys))];
      const t = document.createElement('table');
      const head = t.insertRow();
      for (const k of keys) { const th = document.createElement('th'); th.textContent = k; head.appendChild(th); }
      for (const row of v) { const tr = t.insertRow(); for (const k of keys) tr.insertCell().appendChild(renderJson(row[k])); }
      return t;
    }
    if (v.length > 8 && v.every((x) => x === null || typeof x !== 'object')) {
      const counts = new Map();
      for (const x of v) counts.set(String(x), (counts.get(String(x)) || 0) + 1);
      const d = document.createElement('details');
      const s = document.createElement('summary');
      s.textContent = [...counts].map(([k, n]) => `${k} ×${n}`).join(', ');
      d.appendChild(s);
      d.appendChild(document.createTextNode(v.map((x, i) => `${i}: ${x}`).join('\n')));
      d.style.whiteSpace = 'pre-wrap';
      return d;
    }
    return document.createTextNode(v.map((x) => (x && typeof x === 'object' ? JSON.stringify(x) : String(x))).join(', '));
  }
  if (v && typeof v === 'object') {
    const t = document.createElement('table');
    for (const [k, val] of Object.entries(v)) {
      const tr = t.insertRow();
      const th = document.createElement('th');
      th.textContent = k;
      tr.appendChild(th);
      tr.insertCell().appendChild(renderJson(val));
    }
    return t;
  }
  return document.createTextNode(v === null || v === undefined ? '' : String(v));
}

async function refreshCluster() {
  try {
    const r = await fetch('/api/v1/cluster');
    const body = await r.json();
    $('cluster').replaceChildren(renderJson(body));
  } catch (e) {
    $('cluster').textContent = `cluster view unavailable: ${e}`;
  }
}

// === login ===

async function mintDevToken(user) {
  const r = await fetch('/api/v1/dev/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
  state.token = body.token;
  state.user = body.user;
  return body;
}

function showLogin(error) {
  state.hold = true;
  if (state.ws) state.ws.close();
  $('login').hidden = false;
  $('app').hidden = true;
  $('login-error').textContent = error || '';
  setStatus('signed-out');
}

function start() {
  $('login').hidden = true;
  $('app').hidden = false;
  state.hold = false;
  if (state.user) channel(`user:${state.user}`, 'inbox', 'Inbox');
  for (const r of DEFAULT_ROOMS) channel(r, 'room');
  if (!state.active) select(DEFAULT_ROOMS[0]);
  openSocket();
}

function payloadOf(token) {
  try { return JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))); } catch (e) { return {}; }
}

async function init() {
  try {
    const info = await (await fetch('/api/v1/auth')).json();
    state.mode = info.mode;
    state.devTokens = info.dev_tokens;
  } catch (e) { /* keep defaults */ }
  $('dev-hint').textContent = state.devTokens
    ? `dev tokens are on (auth mode: ${state.mode})`
    : 'dev tokens are off on this server: paste a token';
  $('dev-login').hidden = !state.devTokens;
  $('dev-login').onsubmit = async (e) => {
    e.preventDefault();
    try {
      await mintDevToken($('user').value.trim());
      state.loginKind = 'dev';
      start();
    } catch (err) { $('login-error').textContent = String(err.message || err); }
  };
  $('token-login').onsubmit = (e) => {
    e.preventDefault();
    state.token = $('token').value.trim();
    state.user = payloadOf(state.token).sub || null;
    state.loginKind = 'token';
    start();
  };
  $('join-form').onsubmit = (e) => {
    e.preventDefault();
    const name = $('room-input').value.trim();
    if (!name) return;
    channel(name, 'room');
    select(name);
    $('room-input').value = '';
  };
  $('dm-form').onsubmit = (e) => {
    e.preventDefault();
    const peer = $('dm-input').value.trim();
    const ch = openDialog(peer);
    if (!ch) return notice('sign in as a user to open a dialog with someone else');
    select(ch.name);
    $('dm-input').value = '';
  };
  $('send-form').onsubmit = (e) => {
    e.preventDefault();
    sendText($('text').value);
    $('text').value = '';
  };
  refreshCluster();
  setInterval(refreshCluster, 5000);
}

// Hooks for tests and debugging: drop the connection and hold it down until resume().
window.chatDebug = {
  state,
  drop() { state.hold = true; if (state.ws) state.ws.close(); },
  resume() { state.hold = false; openSocket(); },
};

init();
