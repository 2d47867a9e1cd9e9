// Compiled with tsc --noEmit --strict against pgws.d.ts (tests/test_pgws_node.py): the API as an
// app written in TypeScript uses it; a line marked "@ts-expect-error" must fail to compile.
import PgwsSocket, {PgwsError, Position} from "../../pgws_sync/pgws";

const sock = new PgwsSocket("/ws", {minDelay: 500, heartbeatInterval: 20000, heartbeatTimeout: 5000,
  storage: sessionStorage, commit: "manual"});
sock.on("message", (m) => {
  if (m.channel !== undefined && m.offset !== undefined) sock.commit(m.channel, m.offset, m.epoch);
});
sock.on("close", (c) => console.log(c.code, c.willReconnect, c.delay === null ? "for good" : c.delay));
sock.on("subscribed", (s) => console.log(s.channel, s.resumed ? "resumed" : "fresh"));
sock.on("error", (e) => console.log(e.error, e.code, e.temporary));
const done: Promise<Record<string, unknown>> = sock.subscribe("ticks", {since: 10, epoch: "e"});
done.catch((e: PgwsError) => console.log(e.code === "timeout", e.temporary));
const at: Position | null = sock.position("ticks");
console.log(at?.offset, sock.enveloped, PgwsSocket.backoff(3), PgwsSocket.SUBPROTOCOL);
sock.joinRoom("lobby").then((r) => console.log(r.room));
const chat = sock.channel("chat");
chat.on("message", (m) => console.log(m.payload));
chat.subscribe().then(() => chat.publish({text: "hi"}));
interface Item { id: number; name: string }
const items = sock.live<Item>("items", {load: () => fetch("/items").then((r) => r.json())});
items.on("change", (c) => console.log(c.op, c.key, c.row?.name, c.previous?.name));
items.ready.then((l) => console.log(l.rows().map((r) => r.name), l.get(1)?.id, l.size));
sock.close(4000, "bye");
// @ts-expect-error: no such event
sock.on("messages", () => {});
// @ts-expect-error: commit is "auto" or "manual"
new PgwsSocket("/ws", {commit: "sometimes"});
// @ts-expect-error: live() needs {load}
sock.live("items", {});
