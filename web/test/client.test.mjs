// WsprotoClient against a fake WebSocket: request ids, replies and errors,
// replay after reconnect, heartbeat watchdog, events. Run: node --test web/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  decodeMessage,
  encodeMessage,
  ERROR_CODE,
  OP,
  WsprotoClient,
} from '../wsproto.js';
import { FakeWebSocket } from './fake-websocket.mjs';


const latest = () => FakeWebSocket.instances.at(-1);
const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));
const nextEvent = (target, type) =>
  new Promise((resolve) => target.addEventListener(type, (e) => resolve(e.detail), { once: true }));

function client(options = {}) {
  FakeWebSocket.instances = [];
  return new WsprotoClient('ws://test/ws?user=alice', {
    WebSocket: FakeWebSocket,
    heartbeatMs: 0,
    minDelayMs: 5,
    maxDelayMs: 20,
    requestTimeoutMs: 500,
    ...options,
  });
}

test('requests carry fresh ids and resolve on the echoing reply', async () => {
  const c = client();
  const ws = latest();
  assert.equal(ws.binaryType, 'arraybuffer');
  ws.open();
  const published = c.publish('demo.value', '42.5');
  const presence = c.presence({ room: 'lobby' });
  const [pub, pres] = ws.sent;
  assert.equal(pub.opcode, OP.PUBLISH);
  assert.notEqual(pub.requestId, pres.requestId);
  const sentPublish = decodeMessage('Publish', pub.payload);
  assert.equal(sentPublish.topic, 'demo.value');
  assert.equal(new TextDecoder().decode(sentPublish.data), '42.5');

  // Answers in any order are matched by id.
  ws.push(OP.PRESENCE, encodeMessage('Presence', { room: 'lobby', count: 1, members: [{ sessionId: 's', userId: 'a' }] }), pres.requestId);
  ws.push(OP.PUBLISH, encodeMessage('Published', { topic: 'demo.value', seq: 7, sessions: 2 }), pub.requestId);
  assert.deepEqual(await published, { topic: 'demo.value', room: '', seq: 7, sessions: 2, nodes: 0, epoch: '' });
  assert.deepEqual((await presence).members, [{ sessionId: 's', userId: 'a' }]);
  c.close();
});

test('an ERROR echoing the id rejects with its code; others become error events', async () => {
  const c = client();
  const ws = latest();
  ws.open();
  const said = c.say('lobby', 'hi');
  const { requestId } = ws.sent[0];
  const unsolicited = nextEvent(c, 'error');
  ws.push(OP.ERROR, encodeMessage('Error', { code: 3, message: 'text', opcode: 0 }));
  ws.push(OP.ERROR, encodeMessage('Error', { code: 15, message: 'not in room lobby', opcode: OP.SAY }), requestId);
  await assert.rejects(said, (err) => err.code === 15 && err.opcode === OP.SAY && /not in room/.test(err.message));
  assert.equal((await unsolicited).code, 3);
  c.close();
});

test('refreshToken sends REFRESH_TOKEN and resolves to TokenRefreshed', async () => {
  const c = client();
  const ws = latest();
  ws.open();
  const refreshed = c.refreshToken('new.jwt.token');
  const [sent] = ws.sent;
  assert.equal(sent.opcode, OP.REFRESH_TOKEN);
  assert.deepEqual(decodeMessage('RefreshToken', sent.payload), { token: 'new.jwt.token' });
  ws.push(OP.REFRESH_TOKEN, encodeMessage('TokenRefreshed', { expiresAtMs: 1700000060000 }), sent.requestId);
  assert.deepEqual(await refreshed, { expiresAtMs: 1700000060000 });

  const refused = c.refreshToken('bad');
  ws.push(OP.ERROR, encodeMessage('Error', { code: ERROR_CODE.INVALID_TOKEN, message: 'bad signature', opcode: OP.REFRESH_TOKEN }), ws.sent[1].requestId);
  await assert.rejects(refused, (err) => err.code === ERROR_CODE.INVALID_TOKEN);
  c.close();
});

test('requests time out, and reject when the client closes', async () => {
  const c = client({ requestTimeoutMs: 30 });
  latest().open();
  await assert.rejects(c.request(OP.ECHO, 'x'), { code: 'TIMEOUT' });
  const pending = c.request(OP.ECHO, 'y', { timeoutMs: 5000 });
  c.close();
  await assert.rejects(pending, { code: 'CLOSED' });
  await assert.rejects(c.request(OP.ECHO, 'z'), { code: 'CLOSED' });
});

test('subscribe and join before open are sent on open, before queued requests', async () => {
  const c = client();
  const ws = latest();
  const subscribed = c.subscribe(['demo.value', 'alarm.#']);
  const joined = c.join('lobby', { presenceEvents: true });
  const said = c.say('lobby', 'early', { includeSelf: true });
  const opened = nextEvent(c, 'open');
  ws.open();
  await opened;
  assert.deepEqual(ws.sent.map((f) => f.opcode), [OP.SUBSCRIBE, OP.JOIN, OP.SAY]);
  assert.deepEqual(decodeMessage('Subscribe', ws.sent[0].payload).topics, ['demo.value', 'alarm.#']);
  assert.deepEqual(decodeMessage('Join', ws.sent[1].payload), { room: 'lobby', presenceEvents: true, since: null });
  assert.equal(decodeMessage('Say', ws.sent[2].payload).includeSelf, true);

  const joinedEvent = nextEvent(c, 'joined');
  ws.push(OP.ACK, undefined, ws.sent[0].requestId);
  ws.push(OP.JOIN, encodeMessage('Presence', { room: 'lobby', count: 1 }), ws.sent[1].requestId);
  ws.push(OP.SAY, encodeMessage('Published', { room: 'lobby', seq: 1 }), ws.sent[2].requestId);
  await subscribed;
  assert.equal((await joined).count, 1);
  assert.equal((await joinedEvent).room, 'lobby');
  assert.equal((await said).seq, 1);
  c.close();
});

test('after a drop the client reconnects and replays topics and rooms', async () => {
  const c = client();
  let ws = latest();
  ws.open();
  c.subscribe('a.b');
  c.subscribe('c.*');
  c.join('lobby', { presenceEvents: true });
  c.join('quiet');
  c.unsubscribe('a.b');
  for (const f of ws.sent) ws.push(f.opcode === OP.JOIN ? OP.JOIN : OP.ACK, undefined, f.requestId);
  const inFlight = c.publish('x', 'y');

  const closed = nextEvent(c, 'close');
  const reconnecting = nextEvent(c, 'reconnecting');
  ws.serverClose(1001, 'server shutting down');
  assert.deepEqual(await closed, { code: 1001, reason: 'server shutting down', wasClean: true });
  const { delayMs, attempt } = await reconnecting;
  assert.equal(attempt, 1);
  assert.ok(delayMs >= 0 && delayMs <= 5, `delay ${delayMs}`);
  await assert.rejects(inFlight, { code: 'CLOSED' });

  await tick(10);
  assert.equal(FakeWebSocket.instances.length, 2);
  ws = latest();
  ws.open();
  assert.deepEqual(ws.sent.map((f) => f.opcode), [OP.SUBSCRIBE, OP.JOIN, OP.JOIN]);
  assert.deepEqual(decodeMessage('Subscribe', ws.sent[0].payload).topics, ['c.*']);
  assert.deepEqual(decodeMessage('Join', ws.sent[1].payload), { room: 'lobby', presenceEvents: true, since: null });
  assert.deepEqual(decodeMessage('Join', ws.sent[2].payload), { room: 'quiet', presenceEvents: false, since: null });
  c.close();
});

test("a draining server's reconnect hint is waited for, plus the back-off's jitter", async () => {
  const c = client({ minDelayMs: 4, maxDelayMs: 16 });
  latest().open();
  const reconnecting = nextEvent(c, 'reconnecting');
  latest().serverClose(1001, 'server shutting down; reconnect after 40 ms');
  const { delayMs } = await reconnecting;
  assert.ok(delayMs >= 40 && delayMs <= 44, `delay ${delayMs}`);
  await tick(20);
  assert.equal(FakeWebSocket.instances.length, 1, 'not before the hint');
  await tick(40);
  assert.equal(FakeWebSocket.instances.length, 2);
  c.close();
});

test('back-off grows up to maxDelayMs while connects fail', async () => {
  const c = client({ minDelayMs: 4, maxDelayMs: 16 });
  const delays = [];
  c.addEventListener('reconnecting', (e) => delays.push(e.detail));
  for (let i = 0; i < 5; i++) {
    latest().serverClose(1006);
    await tick(20);
  }
  c.close();
  assert.deepEqual(delays.map((d) => d.attempt), [1, 2, 3, 4, 5]);
  const ceilings = [4, 8, 16, 16, 16];
  // Full jitter: anywhere in [0, window].
  delays.forEach(({ delayMs }, i) => assert.ok(delayMs >= 0 && delayMs <= ceilings[i], `${i}: ${delayMs}`));
});

test('reconnect delays use full jitter: spread over the whole window', () => {
  const c = client({ minDelayMs: 1000, maxDelayMs: 1000, reconnect: false });
  const delays = [];
  for (let i = 0; i < 400; i++) {
    delays.push(c._scheduleReconnect().delayMs);
    clearTimeout(c._reconnectTimer);
  }
  c._reconnectTimer = null;
  c.close();
  assert.ok(delays.every((d) => d >= 0 && d <= 1000));
  assert.ok(delays.some((d) => d < 250), 'short delays too, not only [d/2, d]');
  assert.ok(delays.some((d) => d > 750));
});

test('heartbeat sends PING and a silent socket is dropped and replaced', async () => {
  // Periods are generous so a loaded machine's timer jitter cannot matter.
  const c = client({ heartbeatMs: 200 });
  try {
    const ws = latest();
    ws.open();
    await tick(250);
    assert.ok(ws.sent.some((f) => f.opcode === OP.PING && f.requestId === null), 'a PING was sent');
    // Traffic keeps it alive past 2.5 heartbeats (500 ms)...
    for (let i = 0; i < 8; i++) {
      ws.push(OP.PONG);
      await tick(100);
    }
    assert.equal(ws.closedWith, null);
    // ...silence does not.
    const closed = nextEvent(c, 'close');
    assert.deepEqual(await closed, { code: 4000, reason: 'heartbeat timeout', wasClean: false });
    assert.deepEqual(ws.closedWith, { code: 4000, reason: 'heartbeat timeout' });
    await tick(150);
    assert.equal(FakeWebSocket.instances.length, 2);
  } finally {
    c.close();
  }
});

test('late timers (background tabs) get a PING before the socket is dropped', async () => {
  // Periods are generous so a loaded machine's timer jitter cannot matter.
  const c = client({ heartbeatMs: 200 });
  try {
    const ws = latest();
    ws.open();
    clearInterval(c._heartbeatTimer); // as if the tab's interval never ran
    const { code } = await nextEvent(c, 'close');
    const closedAt = Date.now();
    assert.equal(code, 4000);
    const pings = ws.sent.filter((f) => f.opcode === OP.PING);
    assert.ok(pings.length >= 1, 'the watchdog sent a PING first');
    assert.ok(closedAt - pings[0].at >= 190, `dropped ${closedAt - pings[0].at} ms after that PING`);
  } finally {
    c.close();
  }
});

test('welcome, delivery and presence events decode their payloads', async () => {
  const c = client();
  const ws = latest();
  ws.open();
  const welcome = nextEvent(c, 'welcome');
  ws.push(OP.WELCOME, encodeMessage('Welcome', { sessionId: 's1', userId: 'alice', protocolVersion: 1 }));
  assert.equal((await welcome).userId, 'alice');
  assert.equal(c.welcome.sessionId, 's1');

  const delivery = nextEvent(c, 'delivery');
  ws.push(OP.DELIVERY, encodeMessage('Delivery', { kind: 1, room: 'lobby', sender: { sessionId: 's2', userId: 'bob' }, seq: 3, data: 'héllo' }));
  const d = await delivery;
  assert.equal(d.text, 'héllo');
  assert.equal(d.sender.userId, 'bob');
  assert.equal(d.seq, 3);

  const binary = nextEvent(c, 'delivery');
  ws.push(OP.DELIVERY, encodeMessage('Delivery', { topic: 't', data: new Uint8Array([0xff, 0xfe]) }));
  assert.equal((await binary).text, undefined);

  const presence = nextEvent(c, 'presence');
  ws.push(OP.PRESENCE_EVENT, encodeMessage('PresenceEvent', { room: 'lobby', action: 1, member: { sessionId: 's2', userId: 'bob' }, count: 1 }));
  assert.deepEqual(await presence, { room: 'lobby', action: 1, member: { sessionId: 's2', userId: 'bob' }, count: 1 });

  const bad = nextEvent(c, 'error');
  ws.onmessage({ data: new Uint8Array([0, 0]).buffer });
  assert.equal((await bad).code, 'DECODE');
  c.close();
});

test('close() closes with 1000 and does not reconnect', async () => {
  const c = client();
  const ws = latest();
  ws.open();
  const closed = nextEvent(c, 'close');
  c.close();
  assert.equal((await closed).code, 1000);
  assert.deepEqual(ws.closedWith, { code: 1000, reason: '' });
  await tick(30);
  assert.equal(FakeWebSocket.instances.length, 1);
  await assert.rejects(c.join('lobby'), { code: 'CLOSED' });
});
