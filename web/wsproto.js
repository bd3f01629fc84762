// wsproto.js — a dependency-free browser (and Node) client for the wsproto
// frame protocol. ES module; no build step.
//
// The protocol (proto/PROTOCOL.md): one binary WebSocket message is one frame.
//
//   +--------------------------------+----------------------+-----------------+
//   | opcode word, u32 big-endian    | request id, u32 BE   | payload         |
//   | bit 31: R (request id follows) | present iff R is set | 0..n bytes      |
//   | bits 30..24: reserved, zero    |                      |                 |
//   | bits 23..0: opcode             |                      |                 |
//   +--------------------------------+----------------------+-----------------+
//
// Payloads of the reserved opcodes are proto3 messages
// (proto/wsproto/v1/*.proto); this file carries a tiny hand-written protobuf
// codec for exactly those messages, so the page needs no protobuf library.
//
// Exports:
//   OP, ERROR_CODE, DELIVERY_KIND, PRESENCE_ACTION   numeric constants
//   encodeFrame / decodeFrame / FrameError           the frame codec
//   encodeMessage / decodeMessage / messages         the protobuf codec
//   WsprotoError                                     an ERROR frame as an Error
//   WsprotoClient                                    the reconnecting client, which
//                                                    also recovers missed messages
//                                                    and, with a `device`,
//                                                    acknowledges processed ones
//   topicCovers                                      the topic "covers" rule

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

/** Opcodes of the protocol (0–99) and the built-in application opcodes. */
export const OP = Object.freeze({
  ERROR: 1,
  WELCOME: 2,
  PING: 3,
  PONG: 4,
  ACK: 5,
  REFRESH_TOKEN: 6,
  SUBSCRIBE: 10,
  UNSUBSCRIBE: 11,
  PUBLISH: 12,
  DELIVERY: 13,
  JOIN: 14,
  LEAVE: 15,
  SAY: 16,
  SEND: 17,
  PRESENCE: 18,
  PRESENCE_EVENT: 19,
  GAP: 20,
  ACKNOWLEDGE: 21,
  ECHO: 100,
  ADD_FRIEND: 110,
  GET_INFO: 111,
});

/** `wsproto.v1.Error.code` values (PROTOCOL.md §5, docs/pubsub.md). */
export const ERROR_CODE = Object.freeze({
  FRAME_TOO_SHORT: 1,
  RESERVED_FLAGS: 2,
  TEXT_NOT_SUPPORTED: 3,
  UNKNOWN_OPCODE: 10,
  BAD_PAYLOAD: 11,
  INTERNAL: 12,
  LIMIT_EXCEEDED: 13,
  INVALID_TOPIC: 14,
  PERMISSION_DENIED: 15,
  NOT_IN_ROOM: 16,
  RATE_LIMITED: 17,
  INVALID_TOKEN: 18,
  UNAVAILABLE: 19,
});

/** `wsproto.v1.Delivery.Kind`. */
export const DELIVERY_KIND = Object.freeze({ TOPIC: 0, ROOM: 1, DIRECT: 2, BROADCAST: 3 });

/** `wsproto.v1.PresenceEvent.Action`. */
export const PRESENCE_ACTION = Object.freeze({ JOIN: 0, LEAVE: 1 });

const REQUEST_ID_FLAG = 0x8000_0000;
const RESERVED_FLAGS = 0x7f00_0000;
const MAX_OPCODE = 0x00ff_ffff;
const MAX_REQUEST_ID = 0xffff_ffff;

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder('utf-8'); // lenient: bad bytes become U+FFFD
const strictUtf8Decoder = new TextDecoder('utf-8', { fatal: true });

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

/**
 * A message that is not a valid frame. `code` is the name of the ERROR code a
 * server answers it with ('FRAME_TOO_SHORT' or 'RESERVED_FLAGS'), `errorCode`
 * its number, `opcode` the opcode that error reports and `requestId` the id
 * it echoes (null when none could be read).
 */
export class FrameError extends Error {
  constructor(code, message, opcode, requestId = null) {
    super(message);
    this.name = 'FrameError';
    this.code = code;
    this.errorCode = ERROR_CODE[code];
    this.opcode = opcode;
    this.requestId = requestId;
  }
}

/** Views `data` (ArrayBuffer, typed array or DataView) as a Uint8Array without copying. */
function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (data == null) return new Uint8Array(0);
  throw new TypeError('expected an ArrayBuffer or Uint8Array');
}

/**
 * Encodes one frame.
 * @param {number} opcode 0..0xFFFFFF
 * @param {Uint8Array|ArrayBuffer} [payload] may be empty
 * @param {number|null} [requestId] 0..0xFFFFFFFF, or null/undefined for none
 * @returns {Uint8Array}
 */
export function encodeFrame(opcode, payload, requestId = null) {
  if (!Number.isInteger(opcode) || opcode < 0 || opcode > MAX_OPCODE) {
    throw new RangeError(`opcode ${opcode} is not an integer in 0..${MAX_OPCODE}`);
  }
  const hasId = requestId !== null && requestId !== undefined;
  if (hasId && (!Number.isInteger(requestId) || requestId < 0 || requestId > MAX_REQUEST_ID)) {
    throw new RangeError(`request id ${requestId} is not an integer in 0..${MAX_REQUEST_ID}`);
  }
  const body = asBytes(payload);
  const headerLen = hasId ? 8 : 4;
  const out = new Uint8Array(headerLen + body.length);
  const view = new DataView(out.buffer);
  // `>>> 0` keeps the word unsigned: `|` on bit 31 yields a negative int32.
  view.setUint32(0, hasId ? (opcode | REQUEST_ID_FLAG) >>> 0 : opcode);
  if (hasId) view.setUint32(4, requestId);
  out.set(body, headerLen);
  return out;
}

/**
 * Decodes one frame; the payload is a view into `data`, not a copy.
 * Checks run in the order PROTOCOL.md §2 gives: length, reserved bits (which
 * win over a missing id), then the request id's length.
 * @param {ArrayBuffer|Uint8Array} data one binary WebSocket message
 * @returns {{opcode: number, requestId: number|null, payload: Uint8Array}}
 * @throws {FrameError}
 */
export function decodeFrame(data) {
  const bytes = asBytes(data);
  if (bytes.length < 4) {
    throw new FrameError(
      'FRAME_TOO_SHORT',
      `frame is ${bytes.length} bytes long, shorter than its 4-byte opcode`,
      0,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const word = view.getUint32(0);
  const opcode = word & MAX_OPCODE;
  const hasId = (word & REQUEST_ID_FLAG) !== 0;
  const requestId = hasId && bytes.length >= 8 ? view.getUint32(4) : null;
  if ((word & RESERVED_FLAGS) !== 0) {
    const bits = (word & RESERVED_FLAGS) >>> 0;
    throw new FrameError(
      'RESERVED_FLAGS',
      `reserved bits 0x${bits.toString(16).padStart(8, '0')} of the opcode word are set`,
      opcode,
      requestId,
    );
  }
  if (hasId && requestId === null) {
    throw new FrameError(
      'FRAME_TOO_SHORT',
      `frame announces a request id but is only ${bytes.length} bytes long`,
      opcode,
    );
  }
  return { opcode, requestId, payload: bytes.subarray(hasId ? 8 : 4) };
}

// ---------------------------------------------------------------------------
// Protobuf (proto3 binary encoding), just enough for the messages below
// ---------------------------------------------------------------------------
//
// A field is a key varint (field_number << 3 | wire_type) followed by its
// value. Wire types: 0 varint (uint32, uint64, bool, enum), 1 fixed 64-bit,
// 2 length-delimited (string, bytes, embedded message, packed repeated),
// 5 fixed 32-bit. proto3 omits fields at their default value, so an empty
// payload is a message with every field at its default. Decoders skip fields
// they do not know, by wire type.
//
// uint64 fields are plain JS Numbers: exact up to 2^53 - 1, which covers
// sequence numbers and millisecond timestamps.

/**
 * Schemas: message name -> { fieldNumber: [jsName, type, repeated?] }.
 * type is 'string' | 'bytes' | 'bool' | 'uint32' | 'uint64' | 'enum', the
 * name of another message here, or 'map<K,V>' (K a scalar type, V either).
 * JS names are the proto names in camelCase.
 */
const SCHEMAS = {
  // protocol.proto
  Error: { 1: ['code', 'uint32'], 2: ['message', 'string'], 3: ['opcode', 'uint32'] },
  Welcome: {
    1: ['sessionId', 'string'],
    2: ['userId', 'string'],
    3: ['server', 'string'],
    4: ['protocolVersion', 'uint32'],
    5: ['pingIntervalMs', 'uint32'],
    6: ['maxMessageSize', 'uint32'],
    7: ['pingTimeoutMs', 'uint32'],
  },
  RefreshToken: { 1: ['token', 'string'] },
  TokenRefreshed: { 1: ['expiresAtMs', 'uint64'] },
  // pubsub.proto
  Subscribe: {
    1: ['topics', 'string', true],
    2: ['since', 'map<string,Position>'],
    3: ['positions', 'bool'],
  },
  Position: { 1: ['epoch', 'string'], 2: ['seq', 'uint64'] },
  StreamState: {
    1: ['topic', 'string'],
    2: ['room', 'string'],
    3: ['position', 'Position'],
    4: ['recovered', 'bool'],
    5: ['replayed', 'uint32'],
  },
  Subscribed: { 1: ['streams', 'StreamState', true] },
  Acknowledge: { 1: ['streams', 'StreamAck', true] },
  StreamAck: { 1: ['topic', 'string'], 2: ['room', 'string'], 3: ['position', 'Position'], 4: ['user', 'bool'] },
  Gap: {
    1: ['topic', 'string'],
    2: ['room', 'string'],
    3: ['epoch', 'string'],
    4: ['fromSeq', 'uint64'],
    5: ['toSeq', 'uint64'],
    6: ['reason', 'string'],
    7: ['user', 'bool'],
  },
  Unsubscribe: { 1: ['topics', 'string', true] },
  Publish: { 1: ['topic', 'string'], 2: ['data', 'bytes'], 3: ['opcode', 'uint32'] },
  Published: {
    1: ['topic', 'string'],
    2: ['room', 'string'],
    3: ['seq', 'uint64'],
    4: ['sessions', 'uint32'],
    5: ['nodes', 'uint32'],
    6: ['epoch', 'string'],
  },
  Sender: { 1: ['sessionId', 'string'], 2: ['userId', 'string'] },
  Delivery: {
    1: ['kind', 'enum'],
    2: ['topic', 'string'],
    3: ['room', 'string'],
    4: ['sender', 'Sender'],
    5: ['seq', 'uint64'],
    6: ['data', 'bytes'],
    7: ['opcode', 'uint32'],
    8: ['publishedAtMs', 'uint64'],
    9: ['epoch', 'string'],
    10: ['replayed', 'bool'],
    11: ['redelivered', 'bool'],
  },
  Join: { 1: ['room', 'string'], 2: ['presenceEvents', 'bool'], 3: ['since', 'Position'] },
  Leave: { 1: ['room', 'string'] },
  Say: { 1: ['room', 'string'], 2: ['data', 'bytes'], 3: ['includeSelf', 'bool'] },
  Send: { 1: ['userId', 'string'], 2: ['sessionId', 'string'], 3: ['data', 'bytes'] },
  Member: { 1: ['sessionId', 'string'], 2: ['userId', 'string'] },
  PresenceRequest: { 1: ['room', 'string'], 2: ['topic', 'string'] },
  Presence: {
    1: ['room', 'string'],
    2: ['topic', 'string'],
    3: ['count', 'uint32'],
    4: ['members', 'Member', true],
    5: ['stream', 'StreamState'],
  },
  PresenceEvent: {
    1: ['room', 'string'],
    2: ['action', 'enum'],
    3: ['member', 'Member'],
    4: ['count', 'uint32'],
  },
  // app.proto (built-in application opcodes)
  FriendAdded: { 1: ['name', 'string'], 2: ['friendCount', 'uint32'], 3: ['alreadyFriends', 'bool'] },
  InfoRequest: { 1: ['includeFriends', 'bool'] },
  Info: {
    1: ['server', 'string'],
    2: ['uptimeMs', 'uint64'],
    3: ['sessions', 'uint32'],
    4: ['session', 'SessionInfo'],
  },
  SessionInfo: {
    1: ['sessionId', 'string'],
    2: ['userId', 'string'],
    3: ['remoteAddr', 'string'],
    4: ['connectedMs', 'uint64'],
    5: ['framesReceived', 'uint64'],
    6: ['framesSent', 'uint64'],
    7: ['friendCount', 'uint32'],
    8: ['friends', 'string', true],
    9: ['dropped', 'uint64'],
    10: ['subscriptions', 'string', true],
  },
};

const VARINT_TYPES = new Set(['uint32', 'uint64', 'bool', 'enum']);

/** Grows as needed; collects the bytes of one message. */
class Writer {
  constructor() {
    this.buf = new Uint8Array(64);
    this.len = 0;
  }
  reserve(n) {
    if (this.len + n <= this.buf.length) return;
    const next = new Uint8Array(Math.max(this.buf.length * 2, this.len + n));
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }
  // Seven bits per byte, least significant group first, high bit = "more".
  // Division instead of `>>>` so values above 2^32 (uint64) stay exact.
  varint(value) {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new RangeError(`${value} is not an unsigned integer below 2^53`);
    }
    this.reserve(10);
    while (value >= 0x80) {
      this.buf[this.len++] = (value % 0x80) | 0x80;
      value = Math.floor(value / 0x80);
    }
    this.buf[this.len++] = value;
  }
  bytes(bytes) {
    this.varint(bytes.length);
    this.reserve(bytes.length);
    this.buf.set(bytes, this.len);
    this.len += bytes.length;
  }
  finish() {
    return this.buf.slice(0, this.len);
  }
}

/** Reads fields off a byte slice; every length is checked before use. */
class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.pos = 0;
  }
  get done() {
    return this.pos >= this.bytes.length;
  }
  varint() {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.bytes.length) throw new RangeError('protobuf: truncated varint');
      const b = this.bytes[this.pos++];
      result += (b & 0x7f) * scale;
      if (b < 0x80) return result;
      scale *= 0x80;
    }
    throw new RangeError('protobuf: varint longer than 10 bytes');
  }
  take(n) {
    if (n > this.bytes.length - this.pos) throw new RangeError('protobuf: truncated field');
    const out = this.bytes.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  skip(wireType) {
    switch (wireType) {
      case 0: this.varint(); break;
      case 1: this.take(8); break;
      case 2: this.take(this.varint()); break;
      case 5: this.take(4); break;
      default: throw new RangeError(`protobuf: unsupported wire type ${wireType}`);
    }
  }
}

// A map<K, V> field is, on the wire, a repeated embedded message per entry:
// key = field 1, value = field 2. These are the schemas of those entries.
const MAP_TYPE = /^map<(\w+),(\w+)>$/;
const entrySchemas = new Map();

/** The entry schema of a 'map<K,V>' field type, or undefined for other types. */
function mapEntrySchema(type) {
  if (!type.startsWith('map<')) return undefined;
  let schema = entrySchemas.get(type);
  if (!schema) {
    const m = MAP_TYPE.exec(type);
    if (!m) throw new TypeError(`bad map type ${type}`);
    schema = { 1: ['key', m[1]], 2: ['value', m[2]] };
    entrySchemas.set(type, schema);
  }
  return schema;
}

function defaultValue(type, repeated) {
  if (repeated) return [];
  switch (type) {
    case 'string': return '';
    case 'bytes': return new Uint8Array(0);
    case 'bool': return false;
    case 'uint32': case 'uint64': case 'enum': return 0;
    default: return mapEntrySchema(type) ? {} : null; // embedded message: absent
  }
}

function writeField(w, number, type, value) {
  if (VARINT_TYPES.has(type)) {
    w.varint((number << 3) | 0);
    w.varint(type === 'bool' ? (value ? 1 : 0) : value);
  } else {
    w.varint((number << 3) | 2);
    if (type === 'string') w.bytes(utf8Encoder.encode(value));
    else if (type === 'bytes') w.bytes(toBytes(value));
    else w.bytes(encodeMessage(type, value));
  }
}

function isDefault(type, value) {
  if (value === undefined || value === null) return true;
  switch (type) {
    case 'string': return value === '';
    case 'bytes': return toBytes(value).length === 0;
    case 'bool': return !value;
    case 'uint32': case 'uint64': case 'enum': return value === 0;
    default: return false; // a set embedded message is written even when empty
  }
}

/**
 * The entries of a map field's value (a Map or a plain object), sorted by
 * key so that equal maps encode to equal bytes.
 */
function mapEntries(keyType, value) {
  if (value === undefined || value === null) return [];
  const entries = value instanceof Map ? [...value] : Object.entries(value);
  if (VARINT_TYPES.has(keyType)) {
    // Object keys are strings; varint keys are numbers (or booleans).
    const toKey = keyType === 'bool' ? (k) => k === true || k === 'true' : Number;
    return entries.map(([k, v]) => [toKey(k), v]).sort(([a], [b]) => a - b);
  }
  return entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
}

function encodeFields(schema, obj) {
  const w = new Writer();
  for (const [number, [name, fieldType, repeated]] of Object.entries(schema)) {
    const value = obj?.[name];
    const entrySchema = mapEntrySchema(fieldType);
    if (entrySchema) {
      // One entry message per key; as prost does, an entry omits a key or
      // value at its default (a default message value included).
      const [, keyType] = entrySchema[1];
      const [, valueType] = entrySchema[2];
      for (const [key, item] of mapEntries(keyType, value)) {
        const entry = new Writer();
        if (!isDefault(keyType, key)) writeField(entry, 1, keyType, key);
        if (SCHEMAS[valueType]) {
          const encoded = encodeMessage(valueType, item ?? {});
          if (encoded.length > 0) {
            entry.varint((2 << 3) | 2);
            entry.bytes(encoded);
          }
        } else if (!isDefault(valueType, item)) {
          writeField(entry, 2, valueType, item);
        }
        w.varint((Number(number) << 3) | 2);
        w.bytes(entry.finish());
      }
    } else if (repeated) {
      // Repeated strings and messages are one field per element (never packed).
      for (const item of value ?? []) writeField(w, Number(number), fieldType, item);
    } else if (!isDefault(fieldType, value)) {
      writeField(w, Number(number), fieldType, value);
    }
  }
  return w.finish();
}

/**
 * Encodes a plain object as protobuf message `type` (a key of `messages`).
 * Missing fields are defaults; fields are written in field-number order and
 * defaults are omitted, as proto3 encoders (prost included) do.
 * `bytes` fields accept a Uint8Array, an ArrayBuffer or a string (UTF-8);
 * map fields a Map or a plain object (entries are written sorted by key).
 * @returns {Uint8Array}
 */
export function encodeMessage(type, obj = {}) {
  const schema = SCHEMAS[type];
  if (!schema) throw new TypeError(`unknown message type ${type}`);
  return encodeFields(schema, obj);
}

function decodeFields(schema, type, bytes) {
  const out = {};
  for (const [name, fieldType, repeated] of Object.values(schema)) {
    out[name] = defaultValue(fieldType, repeated);
  }
  const r = new Reader(asBytes(bytes));
  while (!r.done) {
    const key = r.varint();
    const number = Math.floor(key / 8);
    const wireType = key % 8;
    const field = schema[number];
    if (!field) {
      r.skip(wireType);
      continue;
    }
    const [name, fieldType, repeated] = field;
    const expected = VARINT_TYPES.has(fieldType) ? 0 : 2;
    if (wireType !== expected) {
      throw new RangeError(`protobuf: ${type}.${name} has wire type ${wireType}, expected ${expected}`);
    }
    let value;
    if (fieldType === 'bool') value = r.varint() !== 0;
    else if (fieldType === 'uint32') value = r.varint() % 0x1_0000_0000; // proto truncates to 32 bits
    else if (VARINT_TYPES.has(fieldType)) value = r.varint();
    else {
      const chunk = r.take(r.varint());
      const entrySchema = mapEntrySchema(fieldType);
      if (entrySchema) {
        const entry = decodeFields(entrySchema, `${type}.${name} entry`, chunk);
        const [, valueType] = entrySchema[2];
        // A map's message values are never absent: a missing one is the default.
        const item = entry.value ?? decodeMessage(valueType, new Uint8Array(0));
        // defineProperty: a key such as "__proto__" becomes an own property
        // like any other. proto3: the last entry with a key wins.
        Object.defineProperty(out[name], String(entry.key), {
          value: item,
          enumerable: true,
          writable: true,
          configurable: true,
        });
        continue;
      }
      if (fieldType === 'string') value = utf8Decoder.decode(chunk);
      else if (fieldType === 'bytes') value = chunk;
      else value = decodeMessage(fieldType, chunk);
    }
    if (repeated) out[name].push(value);
    else out[name] = value; // proto3: the last occurrence wins
  }
  return out;
}

/**
 * Decodes protobuf message `type` into a plain object with every field
 * present (defaults for absent ones; null for absent embedded messages; a
 * plain object for a map field, keyed by the map's keys).
 * `bytes` fields are views into `bytes`, not copies. Unknown fields are skipped.
 * @throws {RangeError} on truncated or malformed input
 */
export function decodeMessage(type, bytes) {
  const schema = SCHEMAS[type];
  if (!schema) throw new TypeError(`unknown message type ${type}`);
  return decodeFields(schema, type, bytes);
}

/** `messages.Delivery.encode(obj)` / `messages.Delivery.decode(bytes)`, and so on. */
export const messages = Object.freeze(
  Object.fromEntries(
    Object.keys(SCHEMAS).map((type) => [
      type,
      Object.freeze({
        encode: (obj) => encodeMessage(type, obj),
        decode: (bytes) => decodeMessage(type, bytes),
      }),
    ]),
  ),
);

/** A string becomes its UTF-8 bytes; binary data is viewed as a Uint8Array. */
export function toBytes(data) {
  if (typeof data === 'string') return utf8Encoder.encode(data);
  return asBytes(data);
}

/** The bytes as text when they are valid UTF-8, otherwise undefined. */
export function utf8OrUndefined(bytes) {
  try {
    return strictUtf8Decoder.decode(bytes);
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/**
 * An ERROR frame (or a local failure) as an Error. For ERROR frames `code` is
 * the numeric `wsproto.v1.Error.code` and `opcode` the offending opcode; local
 * failures use string codes: 'TIMEOUT', 'CLOSED', 'NOT_CONNECTED',
 * 'UNEXPECTED_REPLY', 'LEFT' (leave() before a pending join() was sent).
 */
export class WsprotoError extends Error {
  constructor(code, message, opcode = 0) {
    super(message);
    this.name = 'WsprotoError';
    this.code = code;
    this.opcode = opcode;
  }
}

const WS_OPEN = 1; // WebSocket.OPEN, without depending on a global

function detail(type, value) {
  return new CustomEvent(type, { detail: value });
}

function asList(topics) {
  return typeof topics === 'string' ? [topics] : [...topics];
}

function unexpectedReply(opcode, reply, expected) {
  return new WsprotoError(
    'UNEXPECTED_REPLY',
    `opcode ${opcode} was answered with opcode ${reply.opcode}, expected ${expected}`,
    opcode,
  );
}

/**
 * Whether topic pattern `pattern` covers `topic` (a name or a pattern):
 * every name matching `topic` also matches `pattern` (PROTOCOL.md §8).
 * Segments are split on '.'; '*' matches one segment, '#' (last segment
 * only) zero or more. For a name this is "the name matches the pattern":
 * `alarm.#` covers `alarm` and `alarm.fire.b3`, `rowdata.*` covers
 * `rowdata.temp` but not `rowdata.temp.42` or `rowdata.#`.
 */
export function topicCovers(pattern, topic) {
  const outer = pattern.split('.');
  const inner = topic.split('.');
  for (let i = 0; ; i++) {
    if (outer[i] === '#') return true;
    if (i === outer.length || i === inner.length) return outer.length === inner.length;
    if (inner[i] === '#') return false;
    if (outer[i] !== '*' && outer[i] !== inner[i]) return false;
  }
}

/** Whether some name matches both topics (the delivery rule, PROTOCOL.md §8). */
function topicsOverlap(a, b) {
  const x = a.split('.');
  const y = b.split('.');
  for (let i = 0; ; i++) {
    if (x[i] === '#' || y[i] === '#') return true;
    if (i === x.length || i === y.length) return x.length === y.length;
    if (x[i] !== '*' && y[i] !== '*' && x[i] !== y[i]) return false;
  }
}

// Keys of the position map: 't:' + topic for a topic's stream (as
// published: a name, or a pattern published to), 'r:' + room for a room's,
// 'u' for the session user's stream of critical pushes (as the Rust
// client's `Positions` keys them).
const TOPIC_STREAM = 't:';
const ROOM_STREAM = 'r:';
const USER_STREAM = 'u';

/** The stream key of a Delivery, or null when it has no position. */
function deliveryStream({ kind, topic, room, seq, epoch }) {
  if (seq === 0 || !epoch) return null; // unnumbered, or a server without epochs
  if (kind === DELIVERY_KIND.TOPIC && topic) return TOPIC_STREAM + topic;
  if (kind === DELIVERY_KIND.ROOM && room) return ROOM_STREAM + room;
  // A numbered direct message is a critical push in the user's own stream.
  if (kind === DELIVERY_KIND.DIRECT) return USER_STREAM;
  return null;
}

/** The stream key of a StreamState or a Gap (`user`: the user's stream), or null. */
function stateStream({ topic, room, user }) {
  if (user) return USER_STREAM; // its topic and room are empty
  if (topic) return TOPIC_STREAM + topic;
  if (room) return ROOM_STREAM + room;
  return null;
}

/**
 * Whether `s` is a valid topic (PROTOCOL.md §8), or with `nameOnly` a valid
 * name (a room): what the server accepts, checked on saved positions since
 * one bad `since` key fails the whole SUBSCRIBE.
 */
function isTopic(s, nameOnly = false) {
  if (typeof s !== 'string' || s === '' || utf8Encoder.encode(s).length > 200) return false;
  const segments = s.split('.');
  if (segments.length > 16) return false;
  return segments.every((segment, i) => {
    if (segment === '' || /[\s\p{Cc}]/u.test(segment)) return false;
    if (segment === '*' || segment === '#') return !nameOnly && (segment === '*' || i === segments.length - 1);
    return !/[*#]/.test(segment);
  });
}

const DEVICE_ID = /^[A-Za-z0-9._:-]{1,64}$/;

/**
 * `url` with `device=ID` added to its query (after an existing one, before
 * a fragment), as the Rust client's `Subscriber::with_device` does.
 */
function withDevice(url, device) {
  const text = String(url);
  const hash = text.indexOf('#');
  const base = hash < 0 ? text : text.slice(0, hash);
  const fragment = hash < 0 ? '' : text.slice(hash);
  const separator = !base.includes('?') ? '?' : /[?&]$/.test(base) ? '' : '&';
  return `${base}${separator}device=${encodeURIComponent(device)}${fragment}`;
}

function isPosition(p) {
  return p !== null && typeof p === 'object' && typeof p.epoch === 'string' && p.epoch !== ''
    && Number.isSafeInteger(p.seq) && p.seq >= 0;
}

/**
 * A reconnecting wsproto client.
 *
 * Events (all CustomEvent; the payload is `event.detail`):
 *   open          the socket opened (before any WELCOME)
 *   welcome       Welcome — the session is ready
 *   joined        Presence — reply to a JOIN, including the automatic
 *                 re-joins after a reconnect (so member lists can be rebuilt)
 *   delivery      Delivery, plus `text` (the data as a string when it is UTF-8);
 *                 `replayed` is true for a missed message recovered from history,
 *                 `redelivered` for one sent again for want of an
 *                 acknowledgement (devices). Duplicates are not dispatched (see below)
 *   presence      PresenceEvent
 *   gap           Gap {topic, room, user, epoch, fromSeq, toSeq, reason} —
 *                 messages of a followed stream (`user` true: the user's
 *                 stream of critical pushes) are missing and will not come
 *                 (reason 'history', 'epoch', 'unavailable' or 'lost'):
 *                 reload that stream's state
 *   recovered     {streams, unrecovered, topics | room} — the answer to a
 *                 SUBSCRIBE or JOIN that asked to recover from kept positions
 *                 (after a reconnect, or with the `positions` option):
 *                 `streams` the StreamStates {topic, room, position,
 *                 recovered, replayed}; `unrecovered` those with recovered
 *                 false, whose missed messages could not all be replayed
 *                 (a `gap` event said which): reload those streams
 *   error         Error (code, message, opcode) not answering a pending
 *                 request; also frames that do not decode ({code: 'DECODE'})
 *                 and failures of the automatic re-subscribe/re-join
 *   frame         every decoded incoming frame {opcode, requestId, payload}
 *   close         {code, reason, wasClean} — a socket closed; whatever the
 *                 code (4000 heartbeat timeout, 4001 token expired, 4003 too
 *                 many unacknowledged deliveries, ...) the client reconnects
 *                 unless close() was called or `reconnect` is false
 *   reconnecting  {delayMs, attempt} — the next connect is scheduled
 *
 * Subscriptions and rooms are remembered: after a reconnect the client sends
 * one SUBSCRIBE with every topic and a JOIN per room (with the same
 * presence_events flag) before anything else. Requests made while
 * disconnected are queued and sent after those, so a SAY issued during a
 * reconnect reaches a room the session is back in (the server answers a
 * session's frames in order).
 *
 * Positions and recovery. A topic or room delivery with seq > 0 has a
 * position (epoch, seq) in its stream: its `topic` as published, or its
 * `room`; so has a direct delivery with seq > 0, a critical push in the
 * session user's own stream (key 'u'). The client keeps the last position
 * per stream, so that:
 *   - a delivery whose position was seen (same epoch, seq not above the
 *     last) is a duplicate and dropped, `replayed` or `redelivered` alike;
 *     another epoch is never one (the stream restarted; positions of
 *     different epochs do not compare);
 *   - every SUBSCRIBE (the app's and the one sent on reconnect) carries
 *     `positions: true` and `since`: the kept position of every stream the
 *     subscribed topics cover; every JOIN carries the room's kept `since`.
 *     The server replays what was missed (deliveries with `replayed`), in
 *     order, before the reply and live messages; what it cannot replay it
 *     reports as a `gap` event and `recovered: false` (see `recovered`);
 *   - a reply's StreamState gives the position of a stream the client has
 *     no message of yet (or whose epoch changed), so recovery works even
 *     for a stream that was quiet until the disconnect.
 * `positions()` returns the kept positions (save them, e.g. in
 * sessionStorage) and the `positions` option starts from saved ones, so a
 * reloaded page recovers too (and drops what it already had). unsubscribe()
 * and leave() forget the positions of the streams no longer followed. The
 * user's stream is named in no SUBSCRIBE or JOIN: the server recovers it
 * from the device's acknowledged position when a device connects. A server
 * without recovery answers with ACK and no epochs: the client then keeps
 * no positions.
 *
 * Devices and acknowledgements (PROTOCOL.md §9.4). With the `device`
 * option the client connects with `?device=ID` and reports what the app has
 * processed (ACKNOWLEDGE, opcode 21, no reply): the server keeps those
 * positions per user and device, and recovers a SUBSCRIBE or JOIN from them
 * for every stream the request names no `since` for, so a device that lost
 * its own positions (an app restart) resumes where it was; the user's
 * stream it recovers on connect. A numbered topic, room or direct delivery
 * counts as processed once its `delivery` listeners have returned or, with
 * `manualAck: true`, when the app calls `acknowledge(delivery)`. The
 * highest processed position per stream (a StreamAck with `topic`, `room`,
 * or `user: true` for the user's stream) waits in the client and goes out
 * in one frame at most every `ackIntervalMs`, on `flushAcknowledgements()`
 * and on `close()`; while disconnected it waits for the next connection.
 * Without a device nothing is acknowledged.
 *
 * On critical streams (critical topics, the user's stream) the server
 * expects those acknowledgements: a delivery not acknowledged in time comes
 * again, `redelivered`, at the same position; the client drops it as a
 * duplicate but, once it was processed, acknowledges it again (the first
 * acknowledgement may have gone out on a socket that then dropped). A
 * device that leaves more unacknowledged than the server's window is closed
 * with 4003 and, reconnecting as usual, recovers from what it acknowledged.
 */
export class WsprotoClient extends EventTarget {
  /**
   * @param {string} url e.g. `ws://host/ws?user=alice`
   * @param {object} [options]
   * @param {boolean} [options.reconnect=true]
   * @param {number} [options.minDelayMs=500]   first reconnect window (delays
   *   are random in [0, window], the window doubling per attempt)
   * @param {number} [options.maxDelayMs=10000] reconnect window cap
   * @param {number} [options.heartbeatMs=15000] PING period; 0 disables the
   *   heartbeat and the watchdog (which drops a socket silent for 2.5 periods)
   * @param {number} [options.requestTimeoutMs=10000] default request timeout
   * @param {Object<string, {epoch: string, seq: number}>|Map} [options.positions]
   *   stream positions to start from, as a previous `positions()` returned
   *   (entries that are not valid positions are ignored)
   * @param {string} [options.device] device id (1–64 letters, digits or
   *   `._:-`; a TypeError otherwise): added to the URL as `device=ID`, and
   *   turns acknowledgements on
   * @param {boolean} [options.manualAck=false] acknowledge only what the app
   *   passes to `acknowledge()`, not every delivery once dispatched
   * @param {number} [options.ackIntervalMs=100] how often pending
   *   acknowledgements are sent
   * @param {typeof WebSocket} [options.WebSocket] constructor to use (tests, Node)
   * @throws {TypeError} for an invalid `device`
   */
  constructor(url, options = {}) {
    const { device } = options;
    if (device !== undefined && device !== null && (typeof device !== 'string' || !DEVICE_ID.test(device))) {
      throw new TypeError(`invalid device id ${JSON.stringify(device)}: expected 1 to 64 letters, digits or ._:-`);
    }
    super();
    /** The URL connected to (with `device=ID` when there is a device). */
    this.url = device ? withDevice(url, device) : url;
    this.options = {
      reconnect: true,
      minDelayMs: 500,
      maxDelayMs: 10000,
      heartbeatMs: 15000,
      requestTimeoutMs: 10000,
      manualAck: false,
      ackIntervalMs: 100,
      ...options,
    };
    /** The last WELCOME, or null before the first one. */
    this.welcome = null;

    this._WebSocket = this.options.WebSocket ?? globalThis.WebSocket;
    this._ws = null;
    this._closedByUser = false;
    this._attempt = 0; // consecutive failed connects, for the back-off
    this._reconnectTimer = null;
    this._heartbeatTimer = null;
    this._watchdogTimer = null;
    this._lastReceived = 0; // Date.now() of the last incoming message
    this._unansweredPingAt = 0; // when the first PING since then was sent
    this._nextRequestId = 1;
    this._pending = new Map(); // request id -> {resolve, reject, timer}
    this._queue = []; // frames (Uint8Array) waiting for the socket to open
    this._topics = new Set(); // what the app subscribed to
    this._rooms = new Map(); // room -> {presenceEvents}
    this._openWaiters = []; // {resolve, reject} for calls made while disconnected
    // Stream key ('t:' + topic, 'r:' + room, 'u') -> {epoch, seq, seen,
    // acked}: `seq` is the position recovery asks from, `seen` the highest
    // seq dispatched in `epoch` (a delivery at or below it is a duplicate),
    // `acked` the highest the app acknowledged (0: none yet). `seq` and
    // `seen` differ only when a SUBSCRIBE/JOIN reply moved `seq` ahead of
    // what was seen.
    this._positions = new Map();
    const saved = this.options.positions;
    const entries = saved instanceof Map ? saved : Object.entries(saved ?? {});
    for (const [key, p] of entries) {
      const valid = typeof key === 'string'
        && (key === USER_STREAM
          || (key.startsWith(TOPIC_STREAM) ? isTopic(key.slice(TOPIC_STREAM.length))
            : key.startsWith(ROOM_STREAM) && isTopic(key.slice(ROOM_STREAM.length), true)));
      if (valid && isPosition(p)) this._positions.set(key, { epoch: p.epoch, seq: p.seq, seen: p.seq, acked: 0 });
    }
    // Acknowledgements: stream key -> StreamAck {topic, room, user,
    // position} not sent yet; the timer that sends them; the delivery being
    // dispatched.
    this._acks = new Map();
    this._ackTimer = null;
    this._dispatching = null;

    this._connect();
  }

  /** True while the socket is open. */
  get connected() {
    return this._ws !== null && this._ws.readyState === WS_OPEN;
  }

  /** Topics the client keeps subscribed to. */
  get topics() {
    return [...this._topics];
  }

  /** Rooms the client keeps joined. */
  get rooms() {
    return [...this._rooms.keys()];
  }

  /** The device id (the `device` option), or null. */
  get device() {
    return this.options.device || null;
  }

  /**
   * The last position the client saw in each stream, to save (e.g. in
   * sessionStorage) and pass back as the `positions` option, so a reloaded
   * page recovers what it missed: a fresh plain object
   * `{'t:<topic>': {epoch, seq}, 'r:<room>': {epoch, seq}, u: {epoch, seq}}`
   * (`u`: the user's stream, so a reloaded page drops its critical pushes
   * already seen when the server replays them).
   */
  positions() {
    const out = {};
    for (const [key, { epoch, seq }] of this._positions) out[key] = { epoch, seq };
    return out;
  }

  // --- requests -----------------------------------------------------------

  /**
   * Sends a frame with a fresh request id and resolves with the reply frame
   * that echoes it ({opcode, requestId, payload}). Rejects with a
   * WsprotoError whose `.code` is the ERROR code when the server answers with
   * ERROR, and on timeout or when the socket closes first. While
   * disconnected the frame is queued until the socket opens (the timeout
   * runs from the call).
   */
  request(opcode, payload = new Uint8Array(0), { timeoutMs = this.options.requestTimeoutMs } = {}) {
    return this._request(opcode, payload, timeoutMs);
  }

  /**
   * request(), with `onReply(frame)` (for replies other than ERROR) run
   * while the reply is handled, before any later frame: its result resolves
   * the promise, an exception rejects it.
   */
  _request(opcode, payload, timeoutMs = this.options.requestTimeoutMs, onReply = null) {
    if (this._closedByUser) {
      return Promise.reject(new WsprotoError('CLOSED', 'client is closed', opcode));
    }
    if (!this._willConnect) {
      return Promise.reject(new WsprotoError('NOT_CONNECTED', 'not connected and not reconnecting', opcode));
    }
    const id = this._allocateRequestId();
    const frame = encodeFrame(opcode, toBytes(payload), id);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        this._queue = this._queue.filter((queued) => queued.id !== id);
        reject(new WsprotoError('TIMEOUT', `no reply to opcode ${opcode} within ${timeoutMs} ms`, opcode));
      }, timeoutMs);
      this._pending.set(id, { resolve, reject, timer, opcode, onReply });
      if (this.connected) this._ws.send(frame);
      else this._queue.push({ id, frame });
    });
  }

  /** Sends a frame without a request id (fire and forget). Returns false when not connected. */
  sendFrame(opcode, payload = new Uint8Array(0)) {
    if (!this.connected) return false;
    this._ws.send(encodeFrame(opcode, toBytes(payload)));
    return true;
  }

  /**
   * Subscribes to topics or patterns (string or array); remembered across
   * reconnects. Recovers the streams they cover from the positions kept
   * (see the class comment). Resolves to the StreamState list of the reply
   * (where each named stream stands; [] from a server without recovery).
   */
  async subscribe(topics) {
    const list = asList(topics);
    if (list.length === 0) return [];
    list.forEach((t) => this._topics.add(t));
    if (!this.connected) {
      // The SUBSCRIBE sent on (re)connect covers them.
      const replay = await this._nextOpen();
      return replay.subscribed;
    }
    return this._subscribe(list);
  }

  /** Unsubscribes and forgets the topics (and the positions of streams no longer followed). */
  async unsubscribe(topics) {
    const list = asList(topics);
    if (list.length === 0) return;
    list.forEach((t) => this._topics.delete(t));
    const remaining = [...this._topics];
    for (const key of this._positions.keys()) {
      if (!key.startsWith(TOPIC_STREAM)) continue;
      const name = key.slice(TOPIC_STREAM.length);
      const follows = (t) => topicsOverlap(t, name);
      if (list.some(follows) && !remaining.some(follows)) this._positions.delete(key);
    }
    if (!this.connected) return; // nothing to undo on a socket that is not there
    await this._call(OP.UNSUBSCRIBE, 'Unsubscribe', { topics: list }, OP.ACK);
  }

  /**
   * Publishes data (string or bytes) to a topic or pattern. Resolves to Published.
   * @param {{opcode?: number}} [options] application opcode passed through
   */
  publish(topic, data, { opcode = 0 } = {}) {
    return this._call(OP.PUBLISH, 'Publish', { topic, data: toBytes(data), opcode }, OP.PUBLISH, 'Published');
  }

  /**
   * Joins a room (remembered across reconnects), recovering what was said
   * since the room's kept position. Resolves to the Presence of the room
   * (`stream`: where the room's stream stands); also dispatched as a
   * `joined` event.
   */
  async join(room, { presenceEvents = false } = {}) {
    this._rooms.set(room, { presenceEvents });
    if (!this.connected) {
      // The JOINs sent on (re)connect cover it, with the latest flags.
      const replay = await this._nextOpen();
      const joined = replay.joined.get(room);
      if (!joined) throw new WsprotoError('LEFT', `left room ${room} before the socket opened`, OP.JOIN);
      return joined;
    }
    return this._join(room);
  }

  /** Leaves a room and forgets it (and its position). */
  async leave(room) {
    this._rooms.delete(room);
    this._positions.delete(ROOM_STREAM + room);
    if (!this.connected) return;
    await this._call(OP.LEAVE, 'Leave', { room }, OP.ACK);
  }

  /**
   * Says data (string or bytes) to a joined room. By default the sender does
   * not receive its own message; pass `{includeSelf: true}` to get it as a
   * delivery too. Resolves to Published.
   */
  say(room, data, { includeSelf = false } = {}) {
    return this._call(OP.SAY, 'Say', { room, data: toBytes(data), includeSelf }, OP.SAY, 'Published');
  }

  /** Sends data directly to every session of `userId`, or to one `sessionId`. Resolves to Published. */
  send({ userId = '', sessionId = '' }, data) {
    return this._call(OP.SEND, 'Send', { userId, sessionId, data: toBytes(data) }, OP.SEND, 'Published');
  }

  /**
   * Replaces the session's token before it expires (authenticated servers),
   * so the session is not closed with 4001. Resolves to TokenRefreshed;
   * rejects with INVALID_TOKEN. Pair it with the cookie or URL the next
   * reconnect will use.
   */
  refreshToken(token) {
    return this._call(OP.REFRESH_TOKEN, 'RefreshToken', { token }, OP.REFRESH_TOKEN, 'TokenRefreshed');
  }

  /** Who is in `{room}`, or how many sessions subscribe to `{topic}`. Resolves to Presence. */
  presence({ room = '', topic = '' }) {
    return this._call(OP.PRESENCE, 'PresenceRequest', { room, topic }, OP.PRESENCE, 'Presence');
  }

  /**
   * Marks a delivery (as the `delivery` event gave it) as processed: its
   * position is acknowledged with the next batch. Needed with `manualAck`;
   * harmless otherwise. Returns false when nothing is to acknowledge: no
   * device, a closed client, or a delivery without a position (broadcast,
   * seq 0 or no epoch).
   * @param {{kind: number, topic: string, room: string, epoch: string, seq: number}} delivery
   */
  acknowledge(delivery) {
    if (delivery === null || typeof delivery !== 'object') {
      throw new TypeError('acknowledge() takes a Delivery');
    }
    if (!this.device || this._closedByUser) return false;
    const key = deliveryStream(delivery);
    if (key === null) return false;
    const { epoch, seq } = delivery;
    const kept = this._positions.get(key);
    if (kept && kept.epoch === epoch && seq > kept.acked) kept.acked = seq;
    const pending = this._acks.get(key);
    // Cumulative: a lower seq of the same epoch adds nothing. Another
    // epoch replaces the pending one (the stream restarted).
    if (pending && pending.position.epoch === epoch && seq <= pending.position.seq) return true;
    // Exactly one of topic, room and user names the stream.
    this._acks.set(key, {
      topic: key.startsWith(TOPIC_STREAM) ? delivery.topic : '',
      room: key.startsWith(ROOM_STREAM) ? delivery.room : '',
      user: key === USER_STREAM,
      position: { epoch, seq },
    });
    if (this._ackTimer === null) {
      this._ackTimer = setTimeout(() => {
        this._ackTimer = null;
        this.flushAcknowledgements();
      }, this.options.ackIntervalMs);
    }
    return true;
  }

  /**
   * Sends the pending acknowledgements now (one ACKNOWLEDGE frame, split
   * only to stay within the server's maximum message size). Returns false
   * when nothing was sent: no device, nothing pending, or not connected
   * (they then go out on the next connection).
   */
  flushAcknowledgements() {
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    if (!this.device || this._acks.size === 0 || !this.connected) return false;
    const streams = [...this._acks.values()];
    this._acks.clear();
    const limit = (this.welcome?.maxMessageSize || 65536) - 8; // minus the frame header
    let batch = [];
    let size = 0;
    const send = () => this.sendFrame(OP.ACKNOWLEDGE, encodeMessage('Acknowledge', { streams: batch }));
    for (const ack of streams) {
      const length = encodeMessage('StreamAck', ack).length + 6; // plus key and length varint
      if (batch.length > 0 && size + length > limit) {
        send();
        batch = [];
        size = 0;
      }
      batch.push(ack);
      size += length;
    }
    send();
    return true;
  }

  /**
   * Sends the pending acknowledgements (counting a delivery whose listener
   * calls close() as processed, unless `manualAck`), then closes with 1000
   * and stops reconnecting; pending requests reject with code 'CLOSED'.
   */
  close(code = 1000, reason = '') {
    if (!this._closedByUser) {
      if (this._dispatching && !this.options.manualAck) this.acknowledge(this._dispatching);
      this.flushAcknowledgements();
    }
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    this._closedByUser = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._stopTimers();
    this._failPending(new WsprotoError('CLOSED', 'client closed'), true);
    const ws = this._ws;
    if (ws) {
      if (ws.readyState <= WS_OPEN) ws.close(code, reason);
      // The socket's close event still arrives and is reported once.
    }
  }

  // --- internals ------------------------------------------------------------

  _allocateRequestId() {
    // Ids wrap within 1..0xFFFFFFFE, skipping ids still in use. 0xFFFFFFFF
    // is left to tools (wsproto-client uses it as its end-of-batch barrier).
    for (;;) {
      const id = this._nextRequestId;
      this._nextRequestId = id >= 0xffff_fffe ? 1 : id + 1;
      if (!this._pending.has(id)) return id;
    }
  }

  /**
   * request() + reply-opcode check + payload decode; `then(message)`, when
   * given, runs as the reply is handled and its result is the call's.
   */
  async _call(opcode, requestType, fields, replyOpcode, replyType = null, then = null) {
    return this._request(opcode, encodeMessage(requestType, fields), undefined, (reply) => {
      if (reply.opcode !== replyOpcode) throw unexpectedReply(opcode, reply, replyOpcode);
      const message = replyType ? decodeMessage(replyType, reply.payload) : undefined;
      return then ? then(message) : message;
    });
  }

  /**
   * SUBSCRIBE with `positions` and, for every kept topic position one of
   * `topics` covers, `since`. Missed messages arrive (and are dispatched)
   * before the reply; resolves to its StreamState list.
   */
  _subscribe(topics) {
    const since = new Map();
    for (const [key, { epoch, seq }] of this._positions) {
      if (!key.startsWith(TOPIC_STREAM)) continue;
      const name = key.slice(TOPIC_STREAM.length);
      if (topics.some((t) => topicCovers(t, name))) since.set(name, { epoch, seq });
    }
    const payload = encodeMessage('Subscribe', { topics, since, positions: true });
    return this._request(OP.SUBSCRIBE, payload, undefined, (reply) => {
      // A server without recovery ignores both fields and ACKs.
      if (reply.opcode === OP.ACK) return [];
      if (reply.opcode !== OP.SUBSCRIBE) throw unexpectedReply(OP.SUBSCRIBE, reply, OP.SUBSCRIBE);
      const { streams } = decodeMessage('Subscribed', reply.payload);
      streams.forEach((state) => this._adopt(state));
      if (since.size > 0) this._recovered(streams, { topics });
      return streams;
    });
  }

  _join(room) {
    const { presenceEvents } = this._rooms.get(room) ?? { presenceEvents: false };
    const kept = this._positions.get(ROOM_STREAM + room);
    const since = kept ? { epoch: kept.epoch, seq: kept.seq } : null;
    return this._call(OP.JOIN, 'Join', { room, presenceEvents, since }, OP.JOIN, 'Presence', (presence) => {
      if (presence.stream) this._adopt(presence.stream);
      this.dispatchEvent(detail('joined', presence));
      if (since && presence.stream) this._recovered([presence.stream], { room });
      return presence;
    });
  }

  _recovered(streams, what) {
    const unrecovered = streams.filter((s) => !s.recovered);
    this.dispatchEvent(detail('recovered', { streams, unrecovered, ...what }));
  }

  /**
   * Keeps a delivery's position; false when it was seen already (same
   * epoch, seq not above the highest seen): a duplicate, not dispatched.
   */
  _observe(delivery) {
    const key = deliveryStream(delivery);
    if (key === null) return true;
    const { epoch, seq } = delivery;
    const kept = this._positions.get(key);
    if (kept && kept.epoch === epoch) {
      if (seq <= kept.seen) return false;
      kept.seen = seq;
      kept.seq = Math.max(kept.seq, seq);
    } else {
      // New, or another epoch: positions of different epochs never compare.
      this._positions.set(key, { epoch, seq, seen: seq, acked: 0 });
    }
    return true;
  }

  /**
   * A redelivered duplicate: the server has no acknowledgement of it (the
   * first went out on a socket that dropped, or is still pending here) and
   * would keep sending it, so acknowledge it again once it was processed
   * (dispatched, or with `manualAck` acknowledged by the app).
   */
  _reacknowledge(delivery) {
    const kept = this._positions.get(deliveryStream(delivery));
    if (!kept || kept.epoch !== delivery.epoch) return;
    const processed = this.options.manualAck ? kept.acked : kept.seen;
    if (delivery.seq <= processed) this.acknowledge(delivery);
  }

  /**
   * Takes a stream's position from a SUBSCRIBE/JOIN reply when the client
   * has none (it saw no message yet, so it recovers from the stream's
   * position then, e.g. (epoch, 0)), when the stream's epoch changed, or
   * when the stream is ahead (what lies between was reported lost). Only
   * `seq` moves: deliveries at or below it that were not seen (still on
   * their way) are not duplicates.
   */
  _adopt(state) {
    const key = stateStream(state);
    const p = state.position;
    if (key === null || !isPosition(p)) return;
    const kept = this._positions.get(key);
    if (!kept || kept.epoch !== p.epoch) this._positions.set(key, { epoch: p.epoch, seq: p.seq, seen: 0, acked: 0 });
    else if (p.seq > kept.seq) kept.seq = p.seq;
  }

  /** False once the client will not open another socket. */
  get _willConnect() {
    return !this._closedByUser && (this._ws !== null || this._reconnectTimer !== null);
  }

  /**
   * Resolves with the replay promises ({subscribed, joined}) of the next
   * open; rejects after requestTimeoutMs (the topic or room stays
   * remembered and is still replayed when the socket finally opens).
   */
  _nextOpen() {
    if (this._closedByUser) return Promise.reject(new WsprotoError('CLOSED', 'client is closed'));
    if (!this._willConnect) {
      return Promise.reject(new WsprotoError('NOT_CONNECTED', 'not connected and not reconnecting'));
    }
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (value) => {
          clearTimeout(timer);
          resolve(value);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      const timer = setTimeout(() => {
        this._openWaiters = this._openWaiters.filter((w) => w !== waiter);
        reject(new WsprotoError('TIMEOUT', `not connected within ${this.options.requestTimeoutMs} ms`));
      }, this.options.requestTimeoutMs);
      this._openWaiters.push(waiter);
    });
  }

  _connect() {
    this._reconnectTimer = null;
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (err) {
      // A malformed URL throws synchronously; retrying will not help.
      this._closedByUser = true;
      this._failPending(new WsprotoError('CLOSED', `cannot connect: ${err.message}`), true);
      queueMicrotask(() => this.dispatchEvent(detail('close', { code: 1006, reason: String(err.message), wasClean: false })));
      return;
    }
    ws.binaryType = 'arraybuffer';
    this._ws = ws;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onMessage(ws, event);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason, event.wasClean);
    ws.onerror = () => {}; // always followed by close, which carries more
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    this._attempt = 0;
    this._lastReceived = Date.now();
    this._startTimers();

    // Replay what the app asked for, before anything queued: one SUBSCRIBE
    // with every topic, then a JOIN per room, each with the positions to
    // recover from.
    const topics = [...this._topics];
    const subscribed = topics.length ? this._subscribe(topics) : Promise.resolve([]);
    subscribed.catch((err) => this._replayFailed(err, { topics }));
    const joined = new Map();
    for (const room of this._rooms.keys()) {
      const p = this._join(room);
      p.catch((err) => this._replayFailed(err, { room }));
      joined.set(room, p);
    }

    const queue = this._queue;
    this._queue = [];
    for (const { frame } of queue) ws.send(frame);
    this.flushAcknowledgements(); // what was processed while disconnected

    const waiters = this._openWaiters;
    this._openWaiters = [];
    for (const w of waiters) w.resolve({ subscribed, joined });
    // Dispatched last, so frames a listener sends follow the replay.
    this.dispatchEvent(detail('open', { url: this.url }));
  }

  _replayFailed(err, what) {
    if (err.code === 'CLOSED') return; // the next open replays again
    this.dispatchEvent(detail('error', { code: err.code, message: err.message, opcode: err.opcode, ...what }));
  }

  _onMessage(ws, event) {
    if (ws !== this._ws) return;
    this._lastReceived = Date.now();
    this._unansweredPingAt = 0;
    if (typeof event.data === 'string') return; // not part of the protocol
    let frame;
    try {
      frame = decodeFrame(event.data);
    } catch (err) {
      this.dispatchEvent(detail('error', { code: 'DECODE', message: err.message, opcode: err.opcode ?? 0 }));
      return;
    }
    this.dispatchEvent(detail('frame', frame));
    try {
      this._handleFrame(frame);
    } catch (err) {
      // A payload that does not decode as its schema says.
      this.dispatchEvent(detail('error', { code: 'DECODE', message: err.message, opcode: frame.opcode }));
    }
  }

  _handleFrame(frame) {
    const { opcode, requestId } = frame;
    const pending = requestId !== null ? this._pending.get(requestId) : undefined;
    if (pending) {
      this._pending.delete(requestId);
      clearTimeout(pending.timer);
      if (opcode === OP.ERROR) {
        const e = decodeMessage('Error', frame.payload);
        pending.reject(new WsprotoError(e.code, e.message, e.opcode));
      } else if (pending.onReply) {
        let value;
        try {
          value = pending.onReply(frame);
        } catch (err) {
          pending.reject(err);
          return;
        }
        pending.resolve(value);
      } else {
        pending.resolve(frame);
      }
      return;
    }
    switch (opcode) {
      case OP.WELCOME:
        this.welcome = decodeMessage('Welcome', frame.payload);
        this.dispatchEvent(detail('welcome', this.welcome));
        break;
      case OP.DELIVERY: {
        const delivery = decodeMessage('Delivery', frame.payload);
        if (!this._observe(delivery)) {
          // A duplicate (replayed or redelivered copy of a position seen).
          if (delivery.redelivered) this._reacknowledge(delivery);
          break;
        }
        delivery.text = utf8OrUndefined(delivery.data);
        this._dispatching = delivery;
        try {
          this.dispatchEvent(detail('delivery', delivery));
        } finally {
          this._dispatching = null;
        }
        // Its listeners have returned: processed.
        if (!this.options.manualAck) this.acknowledge(delivery);
        break;
      }
      case OP.PRESENCE_EVENT:
        this.dispatchEvent(detail('presence', decodeMessage('PresenceEvent', frame.payload)));
        break;
      case OP.GAP:
        this.dispatchEvent(detail('gap', decodeMessage('Gap', frame.payload)));
        break;
      case OP.ERROR:
        this.dispatchEvent(detail('error', decodeMessage('Error', frame.payload)));
        break;
      default:
        // PONGs to heartbeats, late replies to timed-out requests and
        // application pushes: available through the `frame` event.
        break;
    }
  }

  _onClose(ws, code, reason, wasClean) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._stopTimers();
    // A draining server (1001) says when to come back; the back-off's
    // jitter still spreads its clients within that.
    const hint = code === 1001 ? /reconnect after (\d+) ms/.exec(reason ?? '') : null;
    this._reconnectHintMs = hint ? Number(hint[1]) : 0;
    // Every close code is retried (4003 too: the server recovers a device
    // from what it acknowledged); only close() and `reconnect: false` stop.
    const willRetry = !this._closedByUser && this.options.reconnect;
    // Sent requests can no longer be answered. Queued ones wait for the next
    // socket, unless there will be none.
    this._failPending(new WsprotoError('CLOSED', `connection closed (${code})`), !willRetry);
    // Schedule first, so `close` listeners already see a client that reconnects.
    const retry = willRetry ? this._scheduleReconnect() : null;
    this.dispatchEvent(detail('close', { code, reason, wasClean }));
    if (retry) this.dispatchEvent(detail('reconnecting', retry));
  }

  /** Rejects sent requests (and, if `all`, queued ones and open waiters). */
  _failPending(err, all) {
    const queued = new Set(this._queue.map((q) => q.id));
    for (const [id, p] of this._pending) {
      if (!all && queued.has(id)) continue;
      this._pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new WsprotoError(err.code, err.message, p.opcode));
    }
    if (all) {
      this._queue = [];
      this._rejectOpenWaiters(err);
    }
  }

  _rejectOpenWaiters(err) {
    const waiters = this._openWaiters;
    this._openWaiters = [];
    for (const w of waiters) w.reject(err);
  }

  /**
   * Exponential back-off with "full jitter": a random delay in [0, d], d
   * doubling per attempt from minDelayMs up to maxDelayMs. After a server
   * restart every client reconnects at once; full jitter spreads them over
   * the whole window instead of sending them back in waves (as the Rust
   * client's `wsproto_client::backoff::Backoff` does).
   */
  _scheduleReconnect() {
    this._attempt += 1;
    const { minDelayMs, maxDelayMs } = this.options;
    const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** (this._attempt - 1));
    const delayMs = Math.round(Math.random() * ceiling) + (this._reconnectHintMs ?? 0);
    this._reconnectTimer = setTimeout(() => this._connect(), delayMs);
    return { delayMs, attempt: this._attempt };
  }

  // Heartbeat: browsers answer the server's WebSocket pings but cannot see
  // them, so a half-open connection is only noticed by sending. Every
  // heartbeatMs the client sends PING (opcode 3, payload: a timestamp); the
  // server's PONG, or any other frame, proves the socket alive. When nothing
  // at all arrived for 2.5 heartbeats the socket is dropped and replaced.
  //
  // Background tabs may run timers late (Chrome throttles them to once a
  // minute after a while), so silence alone is not proof: the socket is only
  // dropped when a PING has also gone unanswered for a full heartbeat.
  _startTimers() {
    const { heartbeatMs } = this.options;
    if (!heartbeatMs) return;
    this._unansweredPingAt = 0;
    this._heartbeatTimer = setInterval(() => this._ping(), heartbeatMs);
    this._armWatchdog(2.5 * heartbeatMs);
  }

  _ping() {
    if (this.sendFrame(OP.PING, String(Date.now())) && !this._unansweredPingAt) {
      this._unansweredPingAt = Date.now();
    }
  }

  _armWatchdog(delayMs) {
    this._watchdogTimer = setTimeout(() => {
      const { heartbeatMs } = this.options;
      const limit = 2.5 * heartbeatMs;
      const now = Date.now();
      const silentMs = now - this._lastReceived;
      if (silentMs < limit) {
        this._armWatchdog(limit - silentMs); // something arrived meanwhile
        return;
      }
      if (!this._unansweredPingAt || now - this._unansweredPingAt < heartbeatMs) {
        // Timers ran late and no PING has had its chance yet: ask now.
        this._ping();
        this._armWatchdog(heartbeatMs);
        return;
      }
      const ws = this._ws;
      if (!ws) return;
      // Don't wait for a close handshake a dead peer will never answer:
      // detach, close, and report the close ourselves.
      ws.onopen = ws.onmessage = ws.onclose = null;
      try {
        ws.close(4000, 'heartbeat timeout');
      } catch {
        // already closing
      }
      this._onClose(ws, 4000, 'heartbeat timeout', false);
    }, delayMs);
  }

  _stopTimers() {
    clearInterval(this._heartbeatTimer);
    clearTimeout(this._watchdogTimer);
    this._heartbeatTimer = null;
    this._watchdogTimer = null;
  }
}
