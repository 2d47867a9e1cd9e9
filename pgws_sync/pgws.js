/* pgws.js: the browser client of pgws_sync. Plain JavaScript, no build step, no dependencies.
 *
 *   <script src="/pgws.js"></script>
 *   const sock = new PgwsSocket("/ws");
 *   sock.on("message", (m) => console.log(m.channel, m.payload));
 *   sock.subscribe("chat");
 *
 * One PgwsSocket is one WebSocket that comes back by itself: it reconnects with
 * Fibonacci backoff (1.2, 1.2, 2.4, 3.6, 6.0 s... with jitter, at most 4 minutes,
 * reset once a socket opens), then subscribes to its channels and joins its rooms
 * again. With a `token` function it fetches a fresh token before every connect,
 * right away when the server closes with 3001 (JWT expired), and when a draining server
 * closes with 1012 "reconnect after N s", after N to 2N seconds. Server frames
 * become events: message, resync, resync_required, gap, tabwindow, error; and open, close,
 * reconnecting for the connection itself. On durable channels it keeps the last offset
 * and epoch of each channel (in memory, or in `storage` such as sessionStorage) and
 * resumes with them after every reconnect. See the README ("Browser client").
 */
(function (root) {
  "use strict";

  const CONNECTING = 0;
  const OPEN = 1;
  const CLOSING = 2;
  const CLOSED = 3;
  const CLOSE_JWT_EXPIRED = 3001;
  const CLOSE_SERVICE_RESTART = 1012; // a drain: the reason says "reconnect after N s"
  const RESTART_HINT = /reconnect after (\d+(?:\.\d+)?)\s*s/;

  const DEFAULTS = {
    minDelay: 1200, // ms: the first reconnect delays (then Fibonacci multiples)
    maxDelay: 240000, // ms: no reconnect delay is longer (4 minutes)
    jitter: 0.2, // each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    token: null, // () => string | Promise<string>, called before every connect
    tokenIn: "url", // "url": a last path segment (or the url function's argument); "protocol"
    protocols: [], // WebSocket subprotocols to offer
    maxQueued: 100, // publish()/send() frames kept while disconnected
    binaryType: "arraybuffer", // or "blob": what binary messages arrive as
    random: Math.random, // the jitter's source of numbers in [0, 1)
    storage: null, // e.g. sessionStorage: durable positions survive a page reload
    storageKey: "pgws:", // prefix of the storage keys (one per channel)
  };

  /** The n-th Fibonacci number: 1, 1, 2, 3, 5, 8... for n = 1, 2, 3... */
  function fibonacci(n) {
    let a = 0;
    let b = 1;
    for (let i = 0; i < n; i++) [a, b] = [b, a + b];
    return a;
  }

  function isObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  function isBinary(value) {
    return value instanceof ArrayBuffer || ArrayBuffer.isView(value) ||
      (typeof Blob !== "undefined" && value instanceof Blob);
  }

  function checkName(what, name) {
    if (typeof name !== "string" || name === "") {
      throw new TypeError(`pgws: ${what} must be a non-empty string, got ${JSON.stringify(name)}`);
    }
  }

  function failure(message, frame) {
    const error = new Error(message);
    if (frame !== undefined) error.frame = frame;
    return error;
  }

  /** ws:// or wss:// for `address`; relative addresses are taken from the page's location. */
  function socketUrl(address) {
    const base = root.location ? root.location.href : undefined;
    const url = new URL(address, base);
    if (url.protocol === "http:") url.protocol = "ws:";
    else if (url.protocol === "https:") url.protocol = "wss:";
    if (url.protocol !== "ws:" && url.protocol !== "wss:") {
      throw new SyntaxError(`pgws: ${address} is not a ws, wss, http or https URL`);
    }
    return url;
  }

  class PgwsSocket extends EventTarget {
    /**
     * `url`: a ws(s):// URL, a path on the page's host ("/ws"), or a function
     * (token) => URL called before every connect. `options`: see DEFAULTS.
     */
    constructor(url, options = {}) {
      super();
      const opts = Object.assign({}, DEFAULTS, options);
      if (typeof url === "string") socketUrl(url); // a bad URL fails here, not later
      else if (typeof url !== "function") throw new TypeError("pgws: url must be a string or a function");
      if (!(opts.minDelay > 0) || !(opts.maxDelay >= opts.minDelay)) {
        throw new RangeError("pgws: minDelay must be positive and maxDelay at least minDelay (ms)");
      }
      if (!(opts.jitter >= 0 && opts.jitter < 1)) throw new RangeError("pgws: jitter must be in [0, 1)");
      if (opts.token !== null && typeof opts.token !== "function") {
        throw new TypeError("pgws: token must be a function returning a token (or a promise of one)");
      }
      if (opts.tokenIn !== "url" && opts.tokenIn !== "protocol") {
        throw new TypeError('pgws: tokenIn must be "url" or "protocol"');
      }
      this.url = url;
      this.options = opts;
      /** The id the server gave this socket's current connection (Push endpoints), or null. */
      this.tabWindowId = null;
      /** Failed connects since the last open; the next delay grows with it. */
      this.attempt = 0;
      this._state = CONNECTING;
      this._ws = null;
      this._timer = null;
      this._closed = false;
      this._opens = 0;
      this._lastExpired = -Infinity;
      this._nextId = 0;
      this._channels = new Map(); // channel -> {options, subscribed, request, waiters}
      this._positions = new Map(); // durable channel -> {offset, epoch}: what was received
      this._rooms = new Map(); // room -> {joined, waiters}
      this._leaving = new Map(); // room -> waiters of leaveRoom()
      this._requests = new Map(); // id -> {kind, channel, socket, resolve, reject}
      this._queue = []; // frames of publish()/send() waiting for a socket
      this._online = () => this._reconnectNow();
      if (typeof root.addEventListener === "function") root.addEventListener("online", this._online);
      Promise.resolve().then(() => this._connect()); // listeners added right after `new` see everything
    }

    /**
     * Milliseconds to wait before reconnect attempt `attempt` (1, 2, 3...): minDelay times the
     * attempt-th Fibonacci number, at most maxDelay, scaled by a jitter factor drawn from `random`.
     */
    static backoff(attempt, random = Math.random, options = {}) {
      const min = options.minDelay !== undefined ? options.minDelay : DEFAULTS.minDelay;
      const max = options.maxDelay !== undefined ? options.maxDelay : DEFAULTS.maxDelay;
      const jitter = options.jitter !== undefined ? options.jitter : DEFAULTS.jitter;
      const n = Math.max(1, Math.min(Math.floor(attempt) || 1, 64));
      const nominal = Math.min(max, min * fibonacci(n));
      return Math.round(Math.min(max, nominal * (1 - jitter + 2 * jitter * random())));
    }

    // ------------------------------------------------------------------ state

    /** 0 connecting (or waiting to reconnect), 1 open, 2 closing, 3 closed: like WebSocket's. */
    get readyState() {
      return this._state;
    }

    get connected() {
      return this._state === OPEN;
    }

    /** The channels this socket is subscribed to (or will be once connected). */
    get channels() {
      return Array.from(this._channels.keys());
    }

    /** The rooms this socket is in (or will join once connected). */
    get rooms() {
      return Array.from(this._rooms.keys());
    }

    /** Call `fn(detail)` for each `name` event; returns a function that stops it. */
    on(name, fn) {
      const listener = (event) => fn.call(this, event.detail);
      this.addEventListener(name, listener);
      return () => this.removeEventListener(name, listener);
    }

    // ------------------------------------------------------------ app actions

    /** Subscribe to a PubSub channel, now and after every reconnect. Resolves once subscribed. */
    subscribe(channel, options = {}) {
      checkName("channel", channel);
      this._usable();
      let entry = this._channels.get(channel);
      if (entry && entry.subscribed && entry.options.backpressure === options.backpressure) {
        return Promise.resolve({event: "subscribed", channel});
      }
      if (!entry) {
        entry = {options: {}, subscribed: false, request: null, waiters: []};
        this._channels.set(channel, entry);
      }
      const changed = entry.options.backpressure !== options.backpressure;
      entry.options = {backpressure: options.backpressure};
      if (!this._positions.has(channel)) this._loadPosition(channel);
      const promise = this._wait(entry.waiters);
      if (this._state === OPEN && (entry.request === null || changed)) this._sendSubscribe(channel, entry);
      return promise;
    }

    /** Forget a channel and unsubscribe from it. Resolves with the server's reply (at once if offline). */
    unsubscribe(channel) {
      checkName("channel", channel);
      const entry = this._channels.get(channel);
      if (entry) {
        this._channels.delete(channel);
        this._settle(entry.waiters, null, failure(`pgws: unsubscribed from '${channel}' before the server answered`));
      }
      this._setPosition(channel, null);
      if (this._state !== OPEN) return Promise.resolve({event: "unsubscribed", channel});
      return this._request("unsubscribe", channel, {});
    }

    /** Publish `payload` (any JSON) to a PubSub channel. Resolves with the `published` reply. */
    publish(channel, payload) {
      checkName("channel", channel);
      try {
        this._usable();
        return this._request("publish", channel, {payload: payload === undefined ? null : payload});
      } catch (error) {
        return this._quiet(Promise.reject(error));
      }
    }

    /** Join a room of a Push endpoint, now and after every reconnect. Resolves once joined. */
    joinRoom(room) {
      checkName("room", room);
      this._usable();
      let entry = this._rooms.get(room);
      if (entry && entry.joined) return Promise.resolve({event: "joined", room});
      const fresh = !entry;
      if (fresh) {
        entry = {joined: false, waiters: []};
        this._rooms.set(room, entry);
      }
      const promise = this._wait(entry.waiters);
      if (fresh && this._state === OPEN) this._write(JSON.stringify({joinRoom: room}));
      return promise;
    }

    /** Leave a room and forget it. Resolves once the server confirms (at once if offline). */
    leaveRoom(room) {
      checkName("room", room);
      const entry = this._rooms.get(room);
      if (entry) {
        this._rooms.delete(room);
        this._settle(entry.waiters, null, failure(`pgws: left room '${room}' before the server answered`));
      }
      if (this._state !== OPEN) return Promise.resolve({event: "left", room});
      const waiters = this._leaving.get(room) || [];
      this._leaving.set(room, waiters);
      const promise = this._wait(waiters);
      this._write(JSON.stringify({leaveRoom: room}));
      return promise;
    }

    /**
     * Send a frame: a string or binary data as it is, anything else as JSON. While disconnected
     * up to `maxQueued` frames wait for the next open; beyond that, and after close(), it throws.
     */
    send(message) {
      this._usable();
      const frame = typeof message === "string" || isBinary(message) ? message : JSON.stringify(message);
      this._enqueue(frame, null);
    }

    /** Close the socket for good: no reconnect. Later calls do nothing. */
    close(code = 1000, reason = "") {
      if (this._closed) return;
      this._closed = true;
      if (this._timer !== null) clearTimeout(this._timer);
      this._timer = null;
      if (typeof root.removeEventListener === "function") root.removeEventListener("online", this._online);
      const gone = failure("pgws: the socket was closed");
      for (const entry of this._channels.values()) this._settle(entry.waiters, null, gone);
      for (const entry of this._rooms.values()) this._settle(entry.waiters, null, gone);
      for (const request of this._requests.values()) request.reject(gone);
      this._requests.clear();
      this._queue = [];
      const ws = this._ws;
      if (ws !== null && ws.readyState !== WebSocket.CLOSED) {
        this._state = CLOSING;
        ws.close(code, reason); // the close event follows, from _lost()
      } else {
        this._ws = null;
        this._state = CLOSED;
        this._emit("close", {code, reason, wasClean: true, willReconnect: false, delay: null});
      }
    }

    // -------------------------------------------------------------- connecting

    async _connect() {
      this._timer = null;
      if (this._closed) return;
      this._state = CONNECTING;
      let token;
      if (this.options.token !== null) {
        try {
          token = await this.options.token();
          if (typeof token !== "string" || token === "") {
            throw new TypeError(`the token function returned ${JSON.stringify(token)}, not a token`);
          }
        } catch (error) {
          if (!this._closed) this._retry(`pgws: no token: ${error && error.message ? error.message : error}`, error);
          return;
        }
        if (this._closed) return;
      }
      let ws;
      try {
        ws = new WebSocket(this._address(token), this._protocols(token));
      } catch (error) {
        this._retry(`pgws: cannot open a socket: ${error.message}`, error);
        return;
      }
      ws.binaryType = this.options.binaryType;
      this._ws = ws;
      ws.onopen = () => this._opened(ws);
      ws.onmessage = (event) => this._received(ws, event.data);
      ws.onclose = (event) => this._lost(ws, event.code, event.reason, event.wasClean);
    }

    _address(token) {
      const url = socketUrl(typeof this.url === "function" ? this.url(token) : this.url);
      if (token !== undefined && this.options.tokenIn === "url" && typeof this.url === "string") {
        url.pathname = url.pathname.replace(/\/$/, "") + "/" + encodeURIComponent(token);
      }
      return url.href;
    }

    _protocols(token) {
      const offered = [].concat(this.options.protocols);
      if (token !== undefined && this.options.tokenIn === "protocol") offered.unshift(token);
      return offered;
    }

    _retry(message, cause) {
      this._emit("error", {error: message, cause});
      this.attempt += 1;
      this._schedule(PgwsSocket.backoff(this.attempt, this.options.random, this.options));
    }

    _schedule(delay) {
      this._state = CONNECTING;
      this._timer = setTimeout(() => {
        this._timer = null;
        this._emit("reconnecting", {attempt: this.attempt});
        this._connect();
      }, delay);
    }

    _reconnectNow() {
      if (this._timer === null || this._closed) return;
      clearTimeout(this._timer);
      this._timer = null;
      this._emit("reconnecting", {attempt: this.attempt});
      this._connect();
    }

    _opened(ws) {
      if (ws !== this._ws) return;
      this.attempt = 0;
      this._state = OPEN;
      const reconnected = this._opens > 0;
      this._opens += 1;
      for (const [channel, entry] of this._channels) this._sendSubscribe(channel, entry);
      for (const room of this._rooms.keys()) ws.send(JSON.stringify({joinRoom: room}));
      const queued = this._queue;
      this._queue = [];
      for (const {frame, id} of queued) {
        const request = this._requests.get(id);
        if (request) request.socket = ws;
        ws.send(frame);
      }
      this._emit("open", {reconnected, protocol: ws.protocol});
    }

    _lost(ws, code, reason, wasClean) {
      if (ws !== this._ws) return;
      this._ws = null;
      this.tabWindowId = null;
      const lost = failure("pgws: the connection closed before the server answered");
      for (const [id, request] of this._requests) {
        if (request.socket !== ws) continue; // still queued for the next socket
        this._requests.delete(id);
        if (request.kind !== "subscribe") request.reject(lost);
      }
      for (const entry of this._channels.values()) {
        entry.subscribed = false;
        entry.request = null;
      }
      for (const entry of this._rooms.values()) entry.joined = false;
      for (const waiters of this._leaving.values()) this._settle(waiters, {event: "left"}, null);
      this._leaving.clear();
      if (this._closed) {
        this._state = CLOSED;
        this._emit("close", {code, reason, wasClean, willReconnect: false, delay: null});
        return;
      }
      let delay;
      const now = Date.now();
      const restart = code === CLOSE_SERVICE_RESTART ? RESTART_HINT.exec(reason || "") : null;
      if (code === CLOSE_JWT_EXPIRED && now - this._lastExpired >= this.options.minDelay) {
        delay = 0; // a fresh token fixes it: no backoff (unless tokens keep expiring at once)
        this._lastExpired = now;
      } else if (restart) {
        // A drain: the server says when to come back; a random share of it more spreads the
        // clients of one batch, so they do not all return at once.
        const after = Math.min(this.options.maxDelay, parseFloat(restart[1]) * 1000);
        delay = Math.round(after * (1 + this.options.random()));
      } else {
        this.attempt += 1;
        delay = PgwsSocket.backoff(this.attempt, this.options.random, this.options);
      }
      this._schedule(delay);
      this._emit("close", {code, reason, wasClean, willReconnect: true, delay});
    }

    // ------------------------------------------------------------------ frames

    _received(ws, data) {
      if (ws !== this._ws) return;
      if (typeof data !== "string") {
        this._emit("message", {data, payload: data, binary: true});
        return;
      }
      let frame;
      try {
        frame = JSON.parse(data);
      } catch (error) {
        this._emit("message", {data, payload: data, text: data});
        return;
      }
      if (isObject(frame)) {
        if (this._control(frame, data)) return;
        if (typeof frame.channel === "string" && "payload" in frame) {
          const detail = {data: frame, channel: frame.channel, payload: frame.payload, id: frame.id, text: data};
          if (typeof frame.offset === "number" && typeof frame.epoch === "string") {
            const last = this._positions.get(frame.channel);
            if (last && last.epoch === frame.epoch && frame.offset <= last.offset) return; // had it
            this._setPosition(frame.channel, {offset: frame.offset, epoch: frame.epoch});
            detail.offset = frame.offset;
            detail.epoch = frame.epoch;
          }
          this._emit("message", detail);
          return;
        }
      }
      this._emit("message", {data: frame, payload: frame, text: data});
    }

    /** Handle a frame of the protocols themselves; false for anything that is the app's. */
    _control(frame, text) {
      const keys = Object.keys(frame);
      if (keys.length === 1 && typeof frame.tabWindowId === "string") {
        this.tabWindowId = frame.tabWindowId;
        this._emit("tabwindow", {tabWindowId: frame.tabWindowId});
        return true;
      }
      switch (frame.event) {
        case "subscribed":
        case "unsubscribed":
        case "published":
          return this._answered(frame);
        case "error":
          if (typeof frame.error !== "string") return false;
          this._refused(frame);
          return true;
        case "joined":
        case "left":
          if (typeof frame.room !== "string") return false;
          this._roomAnswer(frame);
          return true;
        case "streams": // a durable Push endpoint: this socket's user and tab streams
          if (typeof frame.user !== "string") return false;
          for (const name of [frame.user, frame.tab]) {
            if (typeof name === "string") this._quiet(this.subscribe(name));
          }
          this._emit("streams", {user: frame.user, tab: frame.tab, data: frame, text});
          return true;
        case "resync_required":
          if (typeof frame.channel !== "string" || typeof frame.offset !== "number") return false;
          this._setPosition(frame.channel, {offset: frame.offset, epoch: frame.epoch});
          this._answered(frame);
          this._emit("resync_required", {channel: frame.channel, reason: frame.reason, offset: frame.offset,
            epoch: frame.epoch, data: frame, text});
          return true;
        case "resync":
          if (!Array.isArray(frame.channels)) return false;
          this._emit("resync", {channels: frame.channels, reason: frame.reason, data: frame, text});
          return true;
        case "gap":
          if (typeof frame.channel !== "string" || typeof frame.missed !== "number") return false;
          this._emit("gap", {channel: frame.channel, missed: frame.missed, data: frame, text});
          return true;
        default:
          return false;
      }
    }

    _answered(frame) {
      const request = this._requests.get(frame.reply_to);
      if (!request) return false; // an answer to a frame the app sent itself
      this._requests.delete(frame.reply_to);
      if (request.kind === "subscribe") {
        const entry = this._channels.get(request.channel);
        if (typeof frame.offset === "number" && typeof frame.epoch === "string"
            && !this._positions.get(request.channel)) {
          this._setPosition(request.channel, {offset: frame.offset, epoch: frame.epoch}); // live from here
        }
        if (entry && entry.request === frame.reply_to) {
          entry.subscribed = true;
          this._settle(entry.waiters, frame, null);
        }
      } else {
        request.resolve(frame);
      }
      return true;
    }

    _refused(frame) {
      const detail = {error: frame.error, data: frame};
      const request = frame.reply_to !== undefined ? this._requests.get(frame.reply_to) : undefined;
      const error = failure(`pgws: ${frame.error}`, frame);
      if (request) {
        this._requests.delete(frame.reply_to);
        detail.action = request.kind;
        detail.channel = request.channel;
        if (request.kind === "subscribe") {
          const entry = this._channels.get(request.channel);
          if (entry && entry.request === frame.reply_to) {
            this._channels.delete(request.channel); // refused: not retried after reconnects
            this._settle(entry.waiters, null, error);
          }
        } else {
          request.reject(error);
        }
      } else if (typeof frame.room === "string") {
        detail.room = frame.room;
        const entry = this._rooms.get(frame.room);
        if (entry && !entry.joined) {
          detail.action = "joinRoom";
          this._rooms.delete(frame.room); // refused: not rejoined after reconnects
          this._settle(entry.waiters, null, error);
        }
      }
      this._emit("error", detail);
    }

    _roomAnswer(frame) {
      if (frame.event === "joined") {
        const entry = this._rooms.get(frame.room);
        if (entry) {
          entry.joined = true;
          this._settle(entry.waiters, frame, null);
        }
      } else {
        const waiters = this._leaving.get(frame.room);
        this._leaving.delete(frame.room);
        if (waiters) this._settle(waiters, frame, null);
      }
    }

    // ----------------------------------------------------------------- helpers

    _usable() {
      if (this._closed) throw failure("pgws: the socket was closed (close() was called)");
    }

    _id() {
      this._nextId += 1;
      return "pgws-" + this._nextId;
    }

    _sendSubscribe(channel, entry) {
      const id = this._id();
      const action = {action: "subscribe", channel, id};
      if (entry.options.backpressure !== undefined) action.backpressure = entry.options.backpressure;
      const position = this._positions.get(channel);
      if (position) { // a durable channel: resume after what was received
        action.since = position.offset;
        if (typeof position.epoch === "string") action.epoch = position.epoch;
      }
      entry.request = id;
      this._requests.set(id, {kind: "subscribe", channel, socket: this._ws, resolve: null, reject: null});
      this._write(JSON.stringify(action));
    }

    /** The offset and epoch received last on a durable channel, or null. */
    position(channel) {
      const position = this._positions.get(channel);
      return position ? Object.assign({}, position) : null;
    }

    _setPosition(channel, position) {
      if (position === null) this._positions.delete(channel);
      else this._positions.set(channel, position);
      const storage = this.options.storage;
      if (!storage) return;
      try {
        if (position === null) storage.removeItem(this.options.storageKey + channel);
        else storage.setItem(this.options.storageKey + channel, JSON.stringify(position));
      } catch (error) {
        // storage full or unavailable: positions stay in memory
      }
    }

    _loadPosition(channel) {
      const storage = this.options.storage;
      if (!storage) return;
      try {
        const saved = JSON.parse(storage.getItem(this.options.storageKey + channel));
        if (saved && Number.isInteger(saved.offset) && saved.offset >= 0 && typeof saved.epoch === "string") {
          this._positions.set(channel, {offset: saved.offset, epoch: saved.epoch});
        }
      } catch (error) {
        // nothing usable saved
      }
    }

    _request(kind, channel, extra) {
      const id = this._id();
      const frame = JSON.stringify(Object.assign({action: kind, channel}, extra, {id}));
      const promise = new Promise((resolve, reject) => {
        this._requests.set(id, {kind, channel, socket: null, resolve, reject});
      });
      try {
        this._enqueue(frame, id);
      } catch (error) {
        this._requests.delete(id);
        throw error;
      }
      return this._quiet(promise);
    }

    _enqueue(frame, id) {
      if (this._state === OPEN) {
        if (id !== null) this._requests.get(id).socket = this._ws;
        this._write(frame);
        return;
      }
      if (this._queue.length >= this.options.maxQueued) {
        throw failure(`pgws: ${this._queue.length} frames already wait for the connection ` +
          "(option maxQueued); wait for the open event before sending more");
      }
      this._queue.push({frame, id});
    }

    _write(frame) {
      this._ws.send(frame);
    }

    _wait(waiters) {
      return this._quiet(new Promise((resolve, reject) => waiters.push({resolve, reject})));
    }

    /** The app may ignore these promises: the server's refusals are error events too. */
    _quiet(promise) {
      promise.catch(() => {});
      return promise;
    }

    _settle(waiters, value, error) {
      const all = waiters.splice(0);
      for (const waiter of all) {
        if (error) waiter.reject(error);
        else waiter.resolve(value);
      }
    }

    _emit(name, detail) {
      this.dispatchEvent(new CustomEvent(name, {detail}));
    }
  }

  PgwsSocket.CONNECTING = CONNECTING;
  PgwsSocket.OPEN = OPEN;
  PgwsSocket.CLOSING = CLOSING;
  PgwsSocket.CLOSED = CLOSED;
  PgwsSocket.CLOSE_JWT_EXPIRED = CLOSE_JWT_EXPIRED;
  PgwsSocket.CLOSE_SERVICE_RESTART = CLOSE_SERVICE_RESTART;
  PgwsSocket.DEFAULTS = Object.freeze(Object.assign({}, DEFAULTS));

  if (typeof module === "object" && module && module.exports) module.exports = PgwsSocket;
  else root.PgwsSocket = PgwsSocket;
})(typeof globalThis !== "undefined" ? globalThis : this);
