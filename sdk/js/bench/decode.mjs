// How many messages a second the SDK decodes, on this machine's Node:
// the codec alone (op 9 batches of op 20 messages, 100-byte bodies), and
// the whole client (frame → message event, positions kept). Prints one
// line per case; BENCHMARKS.md records the numbers.
//
//   npm run build && node bench/decode.mjs
import { Client, Op, decode, decodeStreamMessage, encode } from "../dist/index.js";

const body = new TextEncoder().encode("x".repeat(100));
function op20(pos) {
  const stream = new TextEncoder().encode("room:live://1000");
  const epoch = new TextEncoder().encode("9f86d081884c7d65");
  const b = new Uint8Array(1 + stream.length + 1 + epoch.length + 12 + body.length);
  const v = new DataView(b.buffer);
  let o = 0;
  b[o++] = stream.length;
  b.set(stream, o);
  o += stream.length;
  b[o++] = epoch.length;
  b.set(epoch, o);
  o += epoch.length;
  v.setUint32(o + 4, pos);
  v.setInt32(o + 8, 1000);
  b.set(body, o + 12);
  return encode(Op.StreamMsg, pos, b);
}
const perBatch = 32;
function batch(first) {
  const parts = Array.from({ length: perBatch }, (_, i) => op20(first + i));
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    all.set(p, o);
    o += p.length;
  }
  return encode(Op.Raw, 0, all);
}

function run(name, seconds, step) {
  let n = 0;
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end) n += step(n);
  const rate = n / seconds;
  console.log(`${name}: ${Math.round(rate).toLocaleString("en")} messages/s`);
  return rate;
}

const frames = Array.from({ length: 64 }, (_, i) => batch(1 + i * perBatch));
run("codec (decode + op 20)", 3, (n) => {
  let k = 0;
  for (const p of decode(frames[(n / perBatch) % 64 | 0])) {
    decodeStreamMessage(p.body);
    k++;
  }
  return k;
});

// The whole client, on a socket that hands it frames directly.
let sock;
class Sock {
  binaryType = "";
  readyState = 1;
  onopen = null;
  onmessage = null;
  onclose = null;
  onerror = null;
  constructor() {
    sock = this;
  }
  send() {}
  close() {}
}
const client = new Client({ url: "ws://bench/sub", token: "t", WebSocket: Sock });
let received = 0;
client.on("message", () => received++);
client.connect();
await new Promise((r) => setTimeout(r, 0));
sock.onopen({});
sock.onmessage({ data: encode(Op.AuthReply, 1, JSON.stringify({ mid: 1, key: "k", heartbeat: 3600, recover: true, streams: [{ stream: "room:live://1000", epoch: "9f86d081884c7d65", pos: 0 }] })).slice().buffer });
// One frame, its positions rewritten in place for each delivery (each
// message must be past the last, or the client drops it as had).
const frame = batch(1).slice();
const view = new DataView(frame.buffer);
const posAt = [];
for (let o = 16; o < frame.length; ) {
  const len = view.getUint32(o);
  const s = frame[o + 16];
  const e = frame[o + 17 + s];
  posAt.push(o + 18 + s + e);
  o += len;
}
let pos = 1;
run("client (frame → message event)", 3, () => {
  for (const at of posAt) view.setUint32(at + 4, pos++);
  const before = received;
  sock.onmessage({ data: frame.buffer });
  return received - before;
});
client.close();
