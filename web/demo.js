// The demo page: a chat in room `lobby` and a live chart of topic
// `demo.value`, both over one wsproto connection. No framework, no build.
//
// DOM contract (used by web/test/demo.mjs):
//   #status        text "connected" once WELCOME arrived (data-state mirrors it)
//   #members       one <li class="member" data-user=ID> per user in the room
//   #member-count  sessions in the room
//   #messages      one <li class="message"> per chat message: sender id + text
//   #chat-input / #chat-send   the message box and its button
//   #chart         canvas; data-points = number of values drawn (max 100)
//   #latest-value  the last value exactly as received
import { DELIVERY_KIND, PRESENCE_ACTION, WsprotoClient } from './wsproto.js';

const ROOM = 'lobby';
const TOPIC = 'demo.value';
const MAX_POINTS = 100;

const $ = (selector) => document.querySelector(selector);
const el = {
  status: $('#status'),
  whoami: $('#whoami'),
  members: $('#members'),
  memberCount: $('#member-count'),
  messages: $('#messages'),
  form: $('#chat-form'),
  input: $('#chat-input'),
  send: $('#chat-send'),
  errorLog: $('#error-log'),
  latest: $('#latest-value'),
  chart: $('#chart'),
  curlHint: $('#curl-hint'),
  curlLoop: $('#curl-loop'),
};

// --- who am I, where is the server ------------------------------------------

const params = new URLSearchParams(location.search);
const requestedUser = params.get('user') || `guest-${Math.random().toString(16).slice(2, 6)}`;
let myUserId = requestedUser; // replaced by what WELCOME says
let mySessionId = '';

const wsScheme = location.protocol === 'https:' ? 'wss' : 'ws';
const wsUrl = `${wsScheme}://${location.host}/ws?user=${encodeURIComponent(requestedUser)}`;

if (location.host) {
  for (const hint of [el.curlHint, el.curlLoop]) {
    hint.textContent = hint.textContent.replace('http://HOST', `${location.protocol}//${location.host}`);
  }
}

// --- connection ---------------------------------------------------------------

const client = new WsprotoClient(wsUrl);
window.wsprotoDemo = { client }; // handy from the dev tools console

function setStatus(state, text) {
  el.status.dataset.state = state;
  el.status.textContent = text;
}

client.addEventListener('open', () => setStatus('connecting', 'connecting…'));

client.addEventListener('welcome', ({ detail: welcome }) => {
  myUserId = welcome.userId || requestedUser;
  mySessionId = welcome.sessionId;
  el.whoami.textContent = `you are ${myUserId} · session ${mySessionId} · ${welcome.server}`;
  setStatus('connected', 'connected');
});

client.addEventListener('close', ({ detail }) => {
  setStatus('offline', `offline (${detail.code})`);
});

client.addEventListener('reconnecting', ({ detail }) => {
  const seconds = (detail.delayMs / 1000).toFixed(1);
  setStatus('reconnecting', `reconnecting in ${seconds} s (attempt ${detail.attempt})`);
});

client.addEventListener('error', ({ detail }) => {
  showError(`server error ${detail.code}: ${detail.message}`);
});

// Subscriptions and rooms are remembered by the client and replayed after a
// reconnect; the `joined` event fires for every (re)join with a fresh member list.
client.subscribe(TOPIC).catch((err) => showError(`subscribe failed: ${err.message}`));
client.join(ROOM, { presenceEvents: true }).catch((err) => showError(`join failed: ${err.message}`));

client.addEventListener('delivery', ({ detail: delivery }) => {
  switch (delivery.kind) {
    case DELIVERY_KIND.ROOM:
      if (delivery.room === ROOM) addMessage(delivery);
      break;
    case DELIVERY_KIND.TOPIC:
      addValue(delivery);
      break;
    default: {
      // Direct messages and broadcasts (e.g. from the publish API).
      const from = senderName(delivery);
      const label = delivery.kind === DELIVERY_KIND.DIRECT ? `direct from ${from}` : 'broadcast';
      addNotice(`${label}: ${delivery.text ?? `${delivery.data.length} bytes`}`);
    }
  }
});

// --- members ------------------------------------------------------------------

const members = new Map(); // session id -> user id
let memberCount = 0;

client.addEventListener('joined', ({ detail: presence }) => {
  if (presence.room !== ROOM) return;
  members.clear();
  for (const m of presence.members) members.set(m.sessionId, m.userId);
  memberCount = presence.count;
  renderMembers();
});

client.addEventListener('presence', ({ detail: event }) => {
  if (event.room !== ROOM || !event.member) return;
  const { sessionId, userId } = event.member;
  if (event.action === PRESENCE_ACTION.JOIN) {
    if (!members.has(sessionId) && sessionId !== mySessionId) addNotice(`${userId || sessionId} joined`);
    members.set(sessionId, userId);
  } else {
    if (members.has(sessionId)) addNotice(`${userId || sessionId} left`);
    members.delete(sessionId);
  }
  memberCount = event.count;
  renderMembers();
});

function renderMembers() {
  // One entry per user; a user with several tabs open shows "×N".
  const sessionsByUser = new Map();
  for (const [sessionId, userId] of members) {
    const name = userId || sessionId;
    sessionsByUser.set(name, (sessionsByUser.get(name) ?? 0) + 1);
  }
  const items = [...sessionsByUser].sort(([a], [b]) => a.localeCompare(b)).map(([name, sessions]) => {
    const li = document.createElement('li');
    li.className = 'member';
    li.dataset.user = name;
    li.append(name);
    if (name === myUserId) li.append(' ', span('you', '(you)'));
    if (sessions > 1) li.append(' ', span('sessions', `×${sessions}`));
    return li;
  });
  el.members.replaceChildren(...items);
  el.memberCount.textContent = String(Math.max(memberCount, members.size));
}

// --- chat -----------------------------------------------------------------------

el.form.addEventListener('submit', async (event) => {
  event.preventDefault();
  const text = el.input.value.trim();
  if (!text) return;
  el.send.disabled = true;
  try {
    // include_self: every page, the sender's included, renders chat only
    // from deliveries, so all pages show the same messages in the same order.
    await client.say(ROOM, text, { includeSelf: true });
    el.input.value = '';
    showError('');
  } catch (err) {
    showError(`not sent: ${err.message}`);
  } finally {
    el.send.disabled = false;
    el.input.focus();
  }
});

function senderName(delivery) {
  return delivery.sender?.userId || delivery.sender?.sessionId || 'server';
}

function addMessage(delivery) {
  const li = document.createElement('li');
  li.className = 'message';
  const from = senderName(delivery);
  if (delivery.sender && delivery.sender.sessionId === mySessionId) li.classList.add('mine');
  li.dataset.from = from;
  li.dataset.seq = String(delivery.seq);
  const time = document.createElement('time');
  const at = delivery.publishedAtMs ? new Date(delivery.publishedAtMs) : new Date();
  time.dateTime = at.toISOString();
  time.textContent = at.toLocaleTimeString();
  li.append(span('from', from), span('text', delivery.text ?? `[${delivery.data.length} bytes]`), time);
  appendToLog(li);
}

function addNotice(text) {
  const li = document.createElement('li');
  li.className = 'notice';
  li.textContent = text;
  appendToLog(li);
}

function appendToLog(li) {
  // Stick to the bottom unless the reader scrolled up.
  const log = el.messages;
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(li);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function span(className, text) {
  const s = document.createElement('span');
  s.className = className;
  s.textContent = text;
  return s;
}

function showError(text) {
  el.errorLog.textContent = text;
}

// --- live chart -------------------------------------------------------------------

const values = [];

function addValue(delivery) {
  const text = delivery.text;
  const value = Number(text);
  if (text === undefined || text.trim() === '' || !Number.isFinite(value)) {
    console.warn(`ignoring non-numeric value on ${delivery.topic}:`, text ?? delivery.data);
    return;
  }
  values.push(value);
  if (values.length > MAX_POINTS) values.shift();
  el.latest.textContent = text;
  el.chart.dataset.points = String(values.length);
  scheduleDraw();
}

let drawPending = false;
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false;
    drawChart();
  });
}

function drawChart() {
  const canvas = el.chart;
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const pad = { left: 52, right: 14, top: 14, bottom: 22 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  ctx.font = '11px system-ui, sans-serif';

  if (values.length === 0) {
    ctx.fillStyle = '#6b7280';
    ctx.textAlign = 'center';
    ctx.fillText(`waiting for values on ${TOPIC}…`, width / 2, height / 2);
    return;
  }

  // Y range: the data's, with a little headroom; a flat line gets ±1.
  let min = Math.min(...values);
  let max = Math.max(...values);
  if (min === max) {
    min -= 1;
    max += 1;
  }
  const margin = (max - min) * 0.08;
  min -= margin;
  max += margin;
  // X: the values spread over the full width, oldest left, newest right.
  const n = values.length;
  const x = (i) => pad.left + (n === 1 ? plotW : (i / (n - 1)) * plotW);
  const y = (v) => pad.top + (1 - (v - min) / (max - min)) * plotH;

  // Grid and labels.
  ctx.strokeStyle = '#e3e6eb';
  ctx.fillStyle = '#6b7280';
  ctx.lineWidth = 1;
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  const ticks = 4;
  for (let t = 0; t <= ticks; t++) {
    const v = min + ((max - min) * t) / ticks;
    const py = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(pad.left, py);
    ctx.lineTo(width - pad.right, py);
    ctx.stroke();
    ctx.fillText(formatTick(v, max - min), pad.left - 6, py);
  }
  ctx.textAlign = 'left';
  ctx.textBaseline = 'alphabetic';
  ctx.fillText(`last ${values.length} of ${MAX_POINTS}`, pad.left, height - 6);

  // The line, a light fill under it, and a dot on the newest value.
  ctx.strokeStyle = '#2f6fde';
  ctx.lineWidth = 2;
  ctx.lineJoin = 'round';
  ctx.beginPath();
  values.forEach((v, i) => {
    if (i === 0) ctx.moveTo(x(i), y(v));
    else ctx.lineTo(x(i), y(v));
  });
  ctx.stroke();
  ctx.lineTo(x(n - 1), pad.top + plotH);
  ctx.lineTo(x(0), pad.top + plotH);
  ctx.closePath();
  ctx.fillStyle = 'rgba(47, 111, 222, 0.08)';
  ctx.fill();
  ctx.fillStyle = '#2f6fde';
  ctx.beginPath();
  ctx.arc(x(n - 1), y(values.at(-1)), 3.5, 0, Math.PI * 2);
  ctx.fill();
}

function formatTick(v, range) {
  const digits = range >= 10 ? 0 : range >= 1 ? 1 : 2;
  return v.toFixed(digits);
}

new ResizeObserver(scheduleDraw).observe(el.chart);
scheduleDraw();
