// The SDK against a real imcloud built from this tree.
import { test, after } from "node:test";
import assert from "node:assert/strict";

import { Client, type Message, type ClientOptions } from "../../src/index.js";
import { Server, sign, waitFor } from "./server.js";

const clients: Client[] = [];
after(() => clients.forEach((c) => c.close()));

function connect(opts: ClientOptions): { c: Client; got: Message[]; states: string[] } {
  const c = new Client({ backoff: { baseMs: 100, maxMs: 500 }, ...opts });
  clients.push(c);
  const got: Message[] = [];
  const states: string[] = [];
  c.on("message", (m) => got.push(m));
  c.on("connected", () => states.push("connected"));
  c.on("disconnected", (d) => states.push(`closed ${d.code}`));
  c.on("error", (e) => states.push(`error ${e.message}`));
  c.connect();
  return { c, got, states };
}

test("a Node client receives key, mid, room and broadcast pushes", { timeout: 30_000 }, async (t) => {
  const srv = new Server();
  await srv.start();
  t.after(() => srv.stop());
  const { c, got } = connect({ url: srv.ws, token: sign({ mid: 11, key: "node-k", rooms: ["live://sdk", "live://*"] }) });
  await waitFor("connected", () => c.state === "connected");
  await srv.push("keys", { operation: "1000", keys: "node-k" }, "by key");
  await srv.push("mids", { operation: "1001", mids: "11" }, "by mid");
  await srv.push("room", { operation: "1002", type: "live", room: "sdk" }, "to the room");
  await srv.push("all", { operation: "1003" }, "to everyone");
  await waitFor("four messages", () => got.length >= 4);
  assert.deepEqual(
    got.map((m) => [m.op, m.text()]).sort(),
    [
      [1000, "by key"],
      [1001, "by mid"],
      [1002, "to the room"],
      [1003, "to everyone"],
    ],
  );
  // Upstream, room change, subscriptions: each settled by the server.
  await c.send("up");
  assert.equal(await c.joinRoom("live://other"), "live://other");
  // Subscribing narrows "every operation" to those named (goim's rule).
  await c.subscribe([1001, 1002]);
  await c.unsubscribe([1002]);
  await srv.push("keys", { operation: "1000", keys: "node-k" }, "not accepted");
  await srv.push("keys", { operation: "1001", keys: "node-k" }, "fence");
  await waitFor("the fence", () => got.at(-1)?.text() === "fence");
  assert.ok(!got.some((m) => m.text() === "not accepted"), "an unsubscribed operation arrived");
});

test("the API's node list picks the node", { timeout: 30_000 }, async (t) => {
  const srv = new Server();
  await srv.start();
  t.after(() => srv.stop());
  const { c } = connect({ api: srv.api, token: sign({ mid: 12 }) });
  await waitFor("connected", () => c.state === "connected");
  assert.equal(c.session?.url, srv.ws);
});

test("an expired token makes the client call getToken and connect with the new one", { timeout: 30_000 }, async (t) => {
  const srv = new Server();
  await srv.start();
  t.after(() => srv.stop());
  let calls = 0;
  const { c, states } = connect({
    url: srv.ws,
    token: sign({ mid: 13 }, -60),
    getToken: () => {
      calls++;
      return sign({ mid: 13 });
    },
  });
  await waitFor("connected", () => c.state === "connected");
  assert.equal(calls, 1);
  assert.deepEqual(states.slice(0, 2), ["closed 4401", "connected"]);
});

test("the server restarting: the client reconnects, recovers and misses nothing", { timeout: 60_000 }, async (t) => {
  // History in Redis outlives the process: the streams keep their epoch.
  const srv = new Server({ redis: true });
  await srv.start();
  t.after(() => srv.stop());
  const mid = 100_000 + (process.pid % 100_000);
  const room = `sdk://r${process.pid}`;
  const { c, got, states } = connect({ url: srv.ws, token: sign({ mid, rooms: [room], recover: true }) });
  await waitFor("connected", () => c.state === "connected");
  const [type, id] = room.split("://");
  const pushBoth = async (i: number) => {
    await srv.push("mids", { operation: "1000", mids: String(mid) }, `user ${i}`);
    await srv.push("room", { operation: "1000", type, room: id }, `room ${i}`);
  };
  for (let i = 1; i <= 5; i++) await pushBoth(i);
  await waitFor("the first ten", () => got.length >= 10).catch((err) => {
    throw new Error(`${err.message}; got ${got.map((m) => m.text())}; client ${states}; server:\n${srv.log}`);
  });
  await srv.stop();
  await waitFor("the client to see the close", () => c.state !== "connected");
  await srv.start();
  // Pushed before the client is back: recovery must bring them.
  for (let i = 6; i <= 10; i++) await pushBoth(i);
  await waitFor("all twenty", () => got.length >= 20, 20_000).catch((err) => {
    throw new Error(`${err.message}; got ${got.map((m) => `${m.stream}#${m.pos} ${m.text()}`)}; client ${states}, now ${c.state}; server:\n${srv.log.slice(-3000)}`);
  });
  for (const stream of [`user:${mid}`, `room:${room}`]) {
    const mine = got.filter((m) => m.stream === stream);
    assert.deepEqual(
      mine.map((m) => m.text()),
      Array.from({ length: 10 }, (_, i) => `${stream.startsWith("user") ? "user" : "room"} ${i + 1}`),
      stream,
    );
    assert.deepEqual(
      mine.map((m) => m.pos),
      mine.map((_, i) => mine[0].pos! + i),
      `${stream}: positions strictly rising by one`,
    );
  }
  assert.ok(states.includes("closed 1001"), `closes seen: ${states}`);
});
