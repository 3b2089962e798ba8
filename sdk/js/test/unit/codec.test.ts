import { test } from "node:test";
import assert from "node:assert/strict";

import {
  Op,
  ProtocolError,
  decode,
  decodeOnline,
  decodeRecoverReply,
  decodeStreamMessage,
  encode,
  encodeAck,
  encodeRecover,
} from "../../src/index.js";
import { bytes, hex, loadFixtures } from "./fixtures.js";

const fx = loadFixtures();

test("packets: encode matches proto/wire byte for byte, and decodes back", () => {
  for (const p of fx.packets) {
    assert.equal(hex(encode(p.op, p.seq, bytes(p.body_hex))), p.hex, p.name);
    const [got, ...rest] = decode(bytes(p.hex));
    assert.equal(rest.length, 0, p.name);
    assert.deepEqual({ op: got.op, seq: got.seq, body: hex(got.body) }, { op: p.op, seq: p.seq, body: p.body_hex }, p.name);
  }
});

test("op 9 batches are unpacked into their packets, in order", () => {
  const got = decode(bytes(fx.batch.hex)).map((p) => ({ op: p.op, seq: p.seq, body_hex: hex(p.body) }));
  assert.deepEqual(got, fx.batch.packets);
});

test("several packets in one frame, a batch among them", () => {
  const frame = new Uint8Array([...encode(1000, 1, "a"), ...bytes(fx.batch.hex), ...encode(Op.HeartbeatReply, 2, new Uint8Array([0, 0, 0, 7]))]);
  const got = decode(frame);
  assert.deepEqual(
    got.map((p) => p.op),
    [1000, ...fx.batch.packets.map((p) => p.op), Op.HeartbeatReply],
  );
  assert.equal(decodeOnline(got.at(-1)!.body), 7);
});

test("op 20 bodies decode as proto/wire wrote them", () => {
  for (const m of fx.stream_msgs) {
    const got = decodeStreamMessage(bytes(m.hex));
    assert.deepEqual({ ...got, body: hex(got.body) }, { stream: m.stream, epoch: m.epoch, pos: m.pos, op: m.op, body: m.body_hex });
  }
});

test("op 20: the README's example", () => {
  const got = decodeStreamMessage(bytes("0d 72 6f 6f 6d 3a 6c 69 76 65 3a 2f 2f 31 04 33 66 32 61 00 00 00 00 00 00 00 11 00 00 03 e8 68 69"));
  assert.deepEqual({ ...got, body: Buffer.from(got.body).toString() }, { stream: "room:live://1", epoch: "3f2a", pos: 17, op: 1000, body: "hi" });
});

test("op 21 is proto/wire's JSON; op 22 decodes; op 23 is proto/wire's bytes", () => {
  assert.equal(hex(encodeRecover(fx.recover_request.streams)), fx.recover_request.hex);
  assert.deepEqual(decodeRecoverReply(bytes(fx.recover_reply.hex)), fx.recover_reply.results);
  for (const a of fx.acks) assert.equal(hex(encodeAck(a.epoch, a.pos)), a.hex);
});

test("malformed input is a ProtocolError, never an out-of-range read", () => {
  const good = encode(1000, 1, "abc");
  const withHeaderLen = (n: number) => {
    const b = good.slice();
    new DataView(b.buffer).setUint16(4, n);
    return b;
  };
  const withPacketLen = (n: number) => {
    const b = good.slice();
    new DataView(b.buffer).setUint32(0, n);
    return b;
  };
  const cases: [string, Uint8Array][] = [
    ["truncated header", good.subarray(0, 10)],
    ["header length 12", withHeaderLen(12)],
    ["packet length below the header", withPacketLen(8)],
    ["packet longer than the frame", withPacketLen(64)],
    ["op 9 inside op 9", encode(Op.Raw, 0, encode(Op.Raw, 0, good))],
    ["body over the limit", encode(1000, 1, new Uint8Array(2 << 20))],
  ];
  for (const [name, b] of cases) assert.throws(() => decode(b), ProtocolError, name);

  const m = bytes(fx.stream_msgs[0].hex);
  const bad: [string, Uint8Array][] = [
    ["empty", new Uint8Array(0)],
    ["stream cut", m.subarray(0, 5)],
    ["epoch cut", m.subarray(0, 16)],
    ["position cut", m.subarray(0, 22)],
    ["empty stream", new Uint8Array([0, 1, 0x61, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 3, 0xe8])],
    ["epoch of 33", new Uint8Array([1, 0x61, 33, ...new Uint8Array(33).fill(0x61), 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 3, 0xe8])],
    ["position 0", new Uint8Array([1, 0x61, 1, 0x61, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0xe8])],
    ["position 2^53", new Uint8Array([1, 0x61, 1, 0x61, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0xe8])],
    ["operation 999", new Uint8Array([1, 0x61, 1, 0x61, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 3, 0xe7])],
    ["stream not UTF-8", new Uint8Array([1, 0xff, 1, 0x61, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 3, 0xe8])],
  ];
  for (const [name, b] of bad) assert.throws(() => decodeStreamMessage(b), ProtocolError, name);
  for (const body of ["", "[]", '{"streams":{}}', '{"streams":[{"stream":"x"}]}', "\xff"]) {
    assert.throws(() => decodeRecoverReply(new TextEncoder().encode(body)), ProtocolError, body);
  }
  assert.throws(() => encodeAck("", 1), RangeError);
  assert.throws(() => encodeAck("e", 0), RangeError);
  assert.throws(() => encodeAck("e", 2 ** 53), RangeError);
});
