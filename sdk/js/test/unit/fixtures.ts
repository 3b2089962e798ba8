// The byte fixtures proto/wire encodes (go run ./proto/wire/internal/fixtures),
// written by `npm test`'s pretest step to build/fixtures.json.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

export interface WirePacket {
  op: number;
  seq: number;
  body_hex: string;
}

export interface Fixtures {
  packets: (WirePacket & { name: string; hex: string })[];
  batch: { hex: string; packets: WirePacket[] };
  stream_msgs: { hex: string; stream: string; epoch: string; pos: number; op: number; body_hex: string }[];
  recover_request: { streams: { stream: string; epoch: string; pos: number }[]; hex: string };
  recover_reply: { results: { stream: string; recovered: boolean; reason?: string; epoch: string; pos: number }[]; hex: string };
  acks: { epoch: string; pos: number; hex: string }[];
}

const here = dirname(fileURLToPath(import.meta.url));

export function loadFixtures(): Fixtures {
  // build/test/unit/fixtures.js → build/fixtures.json
  return JSON.parse(readFileSync(join(here, "..", "..", "fixtures.json"), "utf8")) as Fixtures;
}

export function hex(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString("hex");
}

export function bytes(h: string): Uint8Array {
  return new Uint8Array(Buffer.from(h.replace(/\s+/g, ""), "hex"));
}
