// Types of pgws.js (the classic script and pgws.mjs, its ES module build). Hand-written:
// keep in step with pgws.js (tests/test_pgws_node.py checks the names against it).

/** A durable channel's position: the offset of the last message handled, in its log's epoch. */
export interface Position {
  offset: number;
  epoch: string;
}

export interface PgwsOptions {
  /** ms: the first reconnect delays, then Fibonacci multiples (1200). */
  minDelay?: number;
  /** ms: the longest reconnect delay (30000, or minDelay if larger). */
  maxDelay?: number;
  /** Each delay is scaled by a random factor in [1 - jitter, 1 + jitter] (0.2). */
  jitter?: number;
  /** ms a socket must stay open before the backoff starts over (5000). */
  resetAfter?: number;
  /** ms of silence before a ping (25000; 0: no heartbeat). */
  heartbeatInterval?: number;
  /** ms a ping may wait for any frame before the socket is dropped and reconnected (10000). */
  heartbeatTimeout?: number;
  /** ms a socket may take to open (10000; 0: no limit). */
  connectTimeout?: number;
  /** ms a sent request may wait for its answer before its promise rejects (10000; 0: no limit). */
  requestTimeout?: number;
  /** ms a publish() may wait for a socket before it rejects (30000; 0: no limit). */
  publishTimeout?: number;
  /** Called before every connect: the JWT (or a promise of it). */
  token?: (() => string | Promise<string>) | null;
  /** Where the token goes: the URL's last path segment ("url") or Sec-WebSocket-Protocol. */
  tokenIn?: "url" | "protocol";
  /** WebSocket subprotocols to offer (pgws.v2 is offered after them). */
  protocols?: string | string[];
  /** Offer pgws.v2, in which app frames arrive in an envelope (true). */
  envelope?: boolean;
  /** publish()/send() frames kept while disconnected (100). */
  maxQueued?: number;
  binaryType?: "arraybuffer" | "blob";
  /** The jitter's source of numbers in [0, 1) (Math.random). */
  random?: () => number;
  /** "auto": positions move once the message handlers have run; "manual": with commit(). */
  commit?: "auto" | "manual";
  /** e.g. sessionStorage: durable positions survive a page reload. */
  storage?: Pick<Storage, "getItem" | "setItem" | "removeItem"> | null;
  /** Prefix of the storage keys, followed by the endpoint URL and the channel ("pgws:"). */
  storageKey?: string;
  /** ms over which position writes are batched (100; 0: at once). */
  storageDelay?: number;
  /** ms the previous tab's stream stays subscribed once read to its end (5000). */
  drainDelay?: number;
}

export interface SubscribeOptions {
  /** The server's policy for this channel when the client reads too slowly. */
  backpressure?: "close" | "drop";
  /** Durable channels: start after this offset instead of the saved position. */
  since?: number;
  /** The epoch `since` belongs to. */
  epoch?: string;
}

/** A request's rejection: `code` and `temporary` are set for refusals and timeouts. */
export interface PgwsError extends Error {
  frame?: Record<string, unknown>;
  code?: "too_many_subscriptions" | "rate_limited" | "forbidden" | "too_large" | "invalid_position"
    | "internal" | "refused" | "timeout";
  temporary?: boolean;
}

export interface MessageEvent {
  /** The app's payload (parsed JSON, the text, or binary data). */
  payload: unknown;
  /** The parsed frame (for channel messages: the whole message frame). */
  data: unknown;
  /** The frame's text as it came (absent for binary frames). */
  text?: string;
  binary?: boolean;
  channel?: string;
  id?: string;
  /** Durable channels: the message's position. */
  offset?: number;
  epoch?: string;
}

export interface SubscribedEvent {
  channel: string;
  /** true: the subscription resumed after `since`; false: it started fresh. */
  resumed: boolean;
  since?: number;
  offset?: number;
  epoch?: string;
  reason?: string;
  /** true: the server subscribed this socket (subscribe_matching), no request of its own. */
  server?: boolean;
}

/** A member of a channel (presence): the connection's id and its public info. */
export interface PresenceMember {
  client: string;
  info: Record<string, unknown>;
}

/** The answer to `presence(channel)`: `count` is exact, `members` cut at the server's limit. */
export interface PresenceReply {
  event: "presence";
  channel: string;
  reply_to: string;
  count: number;
  members: PresenceMember[];
}

export interface CloseEvent {
  code: number;
  reason: string;
  wasClean: boolean;
  willReconnect: boolean;
  /** ms until the next attempt, or null when the socket is closed for good. */
  delay: number | null;
}

export interface PgwsEventMap {
  open: {reconnected: boolean; protocol: string; enveloped: boolean};
  close: CloseEvent;
  reconnecting: {attempt: number};
  message: MessageEvent;
  subscribed: SubscribedEvent;
  /** The server ended a subscription (unsubscribe_matching). */
  unsubscribed: {channel: string; server: true};
  /** `replaces`: the client id of a member whose socket a drain closed, whose place this takes. */
  join: {channel: string; member: PresenceMember; replaces?: string};
  leave: {channel: string; member: PresenceMember};
  /** A channel above the server's presence_events_max: its member count, instead of join/leave. */
  presence_count: {channel: string; count: number};
  resync: {channels: string[]; reason: string; data: unknown; text: string};
  resync_required: {channel: string; reason: string; offset: number; epoch: string; data: unknown;
    text: string};
  gap: {channel: string; missed: number; data: unknown; text: string};
  tabwindow: {tabWindowId: string};
  streams: {user: string; tab?: string; data: unknown; text: string};
  error: {error: string; code?: string; temporary?: boolean; action?: string; channel?: string;
    room?: string; data?: unknown; cause?: unknown};
}

/** One channel (or room) of a socket: events about it alone, and the socket's calls for it. */
export interface PgwsChannel {
  readonly socket: PgwsSocket;
  readonly name: string;
  on<K extends keyof PgwsEventMap>(name: K, fn: (detail: PgwsEventMap[K]) => void): () => void;
  subscribe(options?: SubscribeOptions): Promise<Record<string, unknown>>;
  unsubscribe(): Promise<Record<string, unknown>>;
  publish(payload: unknown): Promise<Record<string, unknown>>;
  joinRoom(): Promise<{event: "joined"; room: string; offset?: number; epoch?: string}>;
  leaveRoom(): Promise<{event: "left"; room: string}>;
  position(): Position | null;
  commit(offset: number, epoch?: string): boolean;
}

/** What a live collection's `load` returns: pgws_sync.load_live's rows and position. */
export interface LiveLoad<Row = Record<string, unknown>> {
  rows: Row[];
  position: {channel: string; epoch: string; offset: number; snapshot: string; key: string[]};
}

export interface LiveOptions<Row = Record<string, unknown>> {
  /** Fetch the rows and their position (a route answering pgws_sync.load_live). */
  load: () => Promise<LiveLoad<Row>> | LiveLoad<Row>;
  /** ms before a failed load is tried again (default 2000). */
  retryDelay?: number;
}

/** A change of a watched table, as the trigger publishes it. */
export interface LiveChange<Row = Record<string, unknown>> {
  op: "insert" | "update" | "delete";
  key: Record<string, unknown>;
  /** The new row; null on delete. */
  row: Row | null;
  /** The row the collection held before, if any. */
  previous: Row | undefined;
  offset: number;
  change: {op: string; table: string; key: Record<string, unknown>; row: Row | null; xid: number;
    too_large?: boolean};
}

export interface LiveEventMap<Row = Record<string, unknown>> {
  load: {rows: Row[]; position: LiveLoad<Row>["position"]};
  change: LiveChange<Row>;
  insert: LiveChange<Row>;
  update: LiveChange<Row>;
  delete: LiveChange<Row>;
  error: {error: string; cause?: unknown};
}

/** A watched table's rows on one durable channel, kept by primary key (`sock.live`). */
export interface PgwsLive<Row = Record<string, unknown>> extends EventTarget {
  readonly socket: PgwsSocket;
  readonly channel: string;
  /** The first load is done (and the subscribe answered). */
  readonly ready: Promise<PgwsLive<Row>>;
  readonly loaded: boolean;
  readonly size: number;
  rows(): Row[];
  /** The row with these primary key values, in key order. */
  get(...key: unknown[]): Row | undefined;
  on<K extends keyof LiveEventMap<Row>>(name: K, fn: (detail: LiveEventMap<Row>[K]) => void): () => void;
  reload(): Promise<PgwsLive<Row>>;
  close(): void;
}

export declare class PgwsSocket extends EventTarget {
  static readonly CONNECTING: 0;
  static readonly OPEN: 1;
  static readonly CLOSING: 2;
  static readonly CLOSED: 3;
  static readonly CLOSE_JWT_EXPIRED: 3001;
  static readonly CLOSE_SERVICE_RESTART: 1012;
  static readonly SUBPROTOCOL: "pgws.v2";
  static readonly DEFAULTS: Readonly<Required<PgwsOptions>>;
  static readonly Channel: new (sock: PgwsSocket, name: string) => PgwsChannel;
  static readonly Live: new <Row>(sock: PgwsSocket, channel: string, options: LiveOptions<Row>) => PgwsLive<Row>;
  /** ms before reconnect attempt `attempt` (1, 2, ...). */
  static backoff(attempt: number, random?: () => number,
                 options?: Pick<PgwsOptions, "minDelay" | "maxDelay" | "jitter">): number;

  constructor(url: string | ((token?: string) => string), options?: PgwsOptions);

  readonly url: string | ((token?: string) => string);
  readonly options: Readonly<Required<PgwsOptions>>;
  /** The Push socket's tab window id, or null. */
  readonly tabWindowId: string | null;
  /** Failed connects since the backoff last started over. */
  readonly attempt: number;
  readonly readyState: 0 | 1 | 2 | 3;
  readonly connected: boolean;
  /** The socket speaks pgws.v2. */
  readonly enveloped: boolean;
  readonly channels: string[];
  readonly rooms: string[];

  on<K extends keyof PgwsEventMap>(name: K, fn: (detail: PgwsEventMap[K]) => void): () => void;
  /** A handle on one channel (or room), made once per name. */
  channel(name: string): PgwsChannel;
  subscribe(channel: string, options?: SubscribeOptions): Promise<Record<string, unknown>>;
  unsubscribe(channel: string): Promise<Record<string, unknown>>;
  /** A watched table's rows on durable `channel`, loaded by `options.load` and followed. */
  live<Row = Record<string, unknown>>(channel: string, options: LiveOptions<Row>): PgwsLive<Row>;
  publish(channel: string, payload: unknown): Promise<Record<string, unknown>>;
  /** Who is subscribed to `channel` in every worker (PubSub(presence=True)). */
  presence(channel: string): Promise<PresenceReply>;
  /** Manual commit: `channel` was handled up to `offset`; false if it moved nothing. */
  commit(channel: string, offset: number, epoch?: string): boolean;
  /** The committed position of a durable channel, or null. */
  position(channel: string): Position | null;
  joinRoom(room: string): Promise<{event: "joined"; room: string; offset?: number; epoch?: string}>;
  leaveRoom(room: string): Promise<{event: "left"; room: string}>;
  send(message: string | ArrayBuffer | ArrayBufferView | Blob | unknown): void;
  /** For good; throws RangeError (changing nothing) for a code other than 1000 or 3000-4999. */
  close(code?: number, reason?: string): void;
}

export default PgwsSocket;
