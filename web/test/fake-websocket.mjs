// The browser's WebSocket as the client tests stand it in: the test plays
// the server (opens, pushes frames, closes) and reads what the client sent.
import { decodeFrame, encodeFrame } from '../wsproto.js';

/** Stands in for the browser's WebSocket; the test plays the server. */
export class FakeWebSocket {
  static instances = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.binaryType = 'blob';
    this.sent = [];
    this.closedWith = null;
    // Each subclass keeps its own list (`static instances = []`).
    this.constructor.instances.push(this);
  }
  send(bytes) {
    if (this.readyState !== 1) throw new Error('send on a socket that is not open');
    this.sent.push({ ...decodeFrame(bytes.slice()), at: Date.now() });
  }
  close(code = 1005, reason = '') {
    this.closedWith = { code, reason };
    if (this.readyState === 3) return;
    this.readyState = 2;
    setTimeout(() => this.serverClose(code, reason), 0);
  }
  // --- the server's side ---
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  push(opcode, payload = new Uint8Array(), requestId = null) {
    const bytes = encodeFrame(opcode, payload, requestId);
    // Browsers hand binary messages over as ArrayBuffers with binaryType 'arraybuffer'.
    this.onmessage?.({ data: bytes.buffer });
  }
  serverClose(code = 1006, reason = '') {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
}
