// Checks web/wsproto.js against proto/golden/frames.json (the vectors every
// implementation must match) and hand-computed protobuf vectors for the
// pub/sub messages. Run: node --test web/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import {
  decodeFrame,
  decodeMessage,
  encodeFrame,
  encodeMessage,
  FrameError,
  ERROR_CODE,
  DELIVERY_KIND,
  PRESENCE_ACTION,
} from '../wsproto.js';

const golden = JSON.parse(
  readFileSync(new URL('../../proto/golden/frames.json', import.meta.url), 'utf8'),
);

const fromHex = (hex) => Uint8Array.from(hex.match(/../g) ?? [], (b) => parseInt(b, 16));
const toHex = (bytes) => Buffer.from(bytes).toString('hex');
const camel = (name) => name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
const camelKeys = (obj) => Object.fromEntries(Object.entries(obj).map(([k, v]) => [camel(k), v]));
// Enum values by their proto JSON names (wsproto.js decodes enums to numbers).
const ENUM_NAMES = {
  ...Object.fromEntries(Object.entries(DELIVERY_KIND).map(([k, v]) => [`KIND_${k}`, v])),
  ...Object.fromEntries(Object.entries(PRESENCE_ACTION).map(([k, v]) => [`ACTION_${k}`, v])),
};
// The vectors use protobuf's JSON mapping: 64-bit integers are strings,
// enums are names and bytes are base64; wsproto.js decodes them to
// numbers, numbers and Uint8Arrays. Converts the expected values (nested
// ones and keys too) to the decoded forms.
const asDecoded = (expected, decoded) => {
  if (typeof expected === 'string' && typeof decoded === 'number' && /^\d+$/.test(expected)) {
    return Number(expected);
  }
  if (typeof expected === 'string' && typeof decoded === 'number' && expected in ENUM_NAMES) {
    return ENUM_NAMES[expected];
  }
  if (typeof expected === 'string' && decoded instanceof Uint8Array) {
    return new Uint8Array(Buffer.from(expected, 'base64'));
  }
  if (Array.isArray(expected)) {
    return expected.map((v, i) => asDecoded(v, decoded?.[i]));
  }
  if (expected && typeof expected === 'object') {
    return Object.fromEntries(
      Object.entries(expected).map(([k, v]) => {
        const key = decoded && typeof decoded === 'object' && camel(k) in decoded ? camel(k) : k;
        return [key, asDecoded(v, decoded?.[key])];
      }),
    );
  }
  return expected;
};

test('golden file has valid and invalid entries', () => {
  assert.equal(golden.version, 1);
  assert.ok(golden.frames.some((f) => f.error));
  assert.ok(golden.frames.some((f) => !f.error));
});

for (const entry of golden.frames.filter((f) => !f.error)) {
  test(`golden valid: ${entry.name}`, () => {
    const bytes = fromHex(entry.hex);
    const frame = decodeFrame(bytes);
    assert.equal(frame.opcode, entry.opcode);
    assert.equal(frame.requestId, entry.request_id);
    assert.equal(toHex(frame.payload), entry.payload_hex);
    if (entry.payload_text !== undefined) {
      assert.equal(new TextDecoder().decode(frame.payload), entry.payload_text);
    }
    // Re-encoding gives exactly the same bytes (encoding is canonical).
    assert.equal(toHex(encodeFrame(entry.opcode, fromHex(entry.payload_hex), entry.request_id)), entry.hex);
    // An ArrayBuffer decodes the same as a Uint8Array (browsers hand out ArrayBuffers).
    assert.deepEqual(decodeFrame(bytes.slice().buffer).payload, frame.payload);

    if (entry.message) {
      const type = entry.message.type.replace(/^wsproto\.v1\./, '');
      const decoded = decodeMessage(type, frame.payload);
      // Fields added to a message after its vector was written are absent
      // from the JSON: they must decode to their defaults.
      const defaults = decodeMessage(type, new Uint8Array());
      assert.deepEqual(decoded, { ...defaults, ...asDecoded(camelKeys(entry.message.json), decoded) });
      assert.equal(toHex(encodeMessage(type, decoded)), entry.payload_hex);
    }
  });
}

for (const entry of golden.frames.filter((f) => f.error)) {
  test(`golden invalid: ${entry.name}`, () => {
    assert.throws(
      () => decodeFrame(fromHex(entry.hex)),
      (err) => {
        assert.ok(err instanceof FrameError);
        assert.equal(err.code, entry.error);
        assert.equal(err.errorCode, ERROR_CODE[entry.error]);
        assert.equal(err.opcode, entry.error_opcode);
        assert.equal(err.requestId, entry.request_id);
        return true;
      },
    );
  });
}

test('decodeFrame accepts a view into a larger buffer', () => {
  const big = fromHex('ff8000000700000009abcdff');
  const frame = decodeFrame(big.subarray(1, 11));
  assert.equal(frame.opcode, 7);
  assert.equal(frame.requestId, 9);
  assert.equal(toHex(frame.payload), 'abcd');
});

test('encodeFrame rejects out-of-range opcodes and ids', () => {
  assert.throws(() => encodeFrame(0x1000000, new Uint8Array()), RangeError);
  assert.throws(() => encodeFrame(-1, new Uint8Array()), RangeError);
  assert.throws(() => encodeFrame(1.5, new Uint8Array()), RangeError);
  assert.throws(() => encodeFrame(3, new Uint8Array(), 2 ** 32), RangeError);
  assert.throws(() => encodeFrame(3, new Uint8Array(), -1), RangeError);
  assert.equal(toHex(encodeFrame(3, undefined, 0)), '8000000300000000');
  assert.equal(toHex(encodeFrame(3)), '00000003');
});

// Hand-computed protobuf vectors (key byte = field << 3 | wire type).
const vectors = [
  ['Subscribe', { topics: ['a', 'b.#'] }, '0a01610a03622e23'],
  ['Subscribe', { topics: [] }, ''],
  ['Unsubscribe', { topics: ['demo.value'] }, '0a0a64656d6f2e76616c7565'],
  ['Publish', { topic: 'x', data: 'hi', opcode: 300 }, '0a017812026869' + '18ac02'],
  ['Published', { topic: 't', room: '', seq: 2 ** 40, sessions: 3 }, '0a0174' + '18808080808020' + '2003'],
  ['Join', { room: 'lobby', presenceEvents: true }, '0a056c6f626279' + '1001'],
  ['Leave', { room: 'lobby' }, '0a056c6f626279'],
  ['Say', { room: 'r', data: 'hi', includeSelf: true }, '0a0172' + '12026869' + '1801'],
  ['Say', { room: 'r', data: new Uint8Array(), includeSelf: false }, '0a0172'],
  ['Send', { userId: 'u', sessionId: '', data: new Uint8Array([0, 255]) }, '0a0175' + '1a0200ff'],
  ['PresenceRequest', { topic: 'demo.value' }, '120a64656d6f2e76616c7565'],
  [
    'Presence',
    { room: 'lobby', topic: '', count: 2, members: [{ sessionId: 's1', userId: 'alice' }, { sessionId: 's2', userId: '' }] },
    '0a056c6f626279' + '1802' + '220b' + '0a027331' + '1205616c696365' + '2204' + '0a027332',
  ],
  [
    'PresenceEvent',
    { room: 'lobby', action: 1, member: { sessionId: 's', userId: 'bob' }, count: 1 },
    '0a056c6f626279' + '1001' + '1a08' + '0a0173' + '1203626f62' + '2001',
  ],
  [
    'Delivery',
    {
      kind: 1,
      topic: '',
      room: 'lobby',
      sender: { sessionId: 's', userId: 'a' },
      seq: 1,
      data: new TextEncoder().encode('42.5'),
      opcode: 0,
      publishedAtMs: 1700000000000,
    },
    '0801' + '1a056c6f626279' + '2206' + '0a0173' + '120161' + '2801' + '320434322e35' + '4080d095ffbc31',
  ],
];

for (const [type, obj, hex] of vectors) {
  test(`protobuf ${type} ${hex || '(empty)'}`, () => {
    assert.equal(toHex(encodeMessage(type, obj)), hex);
    const decoded = decodeMessage(type, fromHex(hex));
    for (const [key, value] of Object.entries(obj)) {
      const got = decoded[key];
      if (typeof value === 'string' && got instanceof Uint8Array) {
        assert.equal(new TextDecoder().decode(got), value, key);
      } else if (value instanceof Uint8Array) {
        assert.equal(toHex(got), toHex(value), key);
      } else {
        assert.deepEqual(got, value, key);
      }
    }
  });
}

test('protobuf decode fills defaults and skips unknown fields', () => {
  const empty = decodeMessage('Delivery', new Uint8Array());
  assert.equal(empty.kind, 0);
  assert.equal(empty.topic, '');
  assert.equal(empty.sender, null);
  assert.equal(empty.data.length, 0);
  assert.equal(empty.publishedAtMs, 0);
  // field 99 varint, field 98 fixed64, field 97 bytes, field 96 fixed32, then topic.
  const unknown = '98068001' + '9106010203040506070a' + '8a0602abcd' + '850601020304' + '1201' + '74';
  assert.equal(decodeMessage('Delivery', fromHex(unknown)).topic, 't');
});

test('protobuf decode rejects truncated input', () => {
  assert.throws(() => decodeMessage('Subscribe', fromHex('0a05616263')), RangeError);
  assert.throws(() => decodeMessage('Published', fromHex('18ff')), RangeError);
  assert.throws(() => decodeMessage('Subscribe', fromHex('0b')), RangeError); // group
});

test('varints stay exact up to 2^53 - 1', () => {
  for (const n of [0, 1, 127, 128, 300, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1]) {
    const bytes = encodeMessage('Published', { seq: n });
    assert.equal(decodeMessage('Published', bytes).seq, n);
  }
  assert.throws(() => encodeMessage('Published', { seq: 2 ** 53 }), RangeError);
  assert.throws(() => encodeMessage('Published', { seq: -1 }), RangeError);
});
