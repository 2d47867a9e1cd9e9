// A WebSocket stand-in for driving pgws.js in Node: the test plays the server.
"use strict";

if (typeof CustomEvent === "undefined") { // Node before 19
  global.CustomEvent = class CustomEvent extends Event {
    constructor(name, options = {}) {
      super(name, options);
      this.detail = options.detail === undefined ? null : options.detail;
    }
  };
}

class FakeWebSocket {
  constructor(url, protocols) {
    this.url = url;
    this.protocols = [].concat(protocols || []);
    this.readyState = FakeWebSocket.CONNECTING;
    this.protocol = "";
    this.sent = [];
    this.closedWith = null; // [code, reason] once the client called close()
    this.hang = false; // a half-open socket: close() never completes
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    FakeWebSocket.all.push(this);
  }

  send(frame) {
    if (this.readyState !== FakeWebSocket.OPEN) throw new Error("InvalidStateError: not open");
    this.sent.push(frame);
  }

  /** Like a browser: codes other than 1000 and 3000-4999 throw, before anything changes. */
  close(code, reason = "") {
    if (code !== undefined && code !== 1000 && !(code >= 3000 && code <= 4999)) {
      throw new Error(`InvalidAccessError: close code ${code} is not allowed`);
    }
    if (this.readyState >= FakeWebSocket.CLOSING) return;
    this.closedWith = [code === undefined ? 1005 : code, reason];
    this.readyState = FakeWebSocket.CLOSING;
    if (!this.hang) setTimeout(() => this.finish(code === undefined ? 1005 : code, reason, true), 0);
  }

  // ------------------------------------------------------------ the server's side

  open(protocol = "") {
    this.protocol = protocol;
    this.readyState = FakeWebSocket.OPEN;
    if (this.onopen) this.onopen({});
  }

  /** The server sends `frame` (an object is sent as JSON). */
  receive(frame) {
    const data = typeof frame === "string" || frame instanceof ArrayBuffer ? frame : JSON.stringify(frame);
    if (this.onmessage) this.onmessage({data});
  }

  /** The server closes (or the connection breaks, with 1006). */
  finish(code = 1006, reason = "", wasClean = false) {
    if (this.readyState === FakeWebSocket.CLOSED) return;
    this.readyState = FakeWebSocket.CLOSED;
    if (this.onclose) this.onclose({code, reason, wasClean});
  }

  /** The frames the client sent, parsed. */
  frames() {
    return this.sent.map((s) => JSON.parse(s));
  }

  actions(kind) {
    return this.frames().filter((f) => f.action === kind);
  }
}

FakeWebSocket.CONNECTING = 0;
FakeWebSocket.OPEN = 1;
FakeWebSocket.CLOSING = 2;
FakeWebSocket.CLOSED = 3;
FakeWebSocket.all = [];

/** A Storage stand-in that counts its writes. */
class FakeStorage {
  constructor() {
    this.items = new Map();
    this.writes = 0;
  }
  getItem(key) {
    return this.items.has(key) ? this.items.get(key) : null;
  }
  setItem(key, value) {
    this.writes += 1;
    this.items.set(key, String(value));
  }
  removeItem(key) {
    this.items.delete(key);
  }
  keys() {
    return Array.from(this.items.keys());
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Wait until `condition()` is true, for at most `ms`. */
async function until(condition, ms = 2000, what = "a condition") {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

module.exports = {FakeWebSocket, FakeStorage, sleep, until};
