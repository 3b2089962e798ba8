// The goim v2 wire protocol as imcloud speaks it (README "Client
// protocol"): 16-byte big-endian headers, op 9 batches, and the positioned
// delivery of ops 20–23. Pure functions over Uint8Array: no socket, no
// timer, nothing of the browser or of Node.

/** Operations of the protocol. */
export const Op = {
  Heartbeat: 2,
  HeartbeatReply: 3,
  SendMsg: 4,
  SendMsgReply: 5,
  Auth: 7,
  AuthReply: 8,
  Raw: 9,
  ChangeRoom: 12,
  ChangeRoomReply: 13,
  Sub: 14,
  SubReply: 15,
  Unsub: 16,
  UnsubReply: 17,
  StreamMsg: 20,
  Recover: 21,
  RecoverReply: 22,
  Ack: 23,
  /** Business operations are this or more. */
  MinBusiness: 1000,
} as const;

/** The header's length and version; a packet is at most 16 + body. */
export const HEADER_LEN = 16;
const VERSION = 1;
/** The largest position a stream gives: 2^53 − 1, exact in a number. */
export const MAX_POS = Number.MAX_SAFE_INTEGER;
const MAX_EPOCH_LEN = 32;

/** One packet: its operation, sequence and body. */
export interface Packet {
  op: number;
  seq: number;
  body: Uint8Array;
}

/** A message of a stream: op 20's body. */
export interface StreamMessage {
  stream: string;
  epoch: string;
  pos: number;
  op: number;
  body: Uint8Array;
}

/** A stream position: the last message received of a stream. */
export interface StreamPos {
  stream: string;
  epoch: string;
  pos: number;
}

/** op 22's result for one stream. */
export interface RecoverResult {
  stream: string;
  recovered: boolean;
  /** Why not: epoch, trimmed, future, no_history or forbidden. */
  reason?: string;
  epoch: string;
  pos: number;
}

/** The protocol was broken by the peer: the connection should close. */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder("utf-8", { fatal: true });

/** Encodes one packet. */
export function encode(op: number, seq: number, body: Uint8Array | string = new Uint8Array(0)): Uint8Array {
  const b = typeof body === "string" ? utf8.encode(body) : body;
  const out = new Uint8Array(HEADER_LEN + b.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, out.length);
  v.setUint16(4, HEADER_LEN);
  v.setUint16(6, VERSION);
  v.setInt32(8, op);
  v.setUint32(12, seq >>> 0);
  out.set(b, HEADER_LEN);
  return out;
}

/**
 * Decodes the packets of one frame (a WebSocket message, or bytes of a
 * TCP stream that hold whole packets), unpacking op 9 batches: the
 * result is the packets in order, none of op 9. Bodies are views into buf.
 */
export function decode(buf: Uint8Array, maxBody = 1 << 20): Packet[] {
  const out: Packet[] = [];
  decodeInto(buf, out, maxBody, true);
  return out;
}

function decodeInto(buf: Uint8Array, out: Packet[], maxBody: number, unpack: boolean): void {
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let off = 0;
  while (off < buf.length) {
    if (buf.length - off < HEADER_LEN) {
      throw new ProtocolError(`truncated header: ${buf.length - off} bytes`);
    }
    const packetLen = v.getUint32(off);
    const headerLen = v.getUint16(off + 4);
    const op = v.getInt32(off + 8);
    const seq = v.getUint32(off + 12);
    if (headerLen !== HEADER_LEN) {
      throw new ProtocolError(`header length ${headerLen}, want ${HEADER_LEN}`);
    }
    if (packetLen < HEADER_LEN || packetLen - HEADER_LEN > maxBody) {
      throw new ProtocolError(`packet length ${packetLen}`);
    }
    if (packetLen > buf.length - off) {
      throw new ProtocolError(`packet of ${packetLen} bytes in ${buf.length - off}`);
    }
    const body = buf.subarray(off + HEADER_LEN, off + packetLen);
    if (op === Op.Raw) {
      if (!unpack) {
        throw new ProtocolError("op 9 inside op 9");
      }
      decodeInto(body, out, maxBody, false);
    } else {
      out.push({ op, seq, body });
    }
    off += packetLen;
  }
}

/** Decodes op 20's body. */
export function decodeStreamMessage(body: Uint8Array): StreamMessage {
  const v = new DataView(body.buffer, body.byteOffset, body.byteLength);
  let off = 0;
  const need = (n: number, what: string) => {
    if (body.length - off < n) {
      throw new ProtocolError(`op 20: truncated at its ${what}`);
    }
  };
  need(1, "stream length");
  const s = body[off++];
  need(s, "stream");
  if (s === 0) throw new ProtocolError("op 20: empty stream");
  const stream = text(body.subarray(off, off + s), "op 20: stream");
  off += s;
  need(1, "epoch length");
  const e = body[off++];
  if (e === 0 || e > MAX_EPOCH_LEN) throw new ProtocolError(`op 20: epoch of ${e} bytes`);
  need(e, "epoch");
  const epoch = text(body.subarray(off, off + e), "op 20: epoch");
  off += e;
  need(12, "position and operation");
  const hi = v.getUint32(off);
  const lo = v.getUint32(off + 4);
  const pos = hi * 2 ** 32 + lo;
  if (pos < 1 || pos > MAX_POS) throw new ProtocolError(`op 20: position ${pos}`);
  const op = v.getInt32(off + 8);
  if (op < Op.MinBusiness) throw new ProtocolError(`op 20: operation ${op}`);
  return { stream, epoch, pos, op, body: body.subarray(off + 12) };
}

function text(b: Uint8Array, what: string): string {
  try {
    return fromUtf8.decode(b);
  } catch {
    throw new ProtocolError(`${what} is not UTF-8`);
  }
}

/** op 21's body: the last positions of the streams to recover. */
export function encodeRecover(positions: StreamPos[]): Uint8Array {
  return utf8.encode(JSON.stringify({ streams: positions.map((p) => ({ stream: p.stream, epoch: p.epoch, pos: p.pos })) }));
}

/** Decodes op 22's body. */
export function decodeRecoverReply(body: Uint8Array): RecoverResult[] {
  let v: unknown;
  try {
    v = JSON.parse(text(body, "op 22"));
  } catch (err) {
    throw err instanceof ProtocolError ? err : new ProtocolError("op 22: not JSON");
  }
  const streams = (v as { streams?: unknown })?.streams;
  if (!Array.isArray(streams)) throw new ProtocolError("op 22: no streams");
  return streams.map((r): RecoverResult => {
    if (typeof r?.stream !== "string" || typeof r.recovered !== "boolean" || typeof r.epoch !== "string" || typeof r.pos !== "number") {
      throw new ProtocolError("op 22: a result lacks stream, recovered, epoch or pos");
    }
    if (r.epoch.length < 1 || r.epoch.length > MAX_EPOCH_LEN || !Number.isSafeInteger(r.pos) || r.pos < 0) {
      throw new ProtocolError(`op 22: ${r.stream}: epoch ${JSON.stringify(r.epoch).slice(0, 40)} or position ${r.pos} out of range`);
    }
    const out: RecoverResult = { stream: r.stream, recovered: r.recovered, epoch: r.epoch, pos: r.pos };
    if (typeof r.reason === "string") out.reason = r.reason;
    return out;
  });
}

/** op 23's body: the user stream acknowledged up to pos. */
export function encodeAck(epoch: string, pos: number): Uint8Array {
  const e = utf8.encode(epoch);
  if (e.length === 0 || e.length > MAX_EPOCH_LEN) throw new RangeError(`epoch of ${e.length} bytes`);
  if (!Number.isSafeInteger(pos) || pos < 1) throw new RangeError(`position ${pos}`);
  const out = new Uint8Array(1 + e.length + 8);
  const v = new DataView(out.buffer);
  out[0] = e.length;
  out.set(e, 1);
  v.setUint32(1 + e.length, Math.floor(pos / 2 ** 32));
  v.setUint32(5 + e.length, pos % 2 ** 32);
  return out;
}

/** The online count an op 3 heartbeat reply carries. */
export function decodeOnline(body: Uint8Array): number {
  if (body.length < 4) return 0;
  return new DataView(body.buffer, body.byteOffset, 4).getUint32(0);
}

/** UTF-8 text of a body. */
export function bodyText(body: Uint8Array): string {
  return new TextDecoder().decode(body);
}
