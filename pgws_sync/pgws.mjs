// pgws.mjs: built from pgws.js by tools/build-pgws-esm (edit pgws.js, then run it).
/* pgws.js: the browser client of pgws_sync. Plain JavaScript, no build step, no dependencies.
 *
 *   <script src="/pgws.js"></script>
 *   const sock = new PgwsSocket("/ws");
 *   sock.on("message", (m) => console.log(m.channel, m.payload));
 *   sock.subscribe("chat");
 *
 * One PgwsSocket is one WebSocket that comes back by itself: it reconnects with
 * Fibonacci backoff (1.2, 1.2, 2.4, 3.6, 6.0 s... with jitter, at most 30 s, reset once
 * a socket stayed open 5 s), then subscribes to its channels and joins its rooms again.
 * It offers the subprotocol pgws.v2, in which the server wraps every app frame in an
 * envelope, so no payload is ever taken for a protocol frame. After 25 s of silence it
 * pings; no answer within 10 s (or no open within 10 s) closes the socket and reconnects.
 * With a `token` function it fetches a fresh token before every connect, right away when
 * the server closes with 3001 (JWT expired), and when a draining server closes with 1012
 * "reconnect after N s", after N to 2N seconds; a close with 4400-4499 stops it for good.
 * Server frames become events: message, subscribed (also when the server subscribes it), unsubscribed
 * (when the server ends a subscription), join, leave, presence_count, resync, resync_required, gap,
 * tabwindow, streams, error; and open, close, reconnecting for the connection itself. On
 * durable channels it keeps the last offset and epoch of each channel (in memory, or in
 * `storage` such as sessionStorage), moved once the app's message handlers have run (or
 * by `commit()`), and resumes with them after every reconnect. `live(channel, {load})` keeps a
 * watched table's rows by key (docs/guides/live-tables.md). See docs/guides/browser-client.md.
 */
const PgwsSocket = (function (root) {
  "use strict";

  const CONNECTING = 0;
  const OPEN = 1;
  const CLOSING = 2;
  const CLOSED = 3;
  const CLOSE_JWT_EXPIRED = 3001;
  const CLOSE_SERVICE_RESTART = 1012; // a drain: the reason says "reconnect after N s"
  const CLOSE_ABNORMAL = 1006; // what a socket this client gave up on reports
  const RESTART_HINT = /reconnect after (\d+(?:\.\d+)?)\s*s/;
  const SUBPROTOCOL = "pgws.v2";
  const USER_STREAM = "pgws:user:";
  const TAB_STREAM = "pgws:tab:";
  const MESSAGE_PREFIX = '{"message":';

  const DEFAULTS = {
    minDelay: 1200, // ms: the first reconnect delays (then Fibonacci multiples)
    maxDelay: 30000, // ms: no reconnect delay is longer
    jitter: 0.2, // each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    resetAfter: 5000, // ms a socket must stay open before the backoff starts over
    heartbeatInterval: 25000, // ms of silence before a ping (0: no heartbeat)
    heartbeatTimeout: 10000, // ms a ping may wait for any frame before the socket is dropped
    connectTimeout: 10000, // ms a socket may take to open (0: no limit)
    requestTimeout: 10000, // ms a sent request may wait for its answer (0: no limit)
    publishTimeout: 30000, // ms a publish() may wait for a socket before it fails (0: no limit)
    token: null, // () => string | Promise<string>, called before every connect
    tokenIn: "url", // "url": a last path segment (or the url function's argument); "protocol"
    protocols: [], // WebSocket subprotocols to offer (pgws.v2 is offered after them)
    envelope: true, // offer pgws.v2: app frames arrive in an envelope
    maxQueued: 100, // publish()/send() frames kept while disconnected
    binaryType: "arraybuffer", // or "blob": what binary messages arrive as
    random: Math.random, // the jitter's source of numbers in [0, 1)
    commit: "auto", // "auto": positions move after the message handlers; "manual": commit()
    storage: null, // e.g. sessionStorage: durable positions survive a page reload
    storageKey: "pgws:", // prefix of the storage keys (then the endpoint URL and the channel)
    storageDelay: 100, // ms: position writes are batched over this long
    drainDelay: 5000, // ms the previous tab's stream stays, read to its end, for pushes on their way
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

  /** Whether `frame`'s keys are all among `allowed` and include every one of `required`. */
  function shaped(frame, required, optional = []) {
    const keys = Object.keys(frame);
    if (keys.length > required.length + optional.length) return false;
    for (const key of required) if (!(key in frame)) return false;
    return keys.every((key) => required.includes(key) || optional.includes(key));
  }

  function checkName(what, name) {
    if (typeof name !== "string" || name === "") {
      throw new TypeError(`pgws: ${what} must be a non-empty string, got ${JSON.stringify(name)}`);
    }
  }

  function failure(message, frame, code, temporary) {
    const error = new Error(message);
    if (frame !== undefined) error.frame = frame;
    if (code !== undefined) {
      error.code = code;
      error.temporary = Boolean(temporary);
    }
    return error;
  }

  /** A refusal's code, and whether trying again later may succeed. */
  function refusal(text) {
    if (/^too many subscriptions/.test(text)) return ["too_many_subscriptions", true];
    if (/^rate limited/.test(text)) return ["rate_limited", true];
    if (/^not allowed/.test(text)) return ["forbidden", false];
    if (/^payload too large|^message too large/.test(text)) return ["too_large", false];
    if (/^invalid 'since'/.test(text)) return ["invalid_position", false];
    if (/failed: internal error$|ended: internal error$/.test(text)) return ["internal", true];
    return ["refused", false];
  }

  /** Random letters no payload can guess: the request ids of one socket object. */
  function randomToken() {
    const bytes = new Uint8Array(9);
    if (root.crypto && typeof root.crypto.getRandomValues === "function") root.crypto.getRandomValues(bytes);
    else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    return Array.from(bytes, (b) => b.toString(36).padStart(2, "0")).join("");
  }

  function report(error) {
    if (typeof root.reportError === "function") root.reportError(error);
    else if (typeof console !== "undefined") console.error(error);
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

  /** Whether a browser lets a page close a socket with `code` and `reason` (else it throws). */
  function closeProblem(code, reason) {
    if (!Number.isInteger(code) || (code !== 1000 && !(code >= 3000 && code <= 4999))) {
      return `pgws: close code ${code} is not allowed: use 1000 or 3000-4999`;
    }
    if (typeof reason !== "string" || new TextEncoder().encode(reason).length > 123) {
      return "pgws: a close reason must be text of at most 123 UTF-8 bytes";
    }
    return null;
  }

  /** One channel (or room) of a PgwsSocket: its own events, and the socket's calls for it. */
  class PgwsChannel {
    constructor(sock, name) {
      this.socket = sock;
      this.name = name;
    }

    /** Call `fn(detail)` for each `name` event about this channel; returns a function that stops it. */
    on(name, fn) {
      const channel = this.name;
      return this.socket.on(name, (detail) => {
        const about = detail && (detail.channel === channel || detail.room === channel ||
          (Array.isArray(detail.channels) && detail.channels.includes(channel)));
        if (about) fn.call(this, detail);
      });
    }

    subscribe(options) {
      return this.socket.subscribe(this.name, options);
    }

    unsubscribe() {
      return this.socket.unsubscribe(this.name);
    }

    publish(payload) {
      return this.socket.publish(this.name, payload);
    }

    joinRoom() {
      return this.socket.joinRoom(this.name);
    }

    leaveRoom() {
      return this.socket.leaveRoom(this.name);
    }

    position() {
      return this.socket.position(this.name);
    }

    commit(offset, epoch) {
      return this.socket.commit(this.name, offset, epoch);
    }
  }

  // ---------------------------------------------------------------- live tables

  /** Whether transaction `xid` is visible in a snapshot's text "xmin:xmax:xip,...". */
  function visibleIn(snapshot, xid) {
    if (snapshot === null || typeof xid !== "number") return false;
    if (xid < snapshot.xmin) return true;
    if (xid >= snapshot.xmax) return false;
    return !snapshot.running.has(xid);
  }

  function parseSnapshot(text) {
    const parts = typeof text === "string" ? text.split(":") : [];
    if (parts.length !== 3) return null;
    return {xmin: Number(parts[0]), xmax: Number(parts[1]),
      running: new Set(parts[2] === "" ? [] : parts[2].split(",").map(Number))};
  }

  /**
   * A watched table's rows on one durable channel, kept by primary key: `load()` returns
   * {rows, position} (pgws_sync.load_live), the collection follows every change after it,
   * resumes across reconnects and loads again after resync_required. Events: load, change,
   * insert, update, delete, error.
   */
  class PgwsLive extends EventTarget {
    constructor(socket, channel, options) {
      super();
      if (!options || typeof options.load !== "function") {
        throw new TypeError("pgws: live() needs {load}: a function returning {rows, position}");
      }
      this.socket = socket;
      this.channel = channel;
      this.options = Object.assign({retryDelay: 2000}, options);
      this.loaded = false;
      this._rows = new Map();
      this._key = [];
      this._snapshot = null;
      this._loading = null;
      this._closed = false;
      this._retry = null;
      this._off = [
        socket.on("message", (m) => this._message(m)),
        socket.on("resync_required", (r) => { if (r.channel === channel) this.reload().catch(() => {}); }),
      ];
      this.ready = this.reload();
      this.ready.catch(() => {});
    }

    /** The rows, in the order they were loaded or inserted. */
    rows() {
      return Array.from(this._rows.values());
    }

    /** The row with these primary key values (in key order), or undefined. */
    get(...key) {
      return this._rows.get(JSON.stringify(key));
    }

    get size() {
      return this._rows.size;
    }

    on(name, fn) {
      const listener = (event) => fn.call(this, event.detail);
      this.addEventListener(name, listener);
      return () => this.removeEventListener(name, listener);
    }

    /** Load the rows again and follow from their position (what resync_required does). */
    reload() {
      if (this._closed) return Promise.reject(new Error("pgws: this live collection is closed"));
      if (this._loading === null) {
        this._loading = this._load().finally(() => { this._loading = null; });
      }
      return this._loading;
    }

    /** Stop following: unsubscribe and drop the listeners. */
    close() {
      if (this._closed) return;
      this._closed = true;
      if (this._retry !== null) clearTimeout(this._retry);
      for (const off of this._off) off();
      this.socket._quiet(this.socket.unsubscribe(this.channel));
    }

    async _load() {
      this.loaded = false;
      // frames of an earlier subscription end before the server's answer to this
      if (this.socket._channels.has(this.channel)) await this.socket.unsubscribe(this.channel).catch(() => {});
      let data;
      try {
        data = await this.options.load();
      } catch (error) {
        this._failed(`pgws: loading live channel '${this.channel}' failed: ${error && error.message}`, error);
        throw error;
      }
      const position = data && data.position;
      if (!data || !Array.isArray(data.rows) || !isObject(position) || !Number.isInteger(position.offset) ||
          typeof position.epoch !== "string" || !Array.isArray(position.key)) {
        const error = new TypeError("pgws: live load() must return {rows, position} as pgws_sync.load_live makes");
        this._failed(error.message, error);
        throw error;
      }
      if (this._closed) return this;
      this._key = position.key;
      this._snapshot = parseSnapshot(position.snapshot);
      this._rows = new Map();
      for (const row of data.rows) this._rows.set(JSON.stringify(this._key.map((k) => row[k])), row);
      this.loaded = true;
      this.dispatchEvent(new CustomEvent("load", {detail: {rows: this.rows(), position}}));
      try {
        await this.socket.subscribe(this.channel, {since: position.offset, epoch: position.epoch});
      } catch (error) {
        this.dispatchEvent(new CustomEvent("error", {detail: {error: error.message, cause: error}}));
        throw error;
      }
      return this;
    }

    _failed(message, cause) {
      this.dispatchEvent(new CustomEvent("error", {detail: {error: message, cause}}));
      if (!this._closed && this._retry === null) {
        this._retry = setTimeout(() => {
          this._retry = null;
          if (!this._closed) this.reload().catch(() => {});
        }, this.options.retryDelay);
      }
    }

    _message(m) {
      if (m.channel !== this.channel || m.offset === undefined || !this.loaded) return;
      const change = m.payload;
      if (!isObject(change) || !isObject(change.key) || !["insert", "update", "delete"].includes(change.op)) return;
      if (visibleIn(this._snapshot, change.xid)) return; // already in the loaded rows
      if (change.too_large) { // the row was above the log's limit: only its key came
        this.reload().catch(() => {});
        return;
      }
      const id = JSON.stringify(Object.values(change.key));
      const previous = this._rows.get(id);
      if (change.op === "delete") this._rows.delete(id);
      else this._rows.set(id, change.row);
      const detail = {op: change.op, key: change.key, row: change.op === "delete" ? null : change.row,
        previous, offset: m.offset, change};
      this.dispatchEvent(new CustomEvent(change.op, {detail}));
      this.dispatchEvent(new CustomEvent("change", {detail}));
    }
  }

  class PgwsSocket extends EventTarget {
    /**
     * `url`: a ws(s):// URL, a path on the page's host ("/ws"), or a function
     * (token) => URL called before every connect. `options`: see DEFAULTS.
     */
    constructor(url, options = {}) {
      super();
      const opts = Object.assign({}, DEFAULTS, options);
      if (options.maxDelay === undefined && opts.minDelay > opts.maxDelay) opts.maxDelay = opts.minDelay;
      let scope = "";
      if (typeof url === "string") scope = socketUrl(url).href + "|"; // a bad URL fails here
      else if (typeof url !== "function") throw new TypeError("pgws: url must be a string or a function");
      if (!(opts.minDelay > 0) || !(opts.maxDelay >= opts.minDelay)) {
        throw new RangeError("pgws: minDelay must be positive and maxDelay at least minDelay (ms)");
      }
      if (!(opts.jitter >= 0 && opts.jitter < 1)) throw new RangeError("pgws: jitter must be in [0, 1)");
      for (const name of ["resetAfter", "heartbeatInterval", "heartbeatTimeout", "connectTimeout",
        "requestTimeout", "publishTimeout", "storageDelay", "drainDelay"]) {
        if (!(opts[name] >= 0)) throw new RangeError(`pgws: ${name} must be 0 or more (ms)`);
      }
      if (opts.heartbeatInterval > 0 && !(opts.heartbeatTimeout > 0)) {
        throw new RangeError("pgws: heartbeatTimeout must be positive (ms) when heartbeatInterval is");
      }
      if (opts.token !== null && typeof opts.token !== "function") {
        throw new TypeError("pgws: token must be a function returning a token (or a promise of one)");
      }
      if (opts.tokenIn !== "url" && opts.tokenIn !== "protocol") {
        throw new TypeError('pgws: tokenIn must be "url" or "protocol"');
      }
      if (opts.commit !== "auto" && opts.commit !== "manual") {
        throw new TypeError('pgws: commit must be "auto" or "manual"');
      }
      this.url = url;
      this.options = opts;
      /** The id the server gave this socket's current connection (Push endpoints), or null. */
      this.tabWindowId = null;
      /** Failed connects since the backoff last started over; the next delay grows with it. */
      this.attempt = 0;
      this._state = CONNECTING;
      this._ws = null;
      this._v2 = false; // the current socket speaks pgws.v2
      this._received = 0; // frames received on the current socket
      this._timer = null; // the reconnect
      this._connectTimer = null;
      this._stableTimer = null;
      this._beatTimer = null;
      this._ping = null; // {id, sent} while a heartbeat ping waits for an answer
      this._lastFrame = 0;
      this._closed = false;
      this._opens = 0;
      this._lastExpired = -Infinity;
      this._ids = "pgws-" + randomToken() + "-";
      this._nextId = 0;
      this._channels = new Map(); // channel -> {options, subscribed, request, since, head, waiters, retry}
      this._leavingChannels = new Set(); // unsubscribed, the server's answer not yet in
      this._positions = new Map(); // durable channel -> {offset, epoch}: committed (resumed from)
      this._seen = new Map(); // durable channel -> {offset, epoch}: delivered on this subscription
      this._rooms = new Map(); // room -> {joined, waiters}
      this._leaving = new Map(); // room -> waiters of leaveRoom()
      this._requests = new Map(); // id -> {kind, channel, socket, resolve, reject, timer}
      this._queue = []; // frames of publish()/send() waiting for a socket: {frame, id}
      this._handles = new Map(); // name -> PgwsChannel
      this._scope = opts.storageKey + scope;
      this._dirty = new Set(); // channels whose position is not written to storage yet
      this._flushTimer = null;
      this._tabStream = null; // this tab's durable Push stream
      this._oldTab = null; // the previous tab's, read until drained
      this._drainTimer = null;
      this._failed = false; // a message handler threw during the current event
      this._listeners = {
        online: () => this._wake(),
        offline: () => this._drop("offline"),
        visibilitychange: () => this._visible(),
        pagehide: () => this._flush(),
      };
      for (const [name, fn] of Object.entries(this._listeners)) this._listen(name, fn, true);
      this._loadTab();
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

    /** The socket speaks pgws.v2: app frames arrive in an envelope. */
    get enveloped() {
      return this._v2;
    }

    /** The channels this socket is subscribed to (or will be once connected). */
    get channels() {
      return Array.from(this._channels.keys());
    }

    /** The rooms this socket is in (or will join once connected). */
    get rooms() {
      return Array.from(this._rooms.keys());
    }

    /**
     * Call `fn(detail)` for each `name` event; returns a function that stops it. A `message`
     * handler that throws keeps its message's position from moving (the error is reported).
     */
    on(name, fn) {
      const listener = (event) => {
        try {
          fn.call(this, event.detail);
        } catch (error) {
          this._failed = true;
          report(error);
        }
      };
      this.addEventListener(name, listener);
      return () => this.removeEventListener(name, listener);
    }

    // ------------------------------------------------------------ app actions

    /** A handle on one channel (or room): `sock.channel("chat").on("message", fn)`, `.subscribe()`... */
    channel(name) {
      checkName("channel", name);
      if (!this._handles.has(name)) this._handles.set(name, new PgwsChannel(this, name));
      return this._handles.get(name);
    }

    /**
     * Subscribe to a PubSub channel, now and after every reconnect. Resolves once subscribed.
     * `options.since` (and `epoch`): on a durable channel, start after that offset instead of
     * the saved position; `backpressure`: the server's policy for this channel.
     */
    subscribe(channel, options = {}) {
      checkName("channel", channel);
      this._usable();
      if (options.since !== undefined && !(Number.isInteger(options.since) && options.since >= 0)) {
        throw new RangeError(`pgws: since must be an offset (an integer, 0 or more), got ${options.since}`);
      }
      if (options.epoch !== undefined && typeof options.epoch !== "string") {
        throw new TypeError("pgws: epoch must be a string (as a message's epoch)");
      }
      let entry = this._channels.get(channel);
      const positioned = options.since !== undefined;
      if (entry && entry.subscribed && entry.options.backpressure === options.backpressure && !positioned) {
        return Promise.resolve({event: "subscribed", channel});
      }
      this._leavingChannels.delete(channel);
      if (!entry) {
        entry = {options: {}, subscribed: false, request: null, since: undefined, head: undefined,
          waiters: [], retry: null};
        this._channels.set(channel, entry);
      }
      const changed = entry.options.backpressure !== options.backpressure || positioned;
      entry.options = {backpressure: options.backpressure};
      if (positioned) this._setPosition(channel, {offset: options.since, epoch: options.epoch});
      else if (!this._positions.has(channel)) this._loadPosition(channel);
      const promise = this._wait(entry.waiters);
      if (this._state === OPEN && (entry.request === null || changed)) this._sendSubscribe(channel, entry);
      return promise;
    }

    /**
     * A live table on durable `channel`: `options.load()` returns {rows, position} (a route
     * answering pgws_sync.load_live), and the collection follows every change after it.
     */
    live(channel, options) {
      checkName("channel", channel);
      this._usable();
      return new PgwsLive(this, channel, options);
    }

    /** Forget a channel and unsubscribe from it. Resolves with the server's reply (at once if offline). */
    unsubscribe(channel) {
      checkName("channel", channel);
      const entry = this._channels.get(channel);
      if (entry) {
        this._channels.delete(channel);
        if (entry.retry !== null) clearTimeout(entry.retry);
        this._settle(entry.waiters, null, failure(`pgws: unsubscribed from '${channel}' before the server answered`));
      }
      this._seen.delete(channel);
      this._setPosition(channel, null);
      if (channel === this._oldTab) this._oldTab = null;
      if (this._state !== OPEN || this._closed) return Promise.resolve({event: "unsubscribed", channel});
      this._leavingChannels.add(channel); // frames already on their way are not the app's any more
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

    /**
     * Manual commit (option commit: "manual"): the app has handled `channel` up to `offset`
     * (of `epoch`, by default the epoch of the messages received); a reconnect or a reload
     * resumes after it. Commits never move a position back.
     */
    commit(channel, offset, epoch) {
      checkName("channel", channel);
      if (!(Number.isInteger(offset) && offset >= 0)) {
        throw new RangeError(`pgws: commit needs an offset (an integer, 0 or more), got ${offset}`);
      }
      if (!this._follows(channel)) return false; // no longer followed
      const seen = this._seen.get(channel) || this._positions.get(channel);
      const at = {offset, epoch: epoch !== undefined ? epoch : seen && seen.epoch};
      const now = this._positions.get(channel);
      if (now && now.epoch === at.epoch && now.offset >= offset) return false;
      this._setPosition(channel, at);
      return true;
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
        if (!this._positions.has(room)) this._loadPosition(room);
      }
      const promise = this._wait(entry.waiters, true);
      if (fresh && this._state === OPEN) this._sendJoin(room);
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
      this._seen.delete(room);
      this._setPosition(room, null);
      if (this._state !== OPEN || this._closed) return Promise.resolve({event: "left", room});
      const waiters = this._leaving.get(room) || [];
      this._leaving.set(room, waiters);
      const promise = this._wait(waiters, true);
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

    /**
     * Close the socket for good: no reconnect. Pending requests are rejected and the close event
     * is the last event. A code browsers refuse (other than 1000 and 3000-4999) throws first,
     * and changes nothing. Later calls do nothing.
     */
    close(code = 1000, reason = "") {
      if (this._closed) return;
      const problem = closeProblem(code, reason);
      if (problem !== null) throw new RangeError(problem);
      this._closed = true;
      this._flush();
      this._clearTimers();
      for (const [name, fn] of Object.entries(this._listeners)) this._listen(name, fn, false);
      const gone = failure("pgws: the socket was closed");
      for (const entry of this._channels.values()) this._settle(entry.waiters, null, gone);
      for (const entry of this._rooms.values()) this._settle(entry.waiters, null, gone);
      for (const waiters of this._leaving.values()) this._settle(waiters, {event: "left"}, null);
      this._leaving.clear();
      const requests = Array.from(this._requests.values());
      this._requests.clear();
      for (const request of requests) this._fail(request, gone);
      this._queue = [];
      const ws = this._ws;
      this._ws = null;
      this.tabWindowId = null;
      if (ws !== null) {
        this._detach(ws);
        try {
          ws.close(code, reason);
        } catch (error) {
          // closed already
        }
      }
      this._state = CLOSED;
      this._emit("close", {code, reason, wasClean: true, willReconnect: false, delay: null});
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
        if (this._closed || this._ws !== null || this._timer !== null) return;
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
      this._received = 0;
      ws.onopen = () => this._opened(ws);
      ws.onmessage = (event) => this._receive(ws, event.data);
      ws.onclose = (event) => this._lost(ws, event.code, event.reason, event.wasClean);
      if (this.options.connectTimeout > 0) {
        this._connectTimer = setTimeout(() => {
          this._connectTimer = null;
          if (ws === this._ws && this._state !== OPEN) {
            this._drop(`no open within ${this.options.connectTimeout} ms`);
          }
        }, this.options.connectTimeout);
      }
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
      if (this.options.envelope && !offered.includes(SUBPROTOCOL)) offered.push(SUBPROTOCOL);
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

    /** The page became visible: see _wake. */
    _visible() {
      if (!root.document || root.document.visibilityState === "visible") this._wake();
    }

    /** Back online, or visible again: reconnect at once if waiting, else ping the socket now. */
    _wake() {
      if (this._timer !== null) this._reconnectNow();
      else if (this._state === OPEN && this._ping === null) this._beat(true);
    }

    /** Give up on the current socket now (dead, or offline) and reconnect with backoff. */
    _drop(reason) {
      const ws = this._ws;
      if (ws === null || this._closed) return;
      this._detach(ws);
      try {
        ws.close(4000, reason.slice(0, 60));
      } catch (error) {
        // closed already
      }
      this._lost(ws, CLOSE_ABNORMAL, reason, false);
    }

    _detach(ws) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onclose = null;
    }

    _opened(ws) {
      if (ws !== this._ws || this._closed) return;
      if (this._connectTimer !== null) clearTimeout(this._connectTimer);
      this._connectTimer = null;
      this._state = OPEN;
      this._v2 = ws.protocol === SUBPROTOCOL;
      const reconnected = this._opens > 0;
      this._opens += 1;
      if (this.options.resetAfter > 0) {
        this._stableTimer = setTimeout(() => {
          this._stableTimer = null;
          this.attempt = 0;
        }, this.options.resetAfter);
      } else {
        this.attempt = 0;
      }
      this._lastFrame = Date.now();
      this._beat(false);
      for (const [channel, entry] of this._channels) this._sendSubscribe(channel, entry);
      for (const room of this._rooms.keys()) this._sendJoin(room);
      const queued = this._queue;
      this._queue = [];
      for (const {frame, id} of queued) {
        const request = this._requests.get(id);
        if (request) this._sent(request);
        ws.send(frame);
      }
      this._emit("open", {reconnected, protocol: ws.protocol, enveloped: this._v2});
    }

    _lost(ws, code, reason, wasClean) {
      if (ws !== this._ws || this._closed) return;
      this._ws = null;
      this.tabWindowId = null;
      this._v2 = false;
      this._clearTimers();
      const lost = failure("pgws: the connection closed before the server answered");
      for (const [id, request] of this._requests) {
        if (request.socket !== ws) continue; // still queued for the next socket
        this._requests.delete(id);
        if (request.kind !== "subscribe") this._fail(request, lost);
        else clearTimeout(request.timer);
      }
      for (const entry of this._channels.values()) {
        entry.subscribed = false;
        entry.request = null;
        if (entry.retry !== null) clearTimeout(entry.retry);
        entry.retry = null;
      }
      this._leavingChannels.clear();
      for (const entry of this._rooms.values()) entry.joined = false;
      for (const waiters of this._leaving.values()) this._settle(waiters, {event: "left"}, null);
      this._leaving.clear();
      if (code >= 4400 && code <= 4499) { // the server says: do not come back
        this._closed = true;
        this._flush();
        for (const [name, fn] of Object.entries(this._listeners)) this._listen(name, fn, false);
        const gone = failure(`pgws: the server closed the socket for good (${code} ${reason})`);
        for (const entry of this._channels.values()) this._settle(entry.waiters, null, gone);
        for (const entry of this._rooms.values()) this._settle(entry.waiters, null, gone);
        for (const request of this._requests.values()) this._fail(request, gone);
        this._requests.clear();
        this._queue = [];
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

    _clearTimers() {
      for (const name of ["_timer", "_connectTimer", "_stableTimer", "_beatTimer", "_drainTimer"]) {
        if (this[name] !== null) clearTimeout(this[name]);
        this[name] = null;
      }
      this._ping = null;
    }

    // --------------------------------------------------------------- heartbeat

    /** Arm the heartbeat: a ping after heartbeatInterval ms of silence (`now`: at once). */
    _beat(now) {
      const interval = this.options.heartbeatInterval;
      if (!(interval > 0) || this._state !== OPEN) return;
      if (this._beatTimer !== null) clearTimeout(this._beatTimer);
      this._beatTimer = null;
      const idle = Date.now() - this._lastFrame;
      if (this._ping !== null) {
        const waited = Date.now() - this._ping.sent;
        if (waited >= this.options.heartbeatTimeout) {
          this._drop(`no answer to a ping within ${this.options.heartbeatTimeout} ms`);
          return;
        }
        this._beatTimer = setTimeout(() => this._beat(false), this.options.heartbeatTimeout - waited);
        return;
      }
      if (!now && idle < interval) {
        this._beatTimer = setTimeout(() => this._beat(false), interval - idle);
        return;
      }
      this._ping = {id: this._id(), sent: Date.now()};
      this._write(JSON.stringify({action: "ping", id: this._ping.id}));
      this._beatTimer = setTimeout(() => this._beat(false), this.options.heartbeatTimeout);
    }

    // ------------------------------------------------------------------ frames

    _receive(ws, data) {
      if (ws !== this._ws || this._closed) return;
      const first = this._received === 0;
      this._received += 1;
      this._lastFrame = Date.now();
      this._ping = null; // any frame shows the connection is alive
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
        if (this._v2) {
          const keys = Object.keys(frame);
          if (keys.length === 1 && keys[0] === "message") {
            const exact = data.startsWith(MESSAGE_PREFIX) && data.endsWith("}");
            this._app(frame.message, exact ? data.slice(MESSAGE_PREFIX.length, -1) : JSON.stringify(frame.message));
            return;
          }
          if (keys.length === 1 && keys[0] === "text" && typeof frame.text === "string") {
            this._appText(frame.text);
            return;
          }
        }
        if (this._control(frame, data, first)) return;
      }
      this._app(frame, data);
    }

    /** Raw app text (a JWT gateway's payload): JSON if it parses, else the text itself. */
    _appText(text) {
      let value;
      try {
        value = JSON.parse(text);
      } catch (error) {
        this._emit("message", {data: text, payload: text, text});
        return;
      }
      this._app(value, text);
    }

    /** An app frame: a channel's message (a durable one moves its position) or a payload. */
    _app(frame, text) {
      if (isObject(frame) && typeof frame.channel === "string" && "payload" in frame) {
        const channel = frame.channel;
        if (this._leavingChannels.has(channel)) return; // unsubscribed: in flight, not wanted
        const detail = {data: frame, channel, payload: frame.payload, id: frame.id, text};
        const durable = typeof frame.offset === "number" && typeof frame.epoch === "string";
        if (!durable) {
          this._emit("message", detail);
          return;
        }
        if (!this._follows(channel)) return; // a channel (or room) no longer followed
        const at = {offset: frame.offset, epoch: frame.epoch};
        const last = this._seen.get(channel) || this._positions.get(channel);
        if (last && last.epoch === at.epoch && at.offset <= last.offset) return; // had it
        this._seen.set(channel, at);
        detail.offset = at.offset;
        detail.epoch = at.epoch;
        const handled = this._emit("message", detail);
        if (handled && this.options.commit === "auto" && this._follows(channel)) {
          this._setPosition(channel, at);
        }
        this._drained(channel);
        return;
      }
      this._emit("message", {data: frame, payload: frame, text});
    }

    // ------------------------------------------- presence and server-side control

    /**
     * Who is subscribed to `channel`, in every worker: resolves with the server's reply,
     * `{event: "presence", channel, count, members: [{client, info}, ...]}` (`count` exact,
     * `members` cut at the server's max_presence_members). Needs PubSub(presence=True).
     */
    presence(channel) {
      checkName("channel", channel);
      try {
        this._usable();
        return this._request("presence", channel, {});
      } catch (error) {
        return this._quiet(Promise.reject(error));
      }
    }

    /**
     * A presence event (join, leave, presence_count), a presence reply, or a subscription the
     * server made or ended (subscribe_matching / unsubscribe_matching: no reply_to); false if
     * `frame` is none of them.
     */
    _presenceOrServer(frame, request) {
      switch (frame.event) {
        case "presence":
          return request !== undefined && request.kind === "presence" &&
            shaped(frame, ["event", "channel", "reply_to", "count", "members"]) &&
            this._answered(frame);
        case "join": // `replaces`: the member (a drain closed its socket) this one takes the place of
          if (!shaped(frame, ["event", "channel", "member"], ["replaces"]) || !isObject(frame.member)) return false;
          this._emit("join", {channel: frame.channel, member: frame.member, replaces: frame.replaces});
          return true;
        case "leave":
          if (!shaped(frame, ["event", "channel", "member"]) || !isObject(frame.member)) return false;
          this._emit("leave", {channel: frame.channel, member: frame.member});
          return true;
        case "presence_count":
          if (!shaped(frame, ["event", "channel", "count"])) return false;
          this._emit("presence_count", {channel: frame.channel, count: frame.count});
          return true;
        case "subscribed": { // the server subscribed this socket: followed after reconnects too
          if ("reply_to" in frame || !shaped(frame, ["event", "channel"], ["server", "offset", "epoch"]) ||
              typeof frame.channel !== "string") return false;
          let entry = this._channels.get(frame.channel);
          if (!entry) {
            entry = {options: {}, subscribed: true, request: null, since: undefined, head: undefined,
              waiters: [], retry: null};
            this._channels.set(frame.channel, entry);
          }
          entry.subscribed = true;
          this._leavingChannels.delete(frame.channel);
          this._emit("subscribed", {channel: frame.channel, resumed: false, server: true,
            offset: frame.offset, epoch: frame.epoch});
          return true;
        }
        case "unsubscribed": { // the server ended this subscription: not renewed after reconnects
          if ("reply_to" in frame || !shaped(frame, ["event", "channel"], ["server"]) ||
              typeof frame.channel !== "string") return false;
          const entry = this._channels.get(frame.channel);
          if (entry) {
            this._channels.delete(frame.channel);
            if (entry.retry !== null) clearTimeout(entry.retry);
          }
          this._emit("unsubscribed", {channel: frame.channel, server: true});
          return true;
        }
        default:
          return false;
      }
    }

    /** Handle a frame of the protocols themselves, in its exact shape; false for the app's. */
    _control(frame, text, first) {
      if (first && shaped(frame, ["tabWindowId"]) && typeof frame.tabWindowId === "string") {
        this.tabWindowId = frame.tabWindowId;
        this._emit("tabwindow", {tabWindowId: frame.tabWindowId});
        return true;
      }
      const request = "reply_to" in frame ? this._requests.get(frame.reply_to) : undefined;
      if (this._presenceOrServer(frame, request)) return true;
      switch (frame.event) {
        case "pong":
          return shaped(frame, ["event", "reply_to"]) && typeof frame.reply_to === "string" &&
            frame.reply_to.startsWith(this._ids);
        case "subscribed":
          return request !== undefined && (request.kind === "subscribe" || request.kind === "joinRoom") &&
            shaped(frame, ["event", "channel", "reply_to"], ["offset", "epoch"]) && this._answered(frame);
        case "unsubscribed":
          return request !== undefined && request.kind === "unsubscribe" &&
            shaped(frame, ["event", "channel", "reply_to"]) && this._answered(frame);
        case "published":
          return request !== undefined && request.kind === "publish" &&
            shaped(frame, ["event", "channel", "reply_to"], ["id"]) && this._answered(frame);
        case "error":
          return typeof frame.error === "string" && this._refused(frame, request);
        case "joined": // on a durable Push endpoint with the position the room is live from
          if (!shaped(frame, ["event", "room"], ["offset", "epoch"]) || typeof frame.room !== "string") return false;
          if (!this._rooms.has(frame.room) || this._rooms.get(frame.room).joined) return false;
          this._roomAnswer(frame);
          return true;
        case "left":
          if (!shaped(frame, ["event", "room"]) || !this._leaving.has(frame.room)) return false;
          this._roomAnswer(frame);
          return true;
        case "streams": // a durable Push endpoint: this socket's user and tab streams
          if (!shaped(frame, ["event", "user"], ["tab"]) || typeof frame.user !== "string" ||
              !frame.user.startsWith(USER_STREAM)) return false;
          if (frame.tab !== undefined && (typeof frame.tab !== "string" || !frame.tab.startsWith(TAB_STREAM))) {
            return false;
          }
          this._streams(frame.user, frame.tab);
          this._emit("streams", {user: frame.user, tab: frame.tab, data: frame, text});
          return true;
        case "resync_required": {
          if (!shaped(frame, ["event", "channel", "reason", "epoch", "offset"], ["reply_to"]) ||
              typeof frame.channel !== "string" || !Number.isInteger(frame.offset)) return false;
          const mine = request !== undefined && (request.kind === "subscribe" || request.kind === "joinRoom") &&
            request.channel === frame.channel;
          if (!mine && !this._follows(frame.channel)) return false;
          const at = {offset: frame.offset, epoch: frame.epoch};
          this._seen.set(frame.channel, at);
          this._emit("resync_required", {channel: frame.channel, reason: frame.reason, offset: frame.offset,
            epoch: frame.epoch, data: frame, text});
          if (this._follows(frame.channel)) this._setPosition(frame.channel, at); // after the handlers
          if (mine) this._answered(frame);
          this._drained(frame.channel);
          return true;
        }
        case "resync":
          if (!shaped(frame, ["event", "channels", "reason"]) || !Array.isArray(frame.channels) ||
              !frame.channels.every((c) => typeof c === "string")) return false;
          this._emit("resync", {channels: frame.channels, reason: frame.reason, data: frame, text});
          return true;
        case "gap":
          if (!shaped(frame, ["event", "channel", "missed"]) || typeof frame.channel !== "string" ||
              typeof frame.missed !== "number" || !this._channels.has(frame.channel)) return false;
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
      clearTimeout(request.timer);
      if (request.kind === "unsubscribe") this._leavingChannels.delete(request.channel);
      if (request.kind === "joinRoom") { // a durable room rejoined after its position
        const room = this._rooms.get(request.channel);
        if (frame.event === "subscribed" && !this._positions.get(request.channel) &&
            typeof frame.offset === "number" && typeof frame.epoch === "string") {
          this._setPosition(request.channel, {offset: frame.offset, epoch: frame.epoch});
        }
        if (room) {
          room.joined = true;
          this._settle(room.waiters, {event: "joined", room: request.channel}, null);
        }
        return true;
      }
      if (request.kind !== "subscribe") {
        request.resolve(frame);
        return true;
      }
      const entry = this._channels.get(request.channel);
      if (!entry || entry.request !== frame.reply_to) return true; // superseded
      if (frame.event === "subscribed") {
        if (typeof frame.offset === "number" && typeof frame.epoch === "string") {
          entry.head = {offset: frame.offset, epoch: frame.epoch};
          if (!this._positions.get(request.channel)) {
            const at = {offset: frame.offset, epoch: frame.epoch};
            this._seen.set(request.channel, at);
            this._setPosition(request.channel, at); // live from here
          }
        }
        this._emit("subscribed", {channel: request.channel, resumed: request.since !== undefined,
          since: request.since, offset: frame.offset, epoch: frame.epoch});
      } else {
        entry.head = {offset: frame.offset, epoch: frame.epoch};
        this._emit("subscribed", {channel: request.channel, resumed: false, since: request.since,
          offset: frame.offset, epoch: frame.epoch, reason: frame.reason});
      }
      entry.subscribed = true;
      this._settle(entry.waiters, frame, null);
      this._drained(request.channel);
      return true;
    }

    /** An error frame: a refusal of a request, a room or a channel of this socket; false if not. */
    _refused(frame, request) {
      if (!shaped(frame, ["event", "error"], ["reply_to", "room", "channel"])) return false;
      const [code, temporary] = refusal(frame.error);
      const detail = {error: frame.error, code, temporary, data: frame};
      const error = failure(`pgws: ${frame.error}`, frame, code, temporary);
      if (request !== undefined) {
        this._requests.delete(frame.reply_to);
        clearTimeout(request.timer);
        detail.action = request.kind;
        detail.channel = request.channel;
        if (request.kind === "subscribe") {
          const entry = this._channels.get(request.channel);
          if (entry && entry.request === frame.reply_to) {
            entry.request = null;
            if (temporary) { // kept: tried again after a while, and after every reconnect
              const delay = PgwsSocket.backoff(2, this.options.random, this.options);
              entry.retry = setTimeout(() => {
                entry.retry = null;
                if (this._channels.get(request.channel) === entry && this._state === OPEN) {
                  this._sendSubscribe(request.channel, entry);
                }
              }, delay);
            } else {
              this._channels.delete(request.channel); // refused: not retried after reconnects
              this._setPosition(request.channel, null);
            }
            this._settle(entry.waiters, null, error);
          }
        } else if (request.kind === "joinRoom") {
          detail.room = request.channel;
          const entry = this._rooms.get(request.channel);
          if (entry && !temporary) {
            this._rooms.delete(request.channel); // refused: not rejoined after reconnects
            this._setPosition(request.channel, null);
          }
          if (entry) this._settle(entry.waiters, null, error);
        } else {
          if (request.kind === "unsubscribe") this._leavingChannels.delete(request.channel);
          request.reject(error);
        }
      } else if (frame.reply_to !== undefined) {
        return false; // an answer to a frame the app sent itself
      } else if (typeof frame.room === "string") {
        const entry = this._rooms.get(frame.room);
        if (!entry || entry.joined) return false;
        detail.room = frame.room;
        detail.action = "joinRoom";
        this._rooms.delete(frame.room); // refused: not rejoined after reconnects
        this._settle(entry.waiters, null, error);
      } else if (typeof frame.channel === "string") {
        if (!this._follows(frame.channel)) return false;
        detail.channel = frame.channel;
      } else if (!this._v2 && this.tabWindowId !== null) {
        return false; // a Push socket without pgws.v2: as likely an app's payload
      }
      this._emit("error", detail);
      return true;
    }

    _roomAnswer(frame) {
      if (frame.event === "joined") {
        const entry = this._rooms.get(frame.room);
        if (entry) {
          if (typeof frame.offset === "number" && typeof frame.epoch === "string" &&
              !this._positions.get(frame.room)) { // resumable from here, before any message
            const at = {offset: frame.offset, epoch: frame.epoch};
            this._seen.set(frame.room, at);
            this._setPosition(frame.room, at);
          }
          entry.joined = true;
          this._settle(entry.waiters, frame, null);
        }
      } else {
        const waiters = this._leaving.get(frame.room);
        this._leaving.delete(frame.room);
        if (waiters) this._settle(waiters, frame, null);
      }
    }

    // ------------------------------------------------------------ tab streams

    /** The streams frame: follow the user's stream and this tab's; the previous tab's drains. */
    _streams(user, tab) {
      if (!this._channels.has(user)) this._quiet(this.subscribe(user));
      if (typeof tab !== "string") return;
      const previous = this._tabStream;
      if (previous !== null && previous !== tab) {
        if (this._oldTab !== null && this._oldTab !== previous) this._quiet(this.unsubscribe(this._oldTab));
        if (this._drainTimer !== null) clearTimeout(this._drainTimer);
        this._drainTimer = null;
        this._oldTab = this._channels.has(previous) ? previous : null;
      }
      this._tabStream = tab;
      this._saveTab(tab);
      if (!this._channels.has(tab)) this._quiet(this.subscribe(tab));
      if (this._oldTab !== null) this._drained(this._oldTab);
    }

    /**
     * Once the previous tab's stream is read up to its head and then quiet for drainDelay ms
     * (a push committed just before the reconnect may not be numbered yet), unsubscribe
     * and forget it.
     */
    _drained(channel) {
      if (channel !== this._oldTab) return;
      const entry = this._channels.get(channel);
      if (!entry || !entry.subscribed || !entry.head) return;
      const at = this._positions.get(channel);
      if (at && at.epoch === entry.head.epoch && at.offset < entry.head.offset) return;
      if (this._drainTimer !== null) clearTimeout(this._drainTimer);
      this._drainTimer = setTimeout(() => {
        this._drainTimer = null;
        if (this._oldTab !== channel || this._closed) return;
        this._oldTab = null;
        this._quiet(this.unsubscribe(channel));
      }, this.options.drainDelay);
    }

    _loadTab() {
      const storage = this.options.storage;
      if (!storage) return;
      try {
        const saved = storage.getItem(this._scope + "#tab");
        if (typeof saved === "string" && saved.startsWith(TAB_STREAM)) {
          this._tabStream = saved; // a reloaded page: that tab's stream is read to its end
          this._loadPosition(saved);
          if (this._positions.has(saved)) this._quiet(this.subscribe(saved));
        }
      } catch (error) {
        // nothing usable saved
      }
    }

    _saveTab(tab) {
      const storage = this.options.storage;
      if (!storage) return;
      try {
        storage.setItem(this._scope + "#tab", tab);
      } catch (error) {
        // storage full or unavailable
      }
    }

    // ----------------------------------------------------------------- helpers

    _usable() {
      if (this._closed) throw failure("pgws: the socket was closed (close() was called)");
    }

    _id() {
      this._nextId += 1;
      return this._ids + this._nextId;
    }

    _listen(name, fn, add) {
      const target = name === "visibilitychange" ? root.document : root;
      if (!target) return;
      const method = add ? "addEventListener" : "removeEventListener";
      if (typeof target[method] === "function") target[method](name, fn);
    }

    _follows(channel) {
      return this._channels.has(channel) || this._rooms.has(channel);
    }

    /**
     * Join a room: `{"joinRoom": r}`, or on a durable Push endpoint, once the `joined` answer or a
     * room message gave it a position, a subscribe with `since` (joining is subscribing), so
     * nothing is missed.
     */
    _sendJoin(room) {
      const position = this._positions.get(room);
      if (!position) {
        this._seen.delete(room);
        this._write(JSON.stringify({joinRoom: room}));
        return;
      }
      const id = this._id();
      const request = {kind: "joinRoom", channel: room, since: position.offset, socket: this._ws,
        timer: null, resolve: null, reject: null};
      this._requests.set(id, request);
      this._timeout(request, id, this.options.requestTimeout);
      this._seen.set(room, position);
      this._write(JSON.stringify({action: "subscribe", channel: room, since: position.offset,
        epoch: position.epoch, id}));
    }

    _sendSubscribe(channel, entry) {
      const id = this._id();
      const action = {action: "subscribe", channel, id};
      if (entry.options.backpressure !== undefined) action.backpressure = entry.options.backpressure;
      const position = this._positions.get(channel);
      if (position) { // a durable channel: resume after what was committed
        action.since = position.offset;
        if (typeof position.epoch === "string") action.epoch = position.epoch;
        this._seen.set(channel, position);
      } else {
        this._seen.delete(channel);
      }
      entry.request = id;
      entry.head = undefined;
      const request = {kind: "subscribe", channel, since: action.since, socket: this._ws, timer: null,
        resolve: null, reject: null};
      this._requests.set(id, request);
      this._timeout(request, id, this.options.requestTimeout);
      this._write(JSON.stringify(action));
    }

    /** The offset and epoch committed last on a durable channel (what a resume starts after), or null. */
    position(channel) {
      const position = this._positions.get(channel);
      return position ? Object.assign({}, position) : null;
    }

    _setPosition(channel, position) {
      if (position === null) this._positions.delete(channel);
      else this._positions.set(channel, position);
      if (!this.options.storage) return;
      this._dirty.add(channel);
      if (position === null || this.options.storageDelay === 0) this._flush();
      else if (this._flushTimer === null) this._flushTimer = setTimeout(() => this._flush(), this.options.storageDelay);
    }

    /** Write the positions that changed since the last write to storage. */
    _flush() {
      if (this._flushTimer !== null) clearTimeout(this._flushTimer);
      this._flushTimer = null;
      const storage = this.options.storage;
      if (!storage) return;
      const dirty = Array.from(this._dirty);
      this._dirty.clear();
      for (const channel of dirty) {
        const position = this._positions.get(channel);
        try {
          if (position === undefined) storage.removeItem(this._scope + channel);
          else storage.setItem(this._scope + channel, JSON.stringify(position));
        } catch (error) {
          // storage full or unavailable: positions stay in memory
        }
      }
    }

    _loadPosition(channel) {
      const storage = this.options.storage;
      if (!storage) return;
      try {
        let text = storage.getItem(this._scope + channel);
        const legacy = this.options.storageKey + channel; // before keys named the endpoint
        if (text === null && legacy !== this._scope + channel) {
          text = storage.getItem(legacy);
          if (text !== null) {
            storage.removeItem(legacy);
            storage.setItem(this._scope + channel, text);
          }
        }
        const saved = JSON.parse(text);
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
      let request;
      const promise = new Promise((resolve, reject) => {
        request = {kind, channel, socket: null, resolve, reject, timer: null};
      });
      this._requests.set(id, request);
      request.id = id;
      try {
        this._enqueue(frame, id);
      } catch (error) {
        this._requests.delete(id);
        throw error;
      }
      if (request.socket === null) this._timeout(request, id, this.options.publishTimeout, true);
      return this._quiet(promise);
    }

    /** The request was written to the current socket: it now waits for its answer. */
    _sent(request) {
      request.socket = this._ws;
      this._timeout(request, request.id, this.options.requestTimeout);
    }

    _timeout(request, id, ms, queued = false) {
      clearTimeout(request.timer);
      request.timer = null;
      if (!(ms > 0)) return;
      request.timer = setTimeout(() => {
        if (this._requests.get(id) !== request) return;
        if (request.kind === "subscribe") { // still subscribed after the next reconnect
          const entry = this._channels.get(request.channel);
          if (entry && entry.request === id) {
            this._settle(entry.waiters, null, failure(`pgws: no answer to subscribe within ${ms} ms`,
              undefined, "timeout", true));
          }
          return;
        }
        this._requests.delete(id);
        if (queued) this._queue = this._queue.filter((item) => item.id !== id);
        this._fail(request, failure(queued ? `pgws: not sent: no connection within ${ms} ms (publishTimeout)`
          : `pgws: no answer within ${ms} ms (requestTimeout)`, undefined, "timeout", true));
      }, ms);
    }

    _fail(request, error) {
      clearTimeout(request.timer);
      if (request.kind === "unsubscribe") this._leavingChannels.delete(request.channel);
      if (typeof request.reject === "function") request.reject(error);
    }

    _enqueue(frame, id) {
      if (this._state === OPEN) {
        if (id !== null) this._sent(this._requests.get(id));
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

    _wait(waiters, timed = false) {
      const ms = this.options.requestTimeout;
      return this._quiet(new Promise((resolve, reject) => {
        const waiter = {resolve, reject, timer: null};
        if (timed && ms > 0 && this._state === OPEN) {
          waiter.timer = setTimeout(() => {
            const at = waiters.indexOf(waiter);
            if (at >= 0) waiters.splice(at, 1);
            reject(failure(`pgws: no answer within ${ms} ms (requestTimeout)`, undefined, "timeout", true));
          }, ms);
        }
        waiters.push(waiter);
      }));
    }

    /** The app may ignore these promises: the server's refusals are error events too. */
    _quiet(promise) {
      promise.catch(() => {});
      return promise;
    }

    _settle(waiters, value, error) {
      const all = waiters.splice(0);
      for (const waiter of all) {
        clearTimeout(waiter.timer);
        if (error) waiter.reject(error);
        else waiter.resolve(value);
      }
    }

    /** Dispatch an event; false if a handler added with on() threw. */
    _emit(name, detail) {
      const outer = this._failed;
      this._failed = false;
      this.dispatchEvent(new CustomEvent(name, {detail}));
      const ok = !this._failed;
      this._failed = outer;
      return ok;
    }
  }

  PgwsSocket.CONNECTING = CONNECTING;
  PgwsSocket.OPEN = OPEN;
  PgwsSocket.CLOSING = CLOSING;
  PgwsSocket.CLOSED = CLOSED;
  PgwsSocket.CLOSE_JWT_EXPIRED = CLOSE_JWT_EXPIRED;
  PgwsSocket.CLOSE_SERVICE_RESTART = CLOSE_SERVICE_RESTART;
  PgwsSocket.SUBPROTOCOL = SUBPROTOCOL;
  PgwsSocket.DEFAULTS = Object.freeze(Object.assign({}, DEFAULTS));
  PgwsSocket.Channel = PgwsChannel;
  PgwsSocket.Live = PgwsLive;

  return PgwsSocket;
})(globalThis);

export default PgwsSocket;
export { PgwsSocket };
