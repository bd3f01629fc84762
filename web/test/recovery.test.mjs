// Stream positions, recovery and duplicates: the schema of the recovery
// messages, the topic "covers" rule, and WsprotoClient against a fake
// WebSocket (the test plays the server). Run: node --test web/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  decodeMessage,
  DELIVERY_KIND,
  encodeMessage,
  OP,
  topicCovers,
  WsprotoClient,
} from '../wsproto.js';
import { FakeWebSocket as BaseWebSocket } from './fake-websocket.mjs';

const fromHex = (hex) => Uint8Array.from(hex.match(/../g) ?? [], (b) => parseInt(b, 16));
const toHex = (bytes) => Buffer.from(bytes).toString('hex');

// ---------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------

// Hand-computed (key byte = field << 3 | wire type); a map entry is an
// embedded message {1: key, 2: value}.
const vectors = [
  ['Position', { epoch: 'e1', seq: 3 }, '0a0265311003'],
  [
    'Subscribe',
    { topics: ['alarm.#'], since: { 'alarm.fire': { epoch: 'e1', seq: 3 } }, positions: true },
    '0a07616c61726d2e23' + '1214' + '0a0a616c61726d2e66697265' + '1206' + '0a0265311003' + '1801',
  ],
  ['Subscribe', { topics: ['a'], since: {}, positions: false }, '0a0161'],
  [
    'StreamState',
    { topic: 't', room: '', position: { epoch: 'e1', seq: 9 }, recovered: true, replayed: 2 },
    '0a0174' + '1a060a0265311009' + '2001' + '2802',
  ],
  [
    'Subscribed',
    { streams: [{ topic: 't', room: '', position: { epoch: 'e1', seq: 9 }, recovered: true, replayed: 2 }] },
    '0a0f' + '0a0174' + '1a060a0265311009' + '2001' + '2802',
  ],
  [
    'Gap',
    { topic: '', room: 'lobby', epoch: 'e1', fromSeq: 4, toSeq: 5, reason: 'history' },
    '12056c6f626279' + '1a026531' + '2004' + '2805' + '3207686973746f7279',
  ],
  [
    'Delivery',
    { kind: 0, topic: 'a', seq: 3, epoch: 'e1', replayed: true },
    '120161' + '2803' + '4a026531' + '5001',
  ],
  [
    'Join',
    { room: 'lobby', presenceEvents: false, since: { epoch: 'e1', seq: 3 } },
    '0a056c6f626279' + '1a060a0265311003',
  ],
  [
    'Presence',
    {
      room: 'lobby',
      topic: '',
      count: 1,
      members: [],
      stream: { topic: '', room: 'lobby', position: { epoch: 'e1', seq: 0 }, recovered: true, replayed: 0 },
    },
    '0a056c6f626279' + '1801' + '2a0f' + '12056c6f626279' + '1a040a026531' + '2001',
  ],
  [
    'Published',
    { topic: 't', room: '', seq: 2, sessions: 1, nodes: 1, epoch: 'e1' },
    '0a0174' + '1802' + '2001' + '2801' + '32026531',
  ],
];

for (const [type, obj, hex] of vectors) {
  test(`protobuf ${type} ${hex}`, () => {
    assert.equal(toHex(encodeMessage(type, obj)), hex);
    const decoded = decodeMessage(type, fromHex(hex));
    for (const [key, value] of Object.entries(obj)) assert.deepEqual(decoded[key], value, key);
    // And back: decoding then encoding is the identity.
    assert.equal(toHex(encodeMessage(type, decoded)), hex);
  });
}

test('map fields: Map or object in, object out, sorted, defaults omitted', () => {
  const since = new Map([
    ['b', { epoch: 'e2', seq: 1 }],
    ['a', { epoch: 'e1', seq: 7 }],
    ['c', { epoch: '', seq: 0 }], // a default value: the entry has the key only
  ]);
  const bytes = encodeMessage('Subscribe', { topics: ['#'], since });
  assert.equal(
    toHex(bytes),
    '0a0123' + '120b0a0161' + '1206' + '0a0265311007' + '120b0a0162' + '1206' + '0a0265321001' + '12030a0163',
  );
  // A plain object with the same entries in another order encodes the same.
  const object = { c: { epoch: '', seq: 0 }, a: { epoch: 'e1', seq: 7 }, b: { epoch: 'e2', seq: 1 } };
  assert.equal(toHex(encodeMessage('Subscribe', { topics: ['#'], since: object })), toHex(bytes));
  const decoded = decodeMessage('Subscribe', bytes);
  assert.deepEqual(decoded.since, { a: { epoch: 'e1', seq: 7 }, b: { epoch: 'e2', seq: 1 }, c: { epoch: '', seq: 0 } });
  assert.equal(decoded.positions, false);
  assert.deepEqual(decodeMessage('Subscribe', new Uint8Array()).since, {});
});

test('map fields: the last entry of a key wins; odd keys stay own properties', () => {
  // {a: (e1, 1)}, {a: (e1, 2)}, an entry with an unknown field 3, no key, no value.
  const hex = '120b0a0161' + '12060a0265311001' + '120b0a0161' + '12060a0265311002' + '12021801';
  const { since } = decodeMessage('Subscribe', fromHex(hex));
  assert.deepEqual(since, { a: { epoch: 'e1', seq: 2 }, '': { epoch: '', seq: 0 } });

  const odd = decodeMessage('Subscribe', encodeMessage('Subscribe', { since: new Map([['__proto__', { epoch: 'e', seq: 1 }]]) }));
  assert.ok(Object.hasOwn(odd.since, '__proto__'));
  assert.deepEqual(odd.since.__proto__, { epoch: 'e', seq: 1 });
  assert.equal(Object.getPrototypeOf(odd.since), Object.prototype);
});

test('OP.GAP is 20', () => {
  assert.equal(OP.GAP, 20);
});

// ---------------------------------------------------------------------------
// Topic coverage
// ---------------------------------------------------------------------------

test('topicCovers follows PROTOCOL.md §8 (and src/topic.rs)', () => {
  const cases = [
    ['#', 'anything.at.#', true],
    ['#', 'a', true],
    ['rowdata.#', 'rowdata.*.42', true],
    ['rowdata.#', 'rowdata', true],
    ['rowdata.#', 'rowdata.temp.42', true],
    ['rowdata.#', 'rowdatax', false],
    ['rowdata.*', 'rowdata.temp', true],
    ['rowdata.*', 'rowdata.*', true],
    ['rowdata.*', 'rowdata.#', false],
    ['rowdata.*', 'rowdata', false],
    ['rowdata.temp', 'rowdata.*', false],
    ['chat.*', 'chat.a.b', false],
    ['*.42', 'rowdata.42', true],
    ['alarm.#', 'alarm', true],
    ['alarm.#', 'alarm.fire.b3', true],
    ['alarm.fire', 'alarm.fire', true],
    ['alarm.fire', 'alarm.fire.b3', false],
    ['alarm.fire.b3', 'alarm.fire', false],
    ['a', 'a', true],
  ];
  for (const [pattern, topic, expected] of cases) {
    assert.equal(topicCovers(pattern, topic), expected, `${pattern} covers ${topic}`);
  }
});

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/** The shared stand-in (fake-websocket.mjs) with this file's server-side helpers. */
class FakeWebSocket extends BaseWebSocket {
  static instances = [];
  // --- helpers for the server's side ---
  /** The sent frames of `opcode`, decoded as `type`, with their request ids. */
  sentOf(opcode, type) {
    return this.sent.filter((f) => f.opcode === opcode).map((f) => ({ ...decodeMessage(type, f.payload), id: f.requestId }));
  }
  deliver(fields) {
    this.push(OP.DELIVERY, encodeMessage('Delivery', { data: `${fields.topic ?? fields.room}#${fields.seq}`, ...fields }));
  }
  subscribed(id, streams) {
    this.push(OP.SUBSCRIBE, encodeMessage('Subscribed', { streams }), id);
  }
}

const latest = () => FakeWebSocket.instances.at(-1);
const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));

function client(options = {}) {
  FakeWebSocket.instances = [];
  return new WsprotoClient('ws://test/ws?user=alice', {
    WebSocket: FakeWebSocket,
    heartbeatMs: 0,
    minDelayMs: 1,
    maxDelayMs: 2,
    requestTimeoutMs: 500,
    ...options,
  });
}

/** Collects the details of events of `types` in arrival order. */
function record(target, ...types) {
  const events = [];
  for (const type of types) target.addEventListener(type, (e) => events.push({ type, ...e.detail }));
  return events;
}

const topicState = (topic, epoch, seq, extra = {}) => ({ topic, position: { epoch, seq }, recovered: true, ...extra });

/** Drops the socket and opens the next one (reconnect delays are 0-2 ms). */
async function reconnect() {
  latest().serverClose(1006);
  await tick(10);
  const ws = latest();
  ws.open();
  return ws;
}

test('duplicates (same epoch, seq not above the last) are dropped; other epochs are not', () => {
  const c = client();
  const ws = latest();
  ws.open();
  const got = record(c, 'delivery');
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e1' });
  ws.deliver({ topic: 'a', seq: 2, epoch: 'e1' });
  ws.deliver({ topic: 'a', seq: 2, epoch: 'e1' }); // duplicate
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e1' }); // duplicate
  ws.deliver({ topic: 'b', seq: 1, epoch: 'e1' }); // another stream
  ws.deliver({ kind: DELIVERY_KIND.ROOM, room: 'a', seq: 1, epoch: 'e1' }); // a room named like the topic
  ws.deliver({ topic: 'a', seq: 4, epoch: 'e1' }); // a hole is not a duplicate
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e2' }); // the stream restarted
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e2' }); // duplicate in the new epoch
  ws.deliver({ topic: 'a', seq: 3, epoch: 'e1' }); // another epoch again: never compared
  assert.deepEqual(got.map((d) => d.text), ['a#1', 'a#2', 'b#1', 'a#1', 'a#4', 'a#1', 'a#3']);
  assert.deepEqual(c.positions(), {
    't:a': { epoch: 'e1', seq: 3 },
    't:b': { epoch: 'e1', seq: 1 },
    'r:a': { epoch: 'e1', seq: 1 },
  });
  c.close();
});

test('deliveries without a position are never duplicates', () => {
  const c = client();
  const ws = latest();
  ws.open();
  const got = record(c, 'delivery');
  for (let i = 0; i < 2; i++) {
    ws.deliver({ kind: DELIVERY_KIND.DIRECT, seq: 0, data: 'direct' });
    ws.deliver({ kind: DELIVERY_KIND.BROADCAST, seq: 0, data: 'broadcast' });
    ws.deliver({ topic: 'a', seq: 0, epoch: 'e1', data: 'unnumbered' });
    ws.deliver({ topic: 'a', seq: 5, data: 'no epoch (a server without recovery)' });
  }
  assert.equal(got.length, 8);
  assert.deepEqual(c.positions(), {});
  c.close();
});

test('positions() is a copy', () => {
  const c = client();
  const ws = latest();
  ws.open();
  ws.deliver({ topic: 'a', seq: 1, epoch: 'e1' });
  const saved = c.positions();
  saved['t:a'].seq = 99;
  saved['t:x'] = { epoch: 'e1', seq: 1 };
  assert.deepEqual(c.positions(), { 't:a': { epoch: 'e1', seq: 1 } });
  c.close();
});

test('the first subscribe asks for positions; the reply gives quiet streams theirs', async () => {
  const c = client();
  const ws = latest();
  ws.open();
  const subscribed = c.subscribe(['news', 'alarm.#']);
  const [sub] = ws.sentOf(OP.SUBSCRIBE, 'Subscribe');
  assert.deepEqual(sub.topics, ['news', 'alarm.#']);
  assert.equal(sub.positions, true);
  assert.deepEqual(sub.since, {});
  const events = record(c, 'recovered');
  const streams = [topicState('news', 'e1', 0)];
  ws.subscribed(sub.id, streams);
  assert.deepEqual(await subscribed, decodeMessage('Subscribed', encodeMessage('Subscribed', { streams })).streams);
  assert.deepEqual(c.positions(), { 't:news': { epoch: 'e1', seq: 0 } });
  assert.equal(events.length, 0, 'nothing to recover on a first subscription');

  // So a reconnect recovers `news` from (e1, 0) though no message was seen.
  const ws2 = await reconnect();
  const [resub] = ws2.sentOf(OP.SUBSCRIBE, 'Subscribe');
  assert.deepEqual(resub.since, { news: { epoch: 'e1', seq: 0 } });
  c.close();
});

test('a server without recovery answers SUBSCRIBE with ACK; that still resolves', async () => {
  const c = client();
  const ws = latest();
  ws.open();
  const subscribed = c.subscribe('news');
  ws.push(OP.ACK, undefined, ws.sent[0].requestId);
  assert.deepEqual(await subscribed, []);
  const other = c.subscribe('x');
  ws.push(OP.PONG, undefined, ws.sent[1].requestId);
  await assert.rejects(other, { code: 'UNEXPECTED_REPLY' });
  c.close();
});

test('after a reconnect: since for covered streams, replay, duplicates dropped, gap and recovered', async () => {
  const c = client({
    positions: {
      't:other.x': { epoch: 'e1', seq: 4 }, // saved, but no subscribed topic covers it
    },
  });
  let ws = latest();
  ws.open();
  c.subscribe(['alarm.#', 'news']);
  ws.subscribed(ws.sent[0].requestId, [topicState('news', 'e1', 3)]);
  ws.deliver({ topic: 'alarm.fire', seq: 7, epoch: 'e1' });
  ws.deliver({ topic: 'alarm.#', seq: 2, epoch: 'e1' }); // published to a pattern: its own stream
  ws.deliver({ topic: 'news', seq: 4, epoch: 'e1' });

  ws = await reconnect();
  const [sub] = ws.sentOf(OP.SUBSCRIBE, 'Subscribe');
  assert.deepEqual(sub.topics, ['alarm.#', 'news']);
  assert.equal(sub.positions, true);
  assert.deepEqual(sub.since, {
    'alarm.fire': { epoch: 'e1', seq: 7 },
    'alarm.#': { epoch: 'e1', seq: 2 },
    news: { epoch: 'e1', seq: 4 },
  });

  const events = record(c, 'delivery', 'gap', 'recovered');
  // The server replays what was missed, with a live copy of news#6 racing it.
  ws.deliver({ topic: 'alarm.fire', seq: 8, epoch: 'e1', replayed: true });
  ws.push(OP.GAP, encodeMessage('Gap', { topic: 'news', epoch: 'e1', fromSeq: 5, toSeq: 5, reason: 'history' }));
  ws.deliver({ topic: 'news', seq: 6, epoch: 'e1', replayed: true });
  ws.deliver({ topic: 'news', seq: 6, epoch: 'e1' }); // duplicate
  ws.deliver({ topic: 'alarm.fire', seq: 8, epoch: 'e1' }); // duplicate
  ws.subscribed(sub.id, [
    topicState('alarm.fire', 'e1', 8, { replayed: 1 }),
    topicState('alarm.#', 'e1', 2),
    topicState('news', 'e1', 6, { recovered: false, replayed: 1 }),
  ]);
  ws.deliver({ topic: 'news', seq: 7, epoch: 'e1' });

  assert.deepEqual(
    events.map((e) => (e.type === 'delivery' ? `${e.text}${e.replayed ? ' (replayed)' : ''}` : e.type)),
    ['alarm.fire#8 (replayed)', 'gap', 'news#6 (replayed)', 'recovered', 'news#7'],
  );
  const gap = events.find((e) => e.type === 'gap');
  assert.deepEqual({ ...gap, type: undefined }, {
    type: undefined, topic: 'news', room: '', epoch: 'e1', fromSeq: 5, toSeq: 5, reason: 'history', user: false,
  });
  const recovered = events.find((e) => e.type === 'recovered');
  assert.deepEqual(recovered.topics, ['alarm.#', 'news']);
  assert.deepEqual(recovered.streams.map((s) => [s.topic, s.recovered]), [['alarm.fire', true], ['alarm.#', true], ['news', false]]);
  assert.deepEqual(recovered.unrecovered.map((s) => s.topic), ['news']);
  assert.deepEqual(c.positions(), {
    't:other.x': { epoch: 'e1', seq: 4 },
    't:alarm.fire': { epoch: 'e1', seq: 8 },
    't:alarm.#': { epoch: 'e1', seq: 2 },
    't:news': { epoch: 'e1', seq: 7 },
  });
  c.close();
});

test('the positions option: the first subscribe and join recover from saved positions', async () => {
  const c = client({
    positions: {
      't:a.b': { epoch: 'e1', seq: 3 },
      'r:lobby': { epoch: 'e9', seq: 12 },
      't:bad topic': { epoch: 'e1', seq: 1 }, // not a valid topic: ignored
      'r:room.*': { epoch: 'e1', seq: 1 }, // a room is a name: ignored
      't:c': { epoch: '', seq: 1 }, // no epoch: ignored
      't:d': { epoch: 'e1', seq: -1 }, // ignored
      'x:e': { epoch: 'e1', seq: 1 }, // ignored
    },
  });
  assert.deepEqual(c.positions(), { 't:a.b': { epoch: 'e1', seq: 3 }, 'r:lobby': { epoch: 'e9', seq: 12 } });
  const ws = latest();
  const recovered = record(c, 'recovered');
  const subscribed = c.subscribe('a.*');
  const joined = c.join('lobby');
  ws.open();
  await tick();
  const [sub] = ws.sentOf(OP.SUBSCRIBE, 'Subscribe');
  assert.deepEqual(sub.since, { 'a.b': { epoch: 'e1', seq: 3 } });
  const [join] = ws.sentOf(OP.JOIN, 'Join');
  assert.deepEqual(join.since, { epoch: 'e9', seq: 12 });

  ws.deliver({ topic: 'a.b', seq: 3, epoch: 'e1', replayed: true }); // already seen before the reload
  ws.deliver({ topic: 'a.b', seq: 4, epoch: 'e1', replayed: true });
  ws.subscribed(sub.id, [topicState('a.b', 'e1', 4, { replayed: 1 })]);
  const stream = { room: 'lobby', position: { epoch: 'e9', seq: 12 }, recovered: true };
  ws.push(OP.JOIN, encodeMessage('Presence', { room: 'lobby', count: 1, stream }), join.id);
  assert.equal((await subscribed).length, 1);
  assert.equal((await joined).stream.room, 'lobby');
  assert.deepEqual(recovered.map((r) => r.topics ?? r.room), [['a.*'], 'lobby']);
  assert.deepEqual(c.positions(), { 't:a.b': { epoch: 'e1', seq: 4 }, 'r:lobby': { epoch: 'e9', seq: 12 } });
  c.close();
});

test('rooms: the JOIN reply gives the position; a re-join recovers from it', async () => {
  const c = client();
  let ws = latest();
  ws.open();
  const events = record(c, 'joined', 'recovered', 'delivery');
  const joined = c.join('lobby', { presenceEvents: true });
  const [join] = ws.sentOf(OP.JOIN, 'Join');
  assert.equal(join.since, null);
  const state = { room: 'lobby', position: { epoch: 'r1', seq: 5 }, recovered: true };
  ws.push(OP.JOIN, encodeMessage('Presence', { room: 'lobby', count: 1, stream: state }), join.id);
  assert.equal((await joined).stream.position.seq, 5);
  assert.deepEqual(c.positions(), { 'r:lobby': { epoch: 'r1', seq: 5 } });
  ws.deliver({ kind: DELIVERY_KIND.ROOM, room: 'lobby', seq: 6, epoch: 'r1' });

  ws = await reconnect();
  const [rejoin] = ws.sentOf(OP.JOIN, 'Join');
  assert.deepEqual(rejoin, { room: 'lobby', presenceEvents: true, since: { epoch: 'r1', seq: 6 }, id: rejoin.id });
  // The room's stream restarted: a GAP, the new epoch's messages, then the reply.
  ws.push(OP.GAP, encodeMessage('Gap', { room: 'lobby', epoch: 'r1', fromSeq: 7, reason: 'epoch' }));
  ws.deliver({ kind: DELIVERY_KIND.ROOM, room: 'lobby', seq: 1, epoch: 'r2', replayed: true });
  const restarted = { room: 'lobby', position: { epoch: 'r2', seq: 1 }, recovered: false, replayed: 1 };
  ws.push(OP.JOIN, encodeMessage('Presence', { room: 'lobby', count: 1, stream: restarted }), rejoin.id);
  assert.deepEqual(events.map((e) => `${e.type} ${e.text ?? ''}`.trim()), [
    'joined',
    'delivery lobby#6',
    'delivery lobby#1',
    'joined',
    'recovered',
  ]);
  const recovered = events.at(-1);
  assert.equal(recovered.room, 'lobby');
  assert.deepEqual(recovered.unrecovered.map((s) => s.position), [{ epoch: 'r2', seq: 1 }]);
  assert.deepEqual(c.positions(), { 'r:lobby': { epoch: 'r2', seq: 1 } });
  c.close();
});

test('a reply ahead of what was seen moves the position but not the duplicate line', async () => {
  const c = client();
  const ws = latest();
  ws.open();
  const got = record(c, 'delivery');
  c.subscribe('news');
  // The stream stands at (e1, 5) while the live copies of 4 and 5 are still
  // on their way (a cluster node may answer before its broker delivers).
  ws.subscribed(ws.sent[0].requestId, [topicState('news', 'e1', 5)]);
  assert.deepEqual(c.positions(), { 't:news': { epoch: 'e1', seq: 5 } });
  ws.deliver({ topic: 'news', seq: 4, epoch: 'e1' });
  ws.deliver({ topic: 'news', seq: 5, epoch: 'e1' });
  ws.deliver({ topic: 'news', seq: 5, epoch: 'e1' }); // now a duplicate
  ws.deliver({ topic: 'news', seq: 6, epoch: 'e1' });
  assert.deepEqual(got.map((d) => d.text), ['news#4', 'news#5', 'news#6']);
  assert.deepEqual(c.positions(), { 't:news': { epoch: 'e1', seq: 6 } });

  // A reply of another epoch replaces the position; one behind does not.
  const again = c.subscribe('news');
  ws.subscribed(ws.sent[1].requestId, [topicState('news', 'e1', 2)]);
  await again;
  assert.deepEqual(c.positions(), { 't:news': { epoch: 'e1', seq: 6 } });
  c.subscribe('news');
  ws.subscribed(ws.sent[2].requestId, [topicState('news', 'e2', 0, { recovered: false })]);
  assert.deepEqual(c.positions(), { 't:news': { epoch: 'e2', seq: 0 } });
  ws.deliver({ topic: 'news', seq: 1, epoch: 'e2' });
  assert.equal(got.at(-1).text, 'news#1');
  c.close();
});

test('unsubscribe and leave forget the positions of streams no longer followed', async () => {
  const c = client();
  const ws = latest();
  ws.open();
  // Left unanswered: they reject when the client closes.
  const unanswered = (p) => p.catch(() => {});
  unanswered(c.subscribe(['a.#', 'a.b', 'c']));
  unanswered(c.join('lobby'));
  ws.deliver({ topic: 'a.b', seq: 1, epoch: 'e1' });
  ws.deliver({ topic: 'a.x', seq: 1, epoch: 'e1' });
  ws.deliver({ topic: 'c', seq: 1, epoch: 'e1' });
  ws.deliver({ kind: DELIVERY_KIND.ROOM, room: 'lobby', seq: 1, epoch: 'e1' });
  unanswered(c.unsubscribe('a.#')); // a.b is still followed through `a.b`
  assert.deepEqual(Object.keys(c.positions()).sort(), ['r:lobby', 't:a.b', 't:c']);
  unanswered(c.leave('lobby'));
  assert.deepEqual(Object.keys(c.positions()).sort(), ['t:a.b', 't:c']);
  c.close();
});

// ---------------------------------------------------------------------------
// The user's stream (critical pushes: direct deliveries with seq > 0)
// ---------------------------------------------------------------------------

const push = (seq, extra = {}) => ({ kind: DELIVERY_KIND.DIRECT, seq, epoch: 'u1', data: `push#${seq}`, ...extra });

test('a numbered direct delivery is in the user\'s stream: dispatched once, redelivered and replayed copies dropped', () => {
  const c = client();
  const ws = latest();
  ws.open();
  const got = record(c, 'delivery');
  ws.deliver(push(1));
  ws.deliver(push(1, { redelivered: true })); // the same position again: a duplicate
  ws.deliver(push(1, { replayed: true })); // a duplicate
  ws.deliver(push(2, { redelivered: true })); // a position not seen: the flag alone drops nothing
  ws.deliver(push(2, { redelivered: true }));
  ws.deliver({ topic: 'u', seq: 1, epoch: 'u1' }); // a topic named `u` is another stream
  ws.deliver(push(1, { epoch: 'u2' })); // the user's stream restarted
  assert.deepEqual(got.map((d) => [d.kind, d.text, d.redelivered]), [
    [DELIVERY_KIND.DIRECT, 'push#1', false],
    [DELIVERY_KIND.DIRECT, 'push#2', true],
    [DELIVERY_KIND.TOPIC, 'u#1', false],
    [DELIVERY_KIND.DIRECT, 'push#1', false],
  ]);
  assert.deepEqual(c.positions(), { u: { epoch: 'u2', seq: 1 }, 't:u': { epoch: 'u1', seq: 1 } });
  c.close();
});

test('an unnumbered direct delivery (seq 0) is always dispatched and has no position', () => {
  const c = client();
  const ws = latest();
  ws.open();
  const got = record(c, 'delivery');
  ws.deliver(push(3));
  for (let i = 0; i < 2; i++) {
    ws.deliver({ kind: DELIVERY_KIND.DIRECT, seq: 0, data: 'hello' });
    ws.deliver({ kind: DELIVERY_KIND.DIRECT, seq: 0, epoch: 'u1', data: 'hello', redelivered: true });
  }
  assert.deepEqual(got.map((d) => d.text), ['push#3', 'hello', 'hello', 'hello', 'hello']);
  assert.deepEqual(c.positions(), { u: { epoch: 'u1', seq: 3 } }, 'untouched by unnumbered ones');
  c.close();
});

test('the user stream\'s position is saved and restored, and never sent as since', async () => {
  const c = client({
    positions: {
      u: { epoch: 'u1', seq: 3 },
      'u:x': { epoch: 'u1', seq: 1 }, // ignored
      user: { epoch: 'u1', seq: 1 }, // ignored
    },
  });
  assert.deepEqual(c.positions(), { u: { epoch: 'u1', seq: 3 } });
  const ws = latest();
  const got = record(c, 'delivery');
  const subscribed = c.subscribe('#'); // covers every topic, and no more
  ws.open();
  await tick();
  const [sub] = ws.sentOf(OP.SUBSCRIBE, 'Subscribe');
  assert.deepEqual(sub.since, {}, 'the server recovers the user stream itself');
  // What the server replays from the device's acknowledged position.
  ws.deliver(push(2, { replayed: true }));
  ws.deliver(push(3, { replayed: true }));
  ws.deliver(push(4, { replayed: true }));
  ws.subscribed(sub.id, []);
  await subscribed;
  assert.deepEqual(got.map((d) => d.text), ['push#4']);
  assert.deepEqual(c.positions(), { u: { epoch: 'u1', seq: 4 } });
  c.close();
});

test('a gap in the user stream reaches the app with user true', () => {
  const c = client();
  const ws = latest();
  ws.open();
  const events = record(c, 'gap', 'delivery');
  ws.deliver(push(1));
  ws.push(OP.GAP, encodeMessage('Gap', { user: true, epoch: 'u1', fromSeq: 2, toSeq: 4, reason: 'history' }));
  ws.deliver(push(5, { replayed: true }));
  assert.deepEqual(events.map((e) => e.type), ['delivery', 'gap', 'delivery']);
  const { type, ...gap } = events[1];
  assert.deepEqual(gap, { topic: '', room: '', user: true, epoch: 'u1', fromSeq: 2, toSeq: 4, reason: 'history' });
  // Not a topic named '' (or any topic): the user's position moves on with
  // the next push, and no other stream appears.
  assert.deepEqual(c.positions(), { u: { epoch: 'u1', seq: 5 } });
  c.close();
});
