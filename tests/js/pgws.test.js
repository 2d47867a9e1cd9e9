// pgws.js in Node through a fake WebSocket, one test per defect of issue 26 (each fails on the
// pgws.js before it). Run: node --test tests/js/pgws.test.js (PGWS_JS=path tests another copy).
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");
const {FakeWebSocket, FakeStorage, sleep, until} = require("./fake_websocket.js");

global.WebSocket = FakeWebSocket;
const PgwsSocket = require(process.env.PGWS_JS || path.join(__dirname, "..", "..", "pgws_sync", "pgws.js"));

const URL = "ws://example.test/ws";
const EVENTS = ["open", "close", "message", "error", "subscribed", "resync_required", "streams",
  "tabwindow", "reconnecting"];

/** A socket whose first WebSocket is open (with `protocol`), and the events it emits. */
async function connected(options = {}, protocol = "") {
  const before = FakeWebSocket.all.length;
  const sock = new PgwsSocket(URL, Object.assign({minDelay: 5, maxDelay: 50, jitter: 0}, options));
  const events = [];
  for (const name of EVENTS) sock.on(name, (detail) => events.push(Object.assign({name}, detail)));
  await until(() => FakeWebSocket.all.length > before, 1000, "a WebSocket");
  const ws = latest();
  ws.open(protocol);
  return {sock, ws, events, named: (n) => events.filter((e) => e.name === n)};
}

const latest = () => FakeWebSocket.all[FakeWebSocket.all.length - 1];

/** Answer the client's pending subscribe of `channel` on `ws` (durable when `head` is given). */
function subscribed(ws, channel, head, epoch = "e1") {
  const action = ws.actions("subscribe").filter((a) => a.channel === channel).pop();
  const reply = {event: "subscribed", channel, reply_to: action.id};
  if (head !== undefined) Object.assign(reply, {epoch, offset: head});
  ws.receive(reply);
  return action;
}

const durable = (channel, offset, payload = {n: offset}, epoch = "e1") =>
  ({channel, payload, id: `m${offset}`, offset, epoch});

// ------------------------------------------------------------------ 1. close()

test("close() while a subscribe awaits its reply closes the socket, and nothing follows", async () => {
  const {sock, ws, named} = await connected();
  const pending = sock.subscribe("chat");
  assert.doesNotThrow(() => sock.close());
  await assert.rejects(pending, /closed/);
  assert.equal(sock.readyState, PgwsSocket.CLOSED);
  assert.deepEqual(ws.closedWith, [1000, ""]);
  ws.receive({channel: "chat", payload: "late", id: "x"});
  await sleep(20);
  assert.equal(named("message").length, 0);
  assert.equal(named("close").length, 1);
  assert.equal(latest(), ws); // no reconnect
});

test("close() with a code browsers refuse throws and changes nothing", async () => {
  const {sock, ws, named} = await connected();
  assert.throws(() => sock.close(1001), RangeError);
  assert.equal(sock.readyState, PgwsSocket.OPEN);
  assert.equal(ws.closedWith, null);
  sock.close(4000, "bye");
  await sleep(10);
  assert.equal(sock.readyState, PgwsSocket.CLOSED);
  assert.deepEqual(ws.closedWith, [4000, "bye"]);
  assert.equal(named("close").length, 1);
});

// -------------------------------------------------------------- 2. tab streams

test("after 8 reconnects a connect subscribes to the user's stream, this tab's and at most the previous tab's", async () => {
  const storage = new FakeStorage();
  const {sock, ws: first} = await connected({storage, drainDelay: 10});
  let ws = first;
  const user = "pgws:user:bob";
  for (let i = 0; i <= 8; i++) {
    const tab = `pgws:tab:bob:t${i}`;
    ws.receive({tabWindowId: `t${i}`});
    ws.receive({event: "streams", user, tab});
    await sleep(1);
    // the server answers every subscribe; each tab got one push before the socket broke
    for (const action of ws.actions("subscribe")) {
      const position = sock.position(action.channel);
      const head = action.channel === tab ? 0 : (position ? position.offset : 0);
      subscribed(ws, action.channel, action.channel.startsWith("pgws:tab:") && action.since !== undefined
        ? action.since : head);
    }
    ws.receive(durable(tab, 1));
    await sleep(1);
    if (i === 8) break;
    ws.finish(1006);
    await until(() => latest() !== ws, 1000, "a reconnect");
    ws = latest();
    ws.open();
    const channels = ws.actions("subscribe").map((a) => a.channel);
    assert.ok(channels.length <= 3, `one connect subscribes to ${channels.length}: ${channels}`);
  }
  await sleep(150); // the drain delay, and the batched storage writes
  const tabs = sock.channels.filter((c) => c.startsWith("pgws:tab:"));
  assert.deepEqual(tabs, ["pgws:tab:bob:t8"]);
  const keys = storage.keys().filter((k) => k.includes("pgws:tab:") && !k.endsWith("#tab"));
  assert.equal(keys.length, 1, `storage keys: ${keys}`);
  sock.close();
});

// ---------------------------------------------------- 3. frames that cannot be confused

test("pgws.v2 is offered, and app payloads in its envelope are messages, never control frames", async () => {
  const {sock, ws, named} = await connected({}, "pgws.v2");
  assert.ok(ws.protocols.includes("pgws.v2"));
  const pending = sock.subscribe("x");
  const id = ws.actions("subscribe")[0].id;
  const lookalikes = [
    {event: "error", error: "card declined"},
    {event: "streams", user: "pgws:user:alice", tab: "pgws:tab:alice:1"},
    {event: "subscribed", channel: "x", reply_to: id},
    {tabWindowId: "nope"},
    {event: "resync", channels: ["x"], reason: "r"},
    {event: "pong", reply_to: id},
    {event: "joined", room: "r"},
  ];
  for (const payload of lookalikes) ws.receive('{"message":' + JSON.stringify(payload) + "}");
  ws.receive({text: "plain words"});
  await sleep(5);
  const messages = named("message");
  assert.deepEqual(messages.slice(0, lookalikes.length).map((m) => m.payload), lookalikes);
  assert.equal(messages[lookalikes.length].payload, "plain words");
  assert.equal(named("error").length, 0);
  assert.deepEqual(sock.channels, ["x"]); // nothing subscribed to alice
  assert.equal(sock.tabWindowId, null);
  let settled = false;
  pending.then(() => { settled = true; }, () => { settled = true; });
  await sleep(5);
  assert.equal(settled, false);
  sock.close();
});

test("without pgws.v2 a control frame counts only in its exact shape, with an id no payload can guess", async () => {
  const {sock, ws, named} = await connected();
  const pending = sock.subscribe("x");
  ws.receive({event: "streams", user: "alice"}); // a Push payload: no channel "alice"
  ws.receive({event: "subscribed", channel: "x", reply_to: "pgws-1"}); // a guessed id
  ws.receive({event: "gap", channel: "elsewhere", missed: 3});
  await sleep(5);
  assert.deepEqual(sock.channels, ["x"]);
  assert.equal(named("message").length, 3);
  let settled = false;
  pending.then(() => { settled = true; });
  await sleep(5);
  assert.equal(settled, false);
  subscribed(ws, "x");
  await pending;
  sock.close();
});

// ------------------------------------------------------- 4. positions the app controls

test("a durable position moves (and is stored) only after the message handlers have run", async () => {
  const storage = new FakeStorage();
  const {sock, ws} = await connected({storage, storageDelay: 0});
  sock.subscribe("d");
  subscribed(ws, "d", 0);
  const during = [];
  sock.on("message", (m) => {
    during.push([sock.position("d").offset, storage.keys().length ? JSON.parse(storage.getItem(storage.keys()[0])).offset : null]);
    if (m.offset === 2) throw new Error("the app failed on message 2");
  });
  const quiet = console.error;
  console.error = () => {};
  try {
    ws.receive(durable("d", 1));
    ws.receive(durable("d", 2));
  } finally {
    console.error = quiet;
  }
  assert.deepEqual(during, [[0, 0], [1, 1]]);
  assert.equal(sock.position("d").offset, 1); // 2 failed: a resume gets it again
  sock.close();
});

test("resync_required handlers see the old position; manual commit moves it only when told", async () => {
  const {sock, ws, named} = await connected({commit: "manual"});
  sock.subscribe("d", {since: 4, epoch: "e1"});
  const action = ws.actions("subscribe")[0];
  assert.equal(action.since, 4);
  assert.equal(action.epoch, "e1");
  subscribed(ws, "d", 9);
  assert.equal(named("subscribed")[0].resumed, true);
  ws.receive(durable("d", 5));
  ws.receive(durable("d", 5)); // a duplicate is still dropped
  assert.equal(named("message").length, 1);
  assert.equal(sock.position("d").offset, 4);
  assert.equal(sock.commit("d", 5), true);
  assert.deepEqual(sock.position("d"), {offset: 5, epoch: "e1"});
  let seen = null;
  sock.on("resync_required", () => { seen = sock.position("d").offset; });
  ws.receive({event: "resync_required", channel: "d", reason: "retention", epoch: "e1", offset: 20});
  assert.equal(seen, 5);
  assert.equal(sock.position("d").offset, 20);
  sock.close();
});

test("a message in flight after unsubscribe does not bring the position back", async () => {
  const {sock, ws, named} = await connected();
  sock.subscribe("d");
  subscribed(ws, "d", 3);
  ws.receive(durable("d", 4));
  sock.unsubscribe("d");
  ws.receive(durable("d", 5)); // sent before the server saw the unsubscribe
  assert.equal(sock.position("d"), null);
  assert.equal(named("message").length, 1);
  sock.subscribe("d");
  const again = ws.actions("subscribe").pop();
  assert.equal(again.since, undefined);
  sock.close();
});

test("storage keys name the endpoint, and writes are batched", async () => {
  const storage = new FakeStorage();
  const {sock, ws} = await connected({storage, storageDelay: 30});
  sock.subscribe("d");
  subscribed(ws, "d", 0);
  const before = storage.writes;
  for (let i = 1; i <= 50; i++) ws.receive(durable("d", i));
  await sleep(80);
  assert.ok(storage.writes - before <= 2, `${storage.writes - before} writes for 50 messages`);
  assert.deepEqual(JSON.parse(storage.getItem("pgws:" + URL + "|d")), {offset: 50, epoch: "e1"});
  assert.equal(storage.getItem("pgws:d"), null);
  sock.close();
});

// ---------------------------------------------------------- 5. dead connections

test("silence brings a ping; no answer closes the socket and reconnects", async () => {
  const {sock, ws, named} = await connected({heartbeatInterval: 40, heartbeatTimeout: 40});
  await until(() => ws.actions("ping").length === 1, 500, "a ping");
  const ping = ws.actions("ping")[0];
  assert.ok(typeof ping.id === "string" && ping.id.length > 12);
  ws.receive({event: "pong", reply_to: ping.id});
  await sleep(20);
  assert.equal(named("close").length, 0);
  ws.hang = true; // half-open from now on: nothing arrives, close() never completes
  const started = Date.now();
  await until(() => named("close").length === 1, 1000, "the dead socket to be dropped");
  assert.ok(Date.now() - started <= 40 + 40 + 60 + 60);
  assert.equal(named("close")[0].willReconnect, true);
  assert.equal(named("message").length, 0); // the pong was not the app's
  await until(() => latest() !== ws, 500, "a new socket");
  sock.close();
});

test("a socket that does not open in time is dropped; an unanswered request rejects", async () => {
  const sock = new PgwsSocket(URL, {minDelay: 5, jitter: 0, connectTimeout: 30, requestTimeout: 30});
  const closes = [];
  sock.on("close", (c) => closes.push(c));
  await sleep(1);
  const first = latest();
  await until(() => closes.length === 1, 500, "the connect timeout");
  await until(() => latest() !== first, 500, "another attempt");
  latest().open();
  await assert.rejects(sock.publish("c", 1), (e) => e.code === "timeout");
  sock.close();
});

test("offline closes at once, online reconnects at once", async () => {
  const listeners = {};
  global.addEventListener = (name, fn) => { listeners[name] = fn; };
  global.removeEventListener = (name) => { delete listeners[name]; };
  try {
    const {sock, ws, named} = await connected({minDelay: 5000, maxDelay: 5000});
    listeners.offline();
    assert.equal(named("close").length, 1);
    assert.equal(sock.connected, false);
    const count = FakeWebSocket.all.length;
    listeners.online();
    await sleep(5);
    assert.equal(FakeWebSocket.all.length, count + 1);
    assert.notEqual(latest(), ws);
    sock.close();
    assert.equal(listeners.online, undefined);
  } finally {
    delete global.addEventListener;
    delete global.removeEventListener;
  }
});

// -------------------------------------------------------- 6. a backoff that protects

test("a server that accepts and then closes gets ever longer delays, at most 30 s by default", async () => {
  const {sock, ws, named} = await connected({resetAfter: 1000});
  let current = ws;
  for (let i = 0; i < 5; i++) {
    current.finish(1006);
    await until(() => latest() !== current, 1000, "a reconnect");
    current = latest();
    current.open();
  }
  const delays = named("close").map((c) => c.delay);
  assert.deepEqual(delays, [5, 5, 10, 15, 25]);
  assert.equal(PgwsSocket.DEFAULTS.maxDelay, 30000);
  sock.close();
});

test("close codes 4400-4499 stop reconnecting; a temporary refusal keeps the channel", async () => {
  const {sock, ws, named} = await connected();
  const refused = sock.subscribe("busy");
  const id = ws.actions("subscribe")[0].id;
  ws.receive({event: "error", error: "too many subscriptions: at most 100 per connection", reply_to: id});
  const error = await refused.catch((e) => e);
  assert.equal(error.code, "too_many_subscriptions");
  assert.equal(error.temporary, true);
  assert.deepEqual(sock.channels, ["busy"]);
  const count = FakeWebSocket.all.length;
  ws.finish(4403, "kicked");
  await sleep(30);
  assert.equal(FakeWebSocket.all.length, count);
  assert.equal(named("close")[0].willReconnect, false);
  assert.equal(sock.readyState, PgwsSocket.CLOSED);
});

test("a publish queued while offline expires after publishTimeout", async () => {
  const sock = new PgwsSocket(URL, {minDelay: 5, publishTimeout: 30, connectTimeout: 0});
  const started = Date.now();
  const error = await sock.publish("c", {n: 1}).catch((e) => e);
  assert.equal(error.code, "timeout");
  assert.ok(Date.now() - started < 500);
  await sleep(1);
  latest().open();
  await sleep(5);
  assert.deepEqual(latest().actions("publish"), []); // not sent late
  sock.close();
});

test("a durable Push room is rejoined after its position, not from its head", async () => {
  const {sock, ws, named} = await connected();
  const joined = sock.joinRoom("lobby");
  assert.deepEqual(ws.frames().pop(), {joinRoom: "lobby"});
  ws.receive({event: "joined", room: "lobby"});
  await joined;
  ws.receive(durable("lobby", 3));
  assert.equal(named("message").length, 1);
  assert.deepEqual(sock.position("lobby"), {offset: 3, epoch: "e1"});
  ws.finish(1006);
  await until(() => latest() !== ws, 1000, "a reconnect");
  const again = latest();
  again.open();
  const rejoin = again.frames().pop();
  assert.equal(rejoin.action, "subscribe");
  assert.equal(rejoin.channel, "lobby");
  assert.equal(rejoin.since, 3);
  assert.equal(rejoin.epoch, "e1");
  again.receive({event: "subscribed", channel: "lobby", epoch: "e1", offset: 5, reply_to: rejoin.id});
  again.receive(durable("lobby", 3)); // had it
  again.receive(durable("lobby", 4));
  assert.deepEqual(named("message").map((m) => m.offset), [3, 4]);
  sock.leaveRoom("lobby");
  again.receive(durable("lobby", 5)); // on its way before the server saw the leave
  assert.equal(named("message").length, 2);
  assert.equal(sock.position("lobby"), null);
  sock.close();
});

test("a durable Push room is resumable from its joined answer before any message", async () => {
  const {sock, ws, named} = await connected();
  const joined = sock.joinRoom("lobby");
  assert.deepEqual(ws.frames().pop(), {joinRoom: "lobby"});
  ws.receive({event: "joined", room: "lobby", offset: 7, epoch: "e1"});
  assert.deepEqual(await joined, {event: "joined", room: "lobby", offset: 7, epoch: "e1"});
  assert.deepEqual(sock.position("lobby"), {offset: 7, epoch: "e1"});
  assert.deepEqual(named("message"), []); // the answer is no message
  ws.receive(durable("lobby", 7)); // at the position: had it
  assert.deepEqual(named("message"), []);
  ws.finish(1006);
  await until(() => latest() !== ws, 1000, "a reconnect");
  const again = latest();
  again.open();
  const rejoin = again.frames().pop();
  assert.deepEqual([rejoin.action, rejoin.channel, rejoin.since, rejoin.epoch],
    ["subscribe", "lobby", 7, "e1"]);
  again.receive({event: "subscribed", channel: "lobby", epoch: "e1", offset: 9, reply_to: rejoin.id});
  again.receive(durable("lobby", 8));
  assert.deepEqual(named("message").map((m) => m.offset), [8]);
  sock.close();
});

test("a channel handle has its own events and the socket's calls", async () => {
  const {sock, ws, named} = await connected();
  const chat = sock.channel("chat");
  assert.equal(sock.channel("chat"), chat);
  const mine = [];
  chat.on("message", (m) => mine.push(m.payload));
  chat.on("resync", (r) => mine.push(r.reason));
  chat.subscribe();
  subscribed(ws, "chat");
  ws.receive({channel: "chat", payload: 1, id: "a"});
  ws.receive({channel: "other", payload: 2, id: "b"});
  ws.receive({event: "resync", channels: ["chat"], reason: "r"});
  assert.deepEqual(mine, [1, "r"]);
  assert.equal(named("message").length, 2);
  chat.publish({n: 3});
  assert.deepEqual(ws.actions("publish")[0].payload, {n: 3});
  sock.close();
});

test("a page that becomes visible again reconnects at once", async () => {
  const listeners = {};
  global.document = {visibilityState: "hidden",
    addEventListener: (name, fn) => { listeners[name] = fn; }, removeEventListener: () => {}};
  try {
    const {sock, ws} = await connected({minDelay: 5000, maxDelay: 5000});
    ws.finish(1006);
    const count = FakeWebSocket.all.length;
    global.document.visibilityState = "visible";
    listeners.visibilitychange();
    await sleep(5);
    assert.equal(FakeWebSocket.all.length, count + 1);
    latest().open();
    global.document.visibilityState = "hidden";
    listeners.visibilitychange(); // hidden: nothing
    global.document.visibilityState = "visible";
    listeners.visibilitychange(); // open: a ping checks the socket at once
    assert.equal(latest().actions("ping").length, 1);
    sock.close();
  } finally {
    delete global.document;
  }
});

// ------------------------------------------------------------------ live tables

const SNAPSHOT = "100:105:102,104"; // 102 and 104 were running when the rows were read

function loader(rows, offset = 3, key = ["id"]) {
  const calls = [];
  const load = async () => {
    calls.push(Date.now());
    return {rows: rows(), position: {channel: "items", epoch: "e1", offset, snapshot: SNAPSHOT, key}};
  };
  return {load, calls};
}

const change = (offset, op, id, row, xid) =>
  durable("items", offset, {op, table: "public.items", key: {id}, row, xid});

test("live() loads, subscribes from the position and keeps rows by key, skipping changes its snapshot holds", async () => {
  const {sock, ws} = await connected();
  const {load} = loader(() => [{id: 1, v: 1}, {id: 2, v: 0}]);
  const live = sock.live("items", {load});
  const seen = [];
  for (const name of ["load", "change", "insert", "update", "delete"]) live.on(name, (d) => seen.push([name, d.op, d.key && d.key.id]));
  await until(() => ws.actions("subscribe").length === 1, 1000, "a subscribe");
  const action = subscribed(ws, "items", 9);
  assert.equal(action.since, 3);
  assert.equal(action.epoch, "e1");
  await live.ready;
  assert.deepEqual(live.rows(), [{id: 1, v: 1}, {id: 2, v: 0}]);
  ws.receive(change(4, "update", 1, {id: 1, v: 1}, 101)); // committed before the snapshot: had it
  ws.receive(change(5, "update", 2, {id: 2, v: 1}, 102)); // running then: applied
  ws.receive(change(6, "insert", 3, {id: 3, v: 0}, 105));
  ws.receive(change(7, "delete", 1, null, 104));
  ws.receive(change(8, "update", 1, {id: 1, v: 9}, 99)); // visible: old news, skipped
  assert.deepEqual(live.rows(), [{id: 2, v: 1}, {id: 3, v: 0}]);
  assert.deepEqual(live.get(3), {id: 3, v: 0});
  assert.equal(live.size, 2);
  assert.deepEqual(seen, [["load", undefined, undefined], ["update", "update", 2], ["change", "update", 2],
    ["insert", "insert", 3], ["change", "insert", 3], ["delete", "delete", 1], ["change", "delete", 1]]);
  assert.deepEqual(sock.position("items"), {offset: 8, epoch: "e1"});
  sock.close();
});

test("live() resumes after a reconnect with the collection kept, and loads again after resync_required", async () => {
  const {sock, ws} = await connected();
  let version = 0;
  const {load, calls} = loader(() => [{id: 1, v: version}]);
  const live = sock.live("items", {load});
  await until(() => ws.actions("subscribe").length === 1, 1000, "a subscribe");
  subscribed(ws, "items", 3);
  await live.ready;
  ws.receive(change(4, "update", 1, {id: 1, v: 1}, 200));
  ws.finish(1006);
  await until(() => latest() !== ws, 1000, "a reconnect");
  const again = latest();
  again.open();
  await until(() => again.actions("subscribe").length === 1, 1000, "a resubscribe");
  const resumed = subscribed(again, "items", 5);
  assert.equal(resumed.since, 4);
  again.receive(change(5, "update", 1, {id: 1, v: 2}, 201));
  assert.deepEqual(live.rows(), [{id: 1, v: 2}]);
  assert.equal(calls.length, 1);
  version = 7;
  again.receive({event: "resync_required", channel: "items", reason: "retention", epoch: "e1", offset: 50});
  await until(() => again.actions("unsubscribe").length === 1, 1000, "an unsubscribe");
  const bye = again.actions("unsubscribe")[0];
  again.receive({event: "unsubscribed", channel: "items", reply_to: bye.id});
  await until(() => again.actions("subscribe").length === 2, 1000, "a subscribe after the reload");
  assert.equal(calls.length, 2);
  assert.deepEqual(live.rows(), [{id: 1, v: 7}]);
  assert.equal(again.actions("subscribe")[1].since, 3);
  live.close();
  sock.close();
});

test("live() refuses a load that is not {rows, position}, says so and tries again", async () => {
  const {sock} = await connected();
  let calls = 0;
  const live = sock.live("items", {load: async () => (++calls === 1 ? {rows: []} : {rows: [],
    position: {offset: 0, epoch: "e", snapshot: "1:1:", key: ["id"]}}), retryDelay: 10});
  const errors = [];
  live.on("error", (e) => errors.push(e.error));
  await assert.rejects(live.ready, /must return \{rows, position\}/);
  await until(() => calls === 2, 1000, "a second load");
  assert.equal(errors.length, 1);
  assert.throws(() => sock.live("items", {}), /needs \{load\}/);
  live.close();
  sock.close();
});

test("live() loads again when a change came with its key only (too_large)", async () => {
  const {sock, ws} = await connected();
  let version = 0;
  const {load, calls} = loader(() => [{id: 1, v: version}]);
  const live = sock.live("items", {load});
  await until(() => ws.actions("subscribe").length === 1, 1000, "a subscribe");
  subscribed(ws, "items", 3);
  await live.ready;
  version = 5;
  ws.receive(durable("items", 4, {op: "update", table: "public.items", key: {id: 1}, row: null,
    xid: 300, too_large: true}));
  await until(() => ws.actions("unsubscribe").length === 1, 1000, "an unsubscribe");
  ws.receive({event: "unsubscribed", channel: "items", reply_to: ws.actions("unsubscribe")[0].id});
  await until(() => ws.actions("subscribe").length === 2, 1000, "a subscribe after the reload");
  assert.equal(calls.length, 2);
  assert.deepEqual(live.rows(), [{id: 1, v: 5}]);
  live.close();
  sock.close();
});
