// Devices and acknowledgements (PROTOCOL.md §9.4): the `device` option, the
// ACKNOWLEDGE schema, and WsprotoClient's batching of acknowledgements
// against a fake WebSocket (the test plays the server). Run: node --test web/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  decodeMessage,
  DELIVERY_KIND,
  encodeMessage,
  OP,
  WsprotoClient,
} from '../wsproto.js';
import { FakeWebSocket as BaseWebSocket } from './fake-websocket.mjs';

const fromHex = (hex) => Uint8Array.from(hex.match(/../g) ?? [], (b) => parseInt(b, 16));
const toHex = (bytes) => Buffer.from(bytes).toString('hex');

// ---------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------

test('OP.ACKNOWLEDGE is 21', () => {
  assert.equal(OP.ACKNOWLEDGE, 21);
});

test('protobuf Acknowledge and StreamAck round-trip', () => {
  const topic = { topic: 'a', room: '', position: { epoch: 'e1', seq: 3 }, user: false };
  const room = { topic: '', room: 'r', position: { epoch: 'e1', seq: 300 }, user: false };
  const user = { topic: '', room: '', position: { epoch: 'u1', seq: 2 }, user: true };
  // Key bytes: field << 3 | wire type; 300 = ac 02 as a varint.
  const topicHex = '0a0161' + '1a060a0265311003';
  const roomHex = '120172' + '1a070a02653110ac02';
  const userHex = '1a060a0275311002' + '2001';
  assert.equal(toHex(encodeMessage('StreamAck', topic)), topicHex);
  assert.equal(toHex(encodeMessage('StreamAck', user)), userHex);
  const hex = '0a0b' + topicHex + '0a0c' + roomHex + '0a0a' + userHex;
  assert.equal(toHex(encodeMessage('Acknowledge', { streams: [topic, room, user] })), hex);
  const decoded = decodeMessage('Acknowledge', fromHex(hex));
  assert.deepEqual(decoded, { streams: [topic, room, user] });
  assert.equal(toHex(encodeMessage('Acknowledge', decoded)), hex);
  assert.deepEqual(decodeMessage('Acknowledge', new Uint8Array()), { streams: [] });
  assert.deepEqual(decodeMessage('StreamAck', new Uint8Array()), { topic: '', room: '', position: null, user: false });
});

test('protobuf Delivery redelivered (11) and Gap user (7)', () => {
  // A critical push in the user's stream, sent again: kind 2, seq 4, epoch u1.
  const delivery = { kind: 2, seq: 4, epoch: 'u1', redelivered: true };
  const deliveryHex = '0802' + '2804' + '4a027531' + '5801';
  assert.equal(toHex(encodeMessage('Delivery', delivery)), deliveryHex);
  const decoded = decodeMessage('Delivery', fromHex(deliveryHex));
  for (const [key, value] of Object.entries(delivery)) assert.deepEqual(decoded[key], value, key);
  assert.equal(decoded.replayed, false);
  assert.equal(decodeMessage('Delivery', new Uint8Array()).redelivered, false);

  const gap = { topic: '', room: '', user: true, epoch: 'u1', fromSeq: 3, toSeq: 0, reason: 'history' };
  const gapHex = '1a027531' + '2003' + '3207686973746f7279' + '3801';
  assert.equal(toHex(encodeMessage('Gap', gap)), gapHex);
  assert.deepEqual(decodeMessage('Gap', fromHex(gapHex)), gap);
  assert.equal(decodeMessage('Gap', new Uint8Array()).user, false);
});

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/** The shared stand-in (fake-websocket.mjs) with this file's server-side helpers. */
class FakeWebSocket extends BaseWebSocket {
  static instances = [];
  // --- helpers for the server's side ---
  /** The ACKNOWLEDGE frames sent, each as its list of streams. */
  acks() {
    return this.sent.filter((f) => f.opcode === OP.ACKNOWLEDGE).map((f) => {
      assert.equal(f.requestId, null, 'ACKNOWLEDGE is fire-and-forget');
      return decodeMessage('Acknowledge', f.payload).streams;
    });
  }
  deliver(fields) {
    this.push(OP.DELIVERY, encodeMessage('Delivery', { data: `${fields.topic ?? fields.room}#${fields.seq}`, ...fields }));
  }
}

const latest = () => FakeWebSocket.instances.at(-1);
const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));

function client(options = {}, url = 'ws://test/ws?user=alice') {
  FakeWebSocket.instances = [];
  return new WsprotoClient(url, {
    WebSocket: FakeWebSocket,
    heartbeatMs: 0,
    minDelayMs: 1,
    maxDelayMs: 2,
    requestTimeoutMs: 500,
    ...options,
  });
}

const topicAck = (topic, epoch, seq) => ({ topic, room: '', position: { epoch, seq }, user: false });
const roomAck = (room, epoch, seq) => ({ topic: '', room, position: { epoch, seq }, user: false });
const userAck = (epoch, seq) => ({ topic: '', room: '', position: { epoch, seq }, user: true });
const byStream = (streams) => [...streams].sort((a, b) => (a.topic + a.room < b.topic + b.room ? -1 : 1));

test('the device goes into the URL as device=, after any query', () => {
  const cases = [
    ['ws://test/ws?user=alice', 'phone-1', 'ws://test/ws?user=alice&device=phone-1'],
    ['ws://test/ws', 'a:b.c_D-9', 'ws://test/ws?device=a%3Ab.c_D-9'],
    ['ws://test/ws?', 'x', 'ws://test/ws?device=x'],
    ['ws://test/ws?user=a&', 'x', 'ws://test/ws?user=a&device=x'],
    ['/ws?user=a#top', 'x', '/ws?user=a&device=x#top'],
  ];
  for (const [url, device, expected] of cases) {
    const c = client({ device }, url);
    assert.equal(c.url, expected);
    assert.equal(latest().url, expected);
    assert.equal(c.device, device);
    c.close();
  }
  const plain = client();
  assert.equal(latest().url, 'ws://test/ws?user=alice');
  assert.equal(plain.device, null);
  plain.close();
});

test('an invalid device id throws at construction', () => {
  for (const device of ['', 'a b', 'a/b', 'é', 'a&b', 'x'.repeat(65), 42, {}]) {
    FakeWebSocket.instances = [];
    assert.throws(() => client({ device }), (err) => err instanceof TypeError && /invalid device id/.test(err.message), String(device));
    assert.equal(FakeWebSocket.instances.length, 0, 'no socket for an invalid device');
  }
  const c = client({ device: 'x'.repeat(64) });
  c.close();
});

test('processed deliveries are acknowledged in one frame after about 100 ms', async () => {
  const c = client({ device: 'phone' });
  const ws = latest();
  ws.open();
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e1' });
  ws.deliver({ topic: 'a', seq: 2, epoch: 'e1', replayed: true });
  ws.deliver({ kind: DELIVERY_KIND.ROOM, room: 'lobby', seq: 5, epoch: 'r1' });
  ws.deliver({ topic: 'alarm.#', seq: 7, epoch: 'e1' }); // published to a pattern: its own stream
  // Not acknowledged: no position.
  ws.deliver({ kind: DELIVERY_KIND.DIRECT, seq: 0, data: 'direct' });
  ws.deliver({ kind: DELIVERY_KIND.BROADCAST, seq: 0, data: 'broadcast' });
  ws.deliver({ topic: 'b', seq: 0, epoch: 'e1' });
  ws.deliver({ topic: 'c', seq: 3 }); // a server without epochs
  assert.deepEqual(ws.acks(), [], 'batched, not sent at once');
  await tick(150);
  const [first, ...rest] = ws.acks();
  assert.equal(rest.length, 0, 'one frame');
  assert.deepEqual(byStream(first), [topicAck('a', 'e1', 2), topicAck('alarm.#', 'e1', 7), roomAck('lobby', 'r1', 5)]);

  // Later ones: only what changed since.
  ws.deliver({ topic: 'a', seq: 3, epoch: 'e1' });
  await tick(150);
  assert.deepEqual(ws.acks().slice(1), [[topicAck('a', 'e1', 3)]]);
  await tick(150);
  assert.equal(ws.acks().length, 2, 'nothing more without deliveries');
  c.close();
});

test('at most one frame per interval, whatever the rate of deliveries', async () => {
  const c = client({ device: 'phone', ackIntervalMs: 40 });
  const ws = latest();
  ws.open();
  for (let seq = 1; seq <= 10; seq++) {
    ws.deliver({ topic: 'a', seq, epoch: 'e1' });
    await tick(8);
  }
  await tick(60);
  const frames = ws.sent.filter((f) => f.opcode === OP.ACKNOWLEDGE);
  assert.ok(frames.length >= 2, `${frames.length} frames`);
  assert.ok(frames.length < 10, 'batched');
  for (let i = 1; i < frames.length; i++) {
    // Node may run a timer up to a millisecond early.
    assert.ok(frames[i].at - frames[i - 1].at >= 38, `${frames[i].at - frames[i - 1].at} ms apart`);
  }
  assert.deepEqual(ws.acks().at(-1), [topicAck('a', 'e1', 10)]);
  c.close();
});

test('a delivery counts as processed only once its listeners have returned', () => {
  const c = client({ device: 'phone' });
  const ws = latest();
  ws.open();
  c.addEventListener('delivery', (e) => {
    if (e.detail.seq === 2) c.flushAcknowledgements(); // sends what was processed before
  });
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e1' });
  ws.deliver({ topic: 'a', seq: 2, epoch: 'e1' });
  assert.deepEqual(ws.acks(), [[topicAck('a', 'e1', 1)]]);
  assert.equal(c.flushAcknowledgements(), true);
  assert.deepEqual(ws.acks().at(-1), [topicAck('a', 'e1', 2)]);
  assert.equal(c.flushAcknowledgements(), false, 'nothing pending');
  c.close();
});

test('duplicates are not acknowledged again; an epoch change replaces the position', () => {
  const c = client({ device: 'phone' });
  const ws = latest();
  ws.open();
  ws.deliver({ topic: 'a', seq: 5, epoch: 'e1' });
  ws.deliver({ topic: 'a', seq: 5, epoch: 'e1' }); // duplicate: not dispatched
  c.flushAcknowledgements();
  ws.deliver({ topic: 'a', seq: 4, epoch: 'e1' }); // duplicate
  assert.equal(c.flushAcknowledgements(), false);
  ws.deliver({ topic: 'a', seq: 6, epoch: 'e1' });
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e2' }); // the stream restarted
  c.flushAcknowledgements();
  assert.deepEqual(ws.acks(), [[topicAck('a', 'e1', 5)], [topicAck('a', 'e2', 1)]]);
  c.close();
});

test('manualAck: only what the app acknowledges, highest per stream', async () => {
  const c = client({ device: 'phone', manualAck: true, ackIntervalMs: 20 });
  const ws = latest();
  ws.open();
  const got = [];
  c.addEventListener('delivery', (e) => got.push(e.detail));
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e1' });
  ws.deliver({ topic: 'a', seq: 2, epoch: 'e1' });
  ws.deliver({ kind: DELIVERY_KIND.ROOM, room: 'lobby', seq: 9, epoch: 'r1' });
  ws.deliver({ kind: DELIVERY_KIND.DIRECT, seq: 0, data: 'direct' });
  await tick(50);
  assert.deepEqual(ws.acks(), [], 'nothing processed yet');

  assert.equal(c.acknowledge(got[1]), true);
  assert.equal(c.acknowledge(got[0]), true, 'lower: already covered');
  assert.equal(c.acknowledge(got[3]), false, 'no position');
  assert.throws(() => c.acknowledge(null), TypeError);
  await tick(50);
  assert.deepEqual(ws.acks(), [[topicAck('a', 'e1', 2)]]);

  c.acknowledge(got[2]);
  assert.equal(c.flushAcknowledgements(), true, 'sent now, without waiting');
  assert.deepEqual(ws.acks().at(-1), [roomAck('lobby', 'r1', 9)]);
  c.close();
});

test('without a device nothing is acknowledged', async () => {
  const c = client({ ackIntervalMs: 10 });
  const ws = latest();
  ws.open();
  const got = [];
  c.addEventListener('delivery', (e) => got.push(e.detail));
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e1' });
  ws.deliver({ kind: DELIVERY_KIND.ROOM, room: 'lobby', seq: 1, epoch: 'r1' });
  await tick(50);
  assert.equal(c.acknowledge(got[0]), false);
  assert.equal(c.flushAcknowledgements(), false);
  c.close();
  assert.deepEqual(ws.sent.filter((f) => f.opcode === OP.ACKNOWLEDGE), []);
});

test('close() sends the pending acknowledgements first, including a delivery whose listener closes', () => {
  const c = client({ device: 'phone', ackIntervalMs: 10_000 });
  const ws = latest();
  ws.open();
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e1' });
  c.addEventListener('delivery', (e) => {
    if (e.detail.text === 'bye') c.close();
  });
  ws.deliver({ kind: DELIVERY_KIND.ROOM, room: 'lobby', seq: 3, epoch: 'r1', data: 'bye' });
  assert.deepEqual(byStream(ws.acks()[0]), [topicAck('a', 'e1', 1), roomAck('lobby', 'r1', 3)]);
  assert.equal(ws.sent.at(-1).opcode, OP.ACKNOWLEDGE, 'the last frame before the close');
  assert.deepEqual(ws.closedWith, { code: 1000, reason: '' });
  // Nothing after the close.
  ws.deliver({ topic: 'a', seq: 2, epoch: 'e1' });
  c.close();
  assert.equal(ws.acks().length, 1);
});

test('pending acknowledgements survive a reconnect and go out on the new connection', async () => {
  const c = client({ device: 'phone', ackIntervalMs: 20 });
  let ws = latest();
  ws.open();
  c.subscribe('a').catch(() => {});
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e1' });
  ws.serverClose(1006); // before the timer fired
  await tick(40); // the timer fires while disconnected: kept
  ws = latest();
  assert.equal(FakeWebSocket.instances.length, 2);
  assert.equal(ws.url, 'ws://test/ws?user=alice&device=phone', 'the device again');
  ws.open();
  const opcodes = ws.sent.map((f) => f.opcode);
  assert.deepEqual(opcodes, [OP.SUBSCRIBE, OP.ACKNOWLEDGE], 'after the replay');
  assert.deepEqual(ws.acks(), [[topicAck('a', 'e1', 1)]]);
  await tick(40);
  assert.equal(ws.acks().length, 1, 'sent once');
  c.close();
});

test('frames stay within the server\'s maximum message size', () => {
  const c = client({ device: 'phone' });
  const ws = latest();
  ws.open();
  ws.push(OP.WELCOME, encodeMessage('Welcome', { sessionId: 's', maxMessageSize: 100 }));
  for (let i = 0; i < 20; i++) ws.deliver({ topic: `topic.number.${i}`, seq: i + 1, epoch: 'e1' });
  c.flushAcknowledgements();
  const frames = ws.sent.filter((f) => f.opcode === OP.ACKNOWLEDGE);
  assert.ok(frames.length > 1);
  for (const f of frames) assert.ok(f.payload.length + 4 <= 100, `${f.payload.length + 4} bytes`);
  const streams = ws.acks().flat();
  assert.equal(streams.length, 20);
  assert.deepEqual(streams.map((s) => s.position.seq).sort((a, b) => a - b), Array.from({ length: 20 }, (_, i) => i + 1));
  c.close();
});

// ---------------------------------------------------------------------------
// The user's stream of critical pushes, redeliveries and 4003
// ---------------------------------------------------------------------------

const push = (seq, extra = {}) => ({ kind: DELIVERY_KIND.DIRECT, seq, epoch: 'u1', data: `push#${seq}`, ...extra });

test('a critical push in the user\'s stream is acknowledged with user: true, no topic or room', () => {
  const c = client({ device: 'phone' });
  const ws = latest();
  ws.open();
  ws.deliver(push(1));
  ws.deliver(push(2));
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e1' });
  ws.deliver({ kind: DELIVERY_KIND.DIRECT, seq: 0, data: 'plain direct' }); // no position: not acknowledged
  assert.equal(c.flushAcknowledgements(), true);
  const frames = ws.sent.filter((f) => f.opcode === OP.ACKNOWLEDGE);
  assert.equal(frames.length, 1);
  const { streams } = decodeMessage('Acknowledge', frames[0].payload);
  assert.deepEqual(byStream(streams), [userAck('u1', 2), topicAck('a', 'e1', 1)]);
  // On the wire: position (field 3) and user (field 4) only.
  const user = streams.find((s) => s.user);
  assert.equal(toHex(encodeMessage('StreamAck', user)), '1a060a0275311002' + '2001');
  c.close();
});

test('a redelivered copy of a processed push is dropped but acknowledged again', async () => {
  const c = client({ device: 'phone' });
  let ws = latest();
  ws.open();
  const got = [];
  c.addEventListener('delivery', (e) => got.push(e.detail.text));
  ws.deliver(push(1));
  ws.deliver(push(2));
  c.flushAcknowledgements(); // sent on a socket that then drops: lost
  ws.serverClose(1006);
  await tick(10);
  ws = latest();
  ws.open();
  ws.deliver(push(2, { replayed: true })); // recovered from the acknowledged (1)
  assert.equal(c.flushAcknowledgements(), false, 'a replayed duplicate is not acknowledged again');
  ws.deliver(push(2, { redelivered: true })); // the server still waits for it
  ws.deliver(push(1, { redelivered: true }));
  assert.deepEqual(got, ['push#1', 'push#2'], 'dispatched once');
  assert.equal(c.flushAcknowledgements(), true);
  assert.deepEqual(ws.acks(), [[userAck('u1', 2)]]);
  c.close();
});

test('manualAck: a redelivered copy is acknowledged again only once the app acknowledged it', () => {
  const c = client({ device: 'phone', manualAck: true });
  const ws = latest();
  ws.open();
  const got = [];
  c.addEventListener('delivery', (e) => got.push(e.detail));
  ws.deliver(push(1));
  ws.deliver(push(1, { redelivered: true })); // the app is still at it
  assert.equal(c.flushAcknowledgements(), false, 'not processed yet');
  assert.equal(c.acknowledge(got[0]), true);
  assert.equal(c.flushAcknowledgements(), true);
  ws.deliver(push(1, { redelivered: true })); // crossed the acknowledgement
  assert.equal(c.flushAcknowledgements(), true);
  assert.equal(got.length, 1);
  assert.deepEqual(ws.acks(), [[userAck('u1', 1)], [userAck('u1', 1)]]);
  c.close();
});

test('close code 4003 (too many unacknowledged deliveries) reconnects with the device', async () => {
  const c = client({ device: 'phone' });
  const ws = latest();
  ws.open();
  const events = [];
  c.addEventListener('close', (e) => events.push(['close', e.detail.code]));
  c.addEventListener('reconnecting', (e) => events.push(['reconnecting', e.detail.attempt]));
  ws.deliver(push(1));
  ws.serverClose(4003, 'too many unacknowledged deliveries');
  assert.deepEqual(events, [['close', 4003], ['reconnecting', 1]]);
  await tick(10);
  assert.equal(FakeWebSocket.instances.length, 2);
  const next = latest();
  assert.equal(next.url, 'ws://test/ws?user=alice&device=phone');
  next.open();
  assert.deepEqual(next.acks(), [[userAck('u1', 1)]], 'what was processed goes out on the new connection');
  c.close();
});
