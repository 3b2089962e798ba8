import { test } from "node:test";
import assert from "node:assert/strict";

import {
  Client,
  Close,
  Op,
  RequestError,
  bodyText,
  decodeStreamMessage,
  encode,
  onClose,
  type ClientEvents,
  type ClientOptions,
  type PositionStorage,
} from "../../src/index.js";
import { FakeClock, FakeServer, settle } from "./fakes.js";

function setup(extra: Partial<ClientOptions> = {}) {
  const clock = new FakeClock();
  const server = new FakeServer();
  const client = new Client({ url: "ws://node/sub", token: "t0", WebSocket: server.WebSocket, timers: clock, random: () => 1, ...extra });
  const events: { [K in keyof ClientEvents]?: ClientEvents[K][] } = {};
  const record = <K extends keyof ClientEvents>(e: K) =>
    client.on(e, (p) => {
      ((events[e] ??= []) as ClientEvents[K][]).push(p);
    });
  for (const e of ["connected", "message", "disconnected", "error", "online", "recovered", "resync"] as const) record(e);
  return { clock, server, client, events };
}

async function connected(s: ReturnType<typeof setup>, reply: object = { mid: 1, key: "k", rooms: ["live://1"], heartbeat: 30 }) {
  s.client.connect();
  await settle();
  s.server.last.open();
  s.server.last.auth(reply);
  return s.server.last;
}

function streamMsg(stream: string, epoch: string, pos: number, body: string, op = 1000): Uint8Array {
  const s = new TextEncoder().encode(stream);
  const e = new TextEncoder().encode(epoch);
  const b = new TextEncoder().encode(body);
  const out = new Uint8Array(1 + s.length + 1 + e.length + 12 + b.length);
  const v = new DataView(out.buffer);
  let off = 0;
  out[off++] = s.length;
  out.set(s, off);
  off += s.length;
  out[off++] = e.length;
  out.set(e, off);
  off += e.length;
  v.setUint32(off, Math.floor(pos / 2 ** 32));
  v.setUint32(off + 4, pos % 2 ** 32);
  v.setInt32(off + 8, op);
  out.set(b, off + 12);
  return encode(Op.StreamMsg, 0, out);
}

test("authenticates with its token, emits connected, messages from batches and the online count", async () => {
  const s = setup();
  const ws = await connected(s);
  assert.equal(ws.url, "ws://node/sub");
  assert.equal(ws.binaryType, "arraybuffer");
  assert.deepEqual(
    ws.sent.map((p) => [p.op, bodyText(p.body)]),
    [
      [Op.Auth, "t0"],
      [Op.Heartbeat, ""],
    ],
    "auth, then a heartbeat at once for the online count",
  );
  assert.equal(s.client.state, "connected");
  assert.equal(s.events.connected?.[0].key, "k");
  ws.deliver(encode(Op.Raw, 0, new Uint8Array([...encode(1000, 5, "a"), ...encode(1001, 6, "b")])), encode(1002, 7, "c"));
  assert.deepEqual(
    s.events.message?.map((m) => [m.op, m.seq, m.text()]),
    [
      [1000, 5, "a"],
      [1001, 6, "b"],
      [1002, 7, "c"],
    ],
  );
  ws.deliver(encode(Op.HeartbeatReply, 2, new Uint8Array([0, 0, 1, 0])));
  assert.equal(s.client.online, 256);
  assert.deepEqual(s.events.online, [256]);
});

test("heartbeats at the interval op 8 gives; two unanswered make the connection dead", async () => {
  const s = setup();
  const ws = await connected(s, { mid: 1, key: "k", heartbeat: 10 });
  const beats = () => ws.ops().filter((op) => op === Op.Heartbeat).length;
  assert.equal(beats(), 1, "one at once");
  ws.deliver(encode(Op.HeartbeatReply, 2, new Uint8Array(4)));
  s.clock.advance(9_999);
  assert.equal(beats(), 1);
  s.clock.advance(1);
  assert.equal(beats(), 2, "the next after the interval");
  ws.deliver(encode(Op.HeartbeatReply, 3, new Uint8Array(4)));
  s.clock.advance(10_000); // answered: another, unanswered
  s.clock.advance(10_000); // the second unanswered
  assert.equal(beats(), 4);
  assert.equal(s.client.state, "connected");
  s.clock.advance(10_000); // two unanswered: dead
  assert.equal(s.client.state, "waiting");
  assert.equal(s.events.disconnected?.[0].code, Close.Abnormal);
  assert.equal(s.events.disconnected?.[0].reconnect, true);
  assert.notEqual(ws.closedWith, null);
});

test("each close code: reconnect or stop, as the README's table says", () => {
  const table: [number, string][] = [
    [1000, "reconnect"],
    [1001, "reconnect"],
    [1002, "stop"],
    [1006, "reconnect"],
    [1008, "stop"],
    [1009, "stop"],
    [1011, "reconnect"],
    [1013, "reconnect"],
    [4008, "reconnect"],
    [4009, "stop"],
    [4029, "reconnect"],
    [4401, "token"],
    [4403, "stop"],
    [4422, "stop"],
    [4503, "reconnect"],
  ];
  for (const [code, want] of table) assert.equal(onClose(code), want, String(code));
});

test("reconnects with exponential backoff and full jitter; a stop code ends it", async () => {
  let r = 1;
  const s = setup({ random: () => r, backoff: { baseMs: 100, maxMs: 1000, factor: 2 } });
  await connected(s);
  const delays: number[] = [];
  for (let i = 0; i < 6; i++) {
    s.server.last.serverClose(Close.SlowConsumer, "slow");
    delays.push(s.events.disconnected!.at(-1)!.backoffMs!);
    s.clock.advance(delays.at(-1)!);
    await settle();
    s.server.last.open(); // connects, but is closed again before op 8
  }
  assert.deepEqual(delays, [100, 200, 400, 800, 1000, 1000]);
  assert.equal(s.server.sockets.length, 7);
  r = 0.25; // full jitter: anywhere from 0 to the cap
  s.server.last.serverClose(Close.GoingAway);
  assert.equal(s.events.disconnected!.at(-1)!.backoffMs, 250);
  s.clock.advance(250);
  await settle();
  s.server.last.open();
  s.server.last.serverClose(Close.Replaced, "replaced");
  assert.equal(s.client.state, "closed");
  assert.deepEqual(s.events.disconnected!.at(-1), { code: Close.Replaced, reason: "replaced", reconnect: false });
  s.clock.advance(60_000);
  await settle();
  assert.equal(s.server.sockets.length, 8, "no connect after a stop code");
});

test("a connection that stayed up resets the backoff", async () => {
  const s = setup({ backoff: { baseMs: 100, factor: 2 } });
  await connected(s);
  s.server.last.serverClose(Close.SlowConsumer);
  s.clock.advance(100);
  await settle();
  s.server.last.open();
  s.server.last.auth({ mid: 1, key: "k", heartbeat: 60 });
  s.clock.advance(20_000);
  s.server.last.serverClose(Close.SlowConsumer);
  assert.equal(s.events.disconnected!.at(-1)!.backoffMs, 100);
});

test("4401 asks getToken for a new token and reconnects with it; without getToken it stops", async () => {
  const tokens = ["fresh"];
  const s = setup({ getToken: () => tokens.shift() ?? "none" });
  s.client.connect();
  await settle();
  s.server.last.open();
  s.server.last.serverClose(Close.Unauthorized, "token expired");
  assert.equal(s.events.disconnected![0].reconnect, true);
  s.clock.advance(s.events.disconnected![0].backoffMs!);
  await settle();
  s.server.last.open();
  assert.equal(bodyText(s.server.last.sent[0].body), "fresh");

  const t = setup();
  t.client.connect();
  await settle();
  t.server.last.open();
  t.server.last.serverClose(Close.Unauthorized, "token expired");
  assert.equal(t.client.state, "closed");
  assert.equal(t.events.disconnected![0].reconnect, false);
  assert.match(t.events.error![0].message, /4401/);
});

test("1001 moves to the next node /im/nodes/weighted listed", async () => {
  const calls: string[] = [];
  const fetch = (async (url: string) => {
    calls.push(url);
    return new Response(JSON.stringify({ code: 0, data: { nodes: [{ host: "a", ws_port: 1 }, { host: "::1", ws_port: 2 }, { host: "c", tcp_port: 3 }] } }));
  }) as typeof globalThis.fetch;
  const s = setup({ url: undefined, api: "http://api:3111/", fetch });
  s.client.connect();
  await settle();
  assert.deepEqual(calls, ["http://api:3111/im/nodes/weighted?platform=web"]);
  assert.equal(s.server.last.url, "ws://a:1/sub");
  s.server.last.open();
  s.server.last.serverClose(Close.GoingAway, "draining");
  s.clock.advance(60_000);
  await settle();
  assert.equal(s.server.last.url, "ws://[::1]:2/sub");
});

test("send, joinRoom and subscribe settle on their replies, and are rejected on close", async () => {
  const s = setup();
  const ws = await connected(s);
  const sent = s.client.send("up");
  const joined = s.client.joinRoom("live://2");
  const sub = s.client.subscribe([1000, 1001]);
  const [up, room, subs] = ws.sent.slice(2);
  assert.deepEqual([up.op, bodyText(up.body)], [Op.SendMsg, "up"]);
  assert.deepEqual([room.op, bodyText(room.body)], [Op.ChangeRoom, "live://2"]);
  assert.deepEqual([subs.op, bodyText(subs.body)], [Op.Sub, "1000,1001"]);
  ws.deliver(encode(Op.ChangeRoomReply, room.seq, "live://2"), encode(Op.SendMsgReply, up.seq), encode(Op.SubReply, subs.seq, "1000,1001"));
  assert.equal(await joined, "live://2");
  await sent;
  await sub;
  assert.deepEqual(s.client.session?.rooms, ["live://2"]);

  const lost = s.client.send("lost");
  ws.serverClose(Close.RateLimited, "rate limit exceeded");
  await assert.rejects(lost, (err: unknown) => err instanceof RequestError && err.code === Close.RateLimited);
  await assert.rejects(s.client.send("offline"), RequestError);
});

test("a request unanswered within requestTimeoutMs is rejected", async () => {
  const s = setup({ requestTimeoutMs: 500 });
  await connected(s);
  const p = s.client.send("x");
  s.clock.advance(500);
  await assert.rejects(p, /no reply/);
});

test("an event handler that throws is reported as error, and the client goes on", async () => {
  const s = setup();
  const ws = await connected(s);
  s.client.on("message", () => {
    throw new Error("app bug");
  });
  ws.deliver(encode(1000, 1, "a"), encode(1000, 2, "b"));
  assert.equal(s.events.message?.length, 2);
  assert.deepEqual(
    s.events.error?.map((e) => e.message),
    ["app bug", "app bug"],
  );
  assert.equal(s.client.state, "connected");
});

test("a frame that does not parse (a server bug) closes the connection with 1000, a code a page may send, and reconnects", async () => {
  const s = setup();
  const ws = await connected(s);
  ws.deliver(new Uint8Array([0, 0, 0, 99, 0, 16]));
  assert.equal(ws.closedWith?.code, Close.Normal);
  assert.match(ws.closedWith?.reason ?? "", /protocol error/);
  assert.ok(s.events.error?.length);
  assert.equal(s.client.state, "waiting");
  assert.equal(s.events.disconnected?.at(-1)?.reconnect, true);
});

class MemoryStorage implements PositionStorage {
  saved: Record<string, { epoch: string; pos: number }> | null;
  saves = 0;
  constructor(initial: Record<string, { epoch: string; pos: number }> | null = null) {
    this.saved = initial;
  }
  load() {
    return this.saved;
  }
  save(p: Record<string, { epoch: string; pos: number }>) {
    this.saved = structuredClone(p);
    this.saves++;
  }
}

test("recovery: op 21 names the kept positions, op 22's refusals resync, op 20 moves positions and is stored", async () => {
  const storage = new MemoryStorage({ "room:live://1": { epoch: "r1", pos: 10 }, "room:old://9": { epoch: "o", pos: 3 } });
  const s = setup({ storage });
  const ws = await connected(s, {
    mid: 7,
    key: "k",
    rooms: ["live://1"],
    heartbeat: 30,
    recover: true,
    acks: true,
    streams: [
      { stream: "user:7", epoch: "u1", pos: 40 },
      { stream: "room:live://1", epoch: "r1", pos: 12 },
    ],
  });
  const recover = ws.sent[1]; // op 21 before the first heartbeat, which would end the hold
  assert.equal(recover.op, Op.Recover);
  const asked = JSON.parse(bodyText(recover.body)).streams;
  assert.deepEqual(
    asked.map((p: { stream: string }) => p.stream),
    ["room:live://1", "user:7", "room:old://9"],
    "the connection's streams first",
  );
  assert.deepEqual(asked[0], { stream: "room:live://1", epoch: "r1", pos: 10 }, "a kept position, not op 8's");
  ws.deliver(
    encode(
      Op.RecoverReply,
      recover.seq,
      JSON.stringify({
        streams: [
          { stream: "room:live://1", recovered: true, epoch: "r1", pos: 12 },
          { stream: "user:7", recovered: true, epoch: "u1", pos: 40 },
          { stream: "room:old://9", recovered: false, reason: "forbidden", epoch: "o", pos: 3 },
        ],
      }),
    ),
    streamMsg("room:live://1", "r1", 11, "m11"),
    streamMsg("room:live://1", "r1", 12, "m12"),
    streamMsg("user:7", "u1", 41, "u41"),
  );
  assert.equal(s.events.recovered?.length, 1);
  assert.deepEqual(s.events.resync, [{ stream: "room:old://9", reason: "forbidden", epoch: "o", pos: 3 }]);
  assert.deepEqual(
    s.events.message?.map((m) => [m.stream, m.pos, m.text()]),
    [
      ["room:live://1", 11, "m11"],
      ["room:live://1", 12, "m12"],
      ["user:7", 41, "u41"],
    ],
  );
  assert.deepEqual(storage.saved, { "room:live://1": { epoch: "r1", pos: 12 }, "user:7": { epoch: "u1", pos: 41 } });

  // A live epoch change resyncs the stream, then delivers.
  ws.deliver(streamMsg("room:live://1", "r2", 1, "new epoch"));
  assert.deepEqual(s.events.resync?.at(-1), { stream: "room:live://1", reason: "epoch", epoch: "r2", pos: 0 });
  assert.equal(s.events.message?.at(-1)?.text(), "new epoch");

  // A trimmed stream moves to where the server says.
  const s2 = setup({ storage: new MemoryStorage({ "user:7": { epoch: "u1", pos: 2 } }) });
  const ws2 = await connected(s2, { mid: 7, key: "k", heartbeat: 30, recover: true, acks: false, streams: [{ stream: "user:7", epoch: "u1", pos: 40 }] });
  ws2.deliver(encode(Op.RecoverReply, 2, JSON.stringify({ streams: [{ stream: "user:7", recovered: false, reason: "trimmed", epoch: "u1", pos: 52 }] })));
  assert.deepEqual(s2.client.streamPositions, [{ stream: "user:7", epoch: "u1", pos: 52 }]);
});

test("acks: the user stream's position once the handlers ran, at most once per interval, and on close", async () => {
  const s = setup({ ackIntervalMs: 1000 });
  const ws = await connected(s, { mid: 7, key: "k", heartbeat: 30, recover: true, acks: true, streams: [{ stream: "user:7", epoch: "u1", pos: 0 }] });
  ws.deliver(encode(Op.RecoverReply, 2, JSON.stringify({ streams: [{ stream: "user:7", recovered: true, epoch: "u1", pos: 0 }] })));
  ws.deliver(streamMsg("user:7", "u1", 1, "a"), streamMsg("user:7", "u1", 2, "b"), streamMsg("room:x://1", "r", 5, "room"));
  const acks = () => ws.sent.filter((p) => p.op === Op.Ack);
  assert.equal(acks().length, 0);
  s.clock.advance(1000);
  assert.equal(acks().length, 1);
  const b = acks()[0].body;
  assert.equal(b[0], 2);
  assert.equal(bodyText(b.subarray(1, 3)), "u1");
  assert.equal(new DataView(b.buffer, b.byteOffset + 3, 8).getUint32(4), 2);
  s.clock.advance(5000);
  assert.equal(acks().length, 1, "nothing new: no ack");
  ws.deliver(streamMsg("user:7", "u1", 3, "c"));
  s.client.close();
  assert.equal(acks().length, 2, "close sends the last");
  assert.equal(s.client.state, "closed");
});

test("a client without the recover claim gets plain messages and sends no op 21 or 23", async () => {
  const s = setup();
  const ws = await connected(s);
  ws.deliver(encode(1000, 3, "plain"));
  s.clock.advance(10_000);
  assert.ok(!ws.ops().includes(Op.Recover) && !ws.ops().includes(Op.Ack));
  assert.equal(s.events.message?.[0].stream, undefined);
});

test("decodeStreamMessage agrees with the helper building op 20 here", () => {
  const p = streamMsg("user:1", "e", 2 ** 40 + 3, "x", 1234);
  const m = decodeStreamMessage(p.subarray(16));
  assert.deepEqual([m.stream, m.epoch, m.pos, m.op], ["user:1", "e", 2 ** 40 + 3, 1234]);
});

test("a refusal that fires only error (Node 20's WebSocket) is retried, and so is a server that never answers op 7", async () => {
  const s = setup({ handshakeTimeoutMs: 5000, backoff: { baseMs: 100 } });
  s.client.connect();
  await settle();
  const refused = s.server.last;
  refused.onerror?.({}); // readyState 0, and no close ever follows
  assert.equal(s.client.state, "waiting");
  assert.equal(s.events.disconnected?.[0].code, Close.Abnormal);
  s.clock.advance(100);
  await settle();
  assert.equal(s.server.sockets.length, 2, "reconnected after the backoff");
  s.server.last.open(); // accepts, then never sends op 8
  s.clock.advance(4999);
  assert.equal(s.client.state, "connecting");
  s.clock.advance(1);
  assert.equal(s.client.state, "waiting");
  assert.match(s.events.disconnected!.at(-1)!.reason, /no auth reply/);
  assert.notEqual(s.server.last.closedWith, null);
});

test("a malformed op 8 or op 22 is a failed connection: closed with a code a page may use, then retried", async () => {
  for (const bad of ["<html>", "null", '{"mid":"1","key":"k"}', '{"key":"k"}']) {
    const s = setup();
    s.client.connect();
    await settle();
    s.server.last.open();
    s.server.last.deliver(encode(Op.AuthReply, 1, bad));
    assert.equal(s.client.state, "waiting", bad);
    assert.equal(s.server.last.closedWith?.code, Close.Normal, bad);
    assert.ok(s.events.error?.length, bad);
  }
  const s = setup();
  const ws = await connected(s, { mid: 7, key: "k", heartbeat: 30, recover: true, streams: [{ stream: "user:7", epoch: "u", pos: 0 }] });
  ws.deliver(encode(Op.RecoverReply, 2, JSON.stringify({ streams: [{ stream: "user:7", recovered: false, epoch: "", pos: 0.5 }] })));
  assert.equal(s.client.state, "waiting");
  assert.deepEqual(s.client.streamPositions, [{ stream: "user:7", epoch: "u", pos: 0 }], "nothing taken from the bad reply");
});

test("op 22 results for streams the client did not ask for are ignored", async () => {
  const storage = new MemoryStorage();
  const s = setup({ storage });
  const ws = await connected(s, { mid: 7, key: "k", heartbeat: 30, recover: true, streams: [{ stream: "user:7", epoch: "u", pos: 3 }] });
  const flood = Array.from({ length: 1000 }, (_, i) => ({ stream: `room:x://${i}`, recovered: false, reason: "trimmed", epoch: "e", pos: 1 }));
  ws.deliver(encode(Op.RecoverReply, 2, JSON.stringify({ streams: [{ stream: "user:7", recovered: true, epoch: "u", pos: 3 }, ...flood] })));
  assert.deepEqual(s.client.streamPositions, [{ stream: "user:7", epoch: "u", pos: 3 }]);
  assert.equal(s.events.resync, undefined);
  const saves = storage.saves;
  ws.deliver(encode(Op.HeartbeatReply, 3, new Uint8Array(4)));
  assert.equal(storage.saves, saves, "a frame that moved no position is not saved");
});

test("at most maxStreams positions are kept, the least recently moved dropped", async () => {
  const s = setup({ maxStreams: 3 });
  const ws = await connected(s, { mid: 7, key: "k", heartbeat: 30, recover: true, streams: [] });
  for (const r of ["a", "b", "c", "d"]) ws.deliver(streamMsg(`room:x://${r}`, "e", 1, r));
  assert.deepEqual(
    s.client.streamPositions.map((p) => p.stream),
    ["room:x://b", "room:x://c", "room:x://d"],
  );
});

test("the heartbeat period op 8 gives is bounded", async () => {
  for (const [hb, want] of [
    [3e6, 24 * 24 * 3600 * 1000],
    [-5, 30_000],
    ["abc", 30_000],
    [0.001, 1000],
  ] as const) {
    const s = setup();
    await connected(s, { mid: 1, key: "k", heartbeat: hb });
    assert.ok(s.clock.pending().includes(want), `heartbeat ${hb}: timers ${s.clock.pending()}, want one of ${want}`);
  }
});

test("close() with acks on and nothing received yet does not throw, and says it closed", async () => {
  const s = setup();
  await connected(s, { mid: 77, key: "k", heartbeat: 30, recover: true, acks: true, streams: [{ stream: "user:77", epoch: "u", pos: 0 }] });
  s.client.close();
  assert.equal(s.client.state, "closed");
  assert.equal(s.events.error, undefined);
  assert.deepEqual(s.events.disconnected?.at(-1), { code: Close.Normal, reason: "closed by the client", reconnect: false });
  assert.ok(!s.server.last.ops().includes(Op.Ack), "acked position 0");
});

test("a node that fails before op 8 is passed for the next; past the last the list is asked again", async () => {
  let lists = 0;
  const fetch = (async () => {
    lists++;
    return new Response(JSON.stringify({ code: 0, data: { nodes: [{ host: "a", ws_port: 1 }, { host: "b", ws_port: 2 }] } }));
  }) as unknown as typeof globalThis.fetch;
  const s = setup({ url: undefined, api: "http://api", fetch, backoff: { baseMs: 10, maxMs: 10 } });
  s.client.connect();
  await settle();
  const urls = [s.server.last.url];
  for (let i = 0; i < 2; i++) {
    s.server.last.onerror?.({}); // down: refused
    s.clock.advance(10);
    await settle();
    urls.push(s.server.last.url);
  }
  assert.deepEqual(urls, ["ws://a:1/sub", "ws://b:2/sub", "ws://a:1/sub"]);
  assert.equal(lists, 2);
});

test("a socket whose close() dispatches another error (Node 20, connecting) fails once, not in a loop", async () => {
  const s = setup({ backoff: { baseMs: 100 } });
  s.client.connect();
  await settle();
  s.server.last.errorOnClose = true;
  s.server.last.onerror?.({});
  assert.equal(s.client.state, "waiting");
  assert.equal(s.events.disconnected?.length, 1, "one failure, one retry");
  s.clock.advance(100);
  await settle();
  assert.equal(s.server.sockets.length, 2, "the retry went out");
});
