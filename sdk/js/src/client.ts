// The client: one connection at a time to an imcloud cloud node over
// WebSocket, kept up across closes with backoff, with heartbeats, rooms,
// operations, upstream messages, and — for a token with the recover
// claim — positions, recovery after reconnect and acks of the user stream.

import {
  Op,
  ProtocolError,
  bodyText,
  decode,
  decodeOnline,
  decodeRecoverReply,
  decodeStreamMessage,
  encode,
  encodeAck,
  encodeRecover,
  type Packet,
  type RecoverResult,
  type StreamPos,
} from "./codec.js";

/** What the server said in its op 8 reply. */
export interface Session {
  mid: number;
  key: string;
  rooms: string[];
  /** Seconds between heartbeats. */
  heartbeat: number;
  /** The connection gets positioned messages and may recover. */
  recover: boolean;
  /** Acks of the user stream are kept. */
  acks: boolean;
  /** The WebSocket URL connected to. */
  url: string;
}

/** A business message. */
export interface Message {
  op: number;
  seq: number;
  body: Uint8Array;
  /** The body as UTF-8 text. */
  text(): string;
  /** Set for a positioned message (a client with the recover claim). */
  stream?: string;
  epoch?: string;
  pos?: number;
}

/** Why the connection ended, and what the client does next. */
export interface Disconnect {
  code: number;
  reason: string;
  /** The client connects again (after backoffMs); false: it stopped. */
  reconnect: boolean;
  backoffMs?: number;
}

/** A stream the server could not recover: drop what you kept of it. */
export interface Resync {
  stream: string;
  reason: string;
  epoch: string;
  pos: number;
}

/** The events a client emits, and their payloads. */
export interface ClientEvents {
  connected: Session;
  message: Message;
  disconnected: Disconnect;
  error: Error;
  /** The room's online count, from each heartbeat reply. */
  online: number;
  /** op 22: the recovery's result per stream. */
  recovered: RecoverResult[];
  /** A stream not recovered, or whose epoch changed: resync it. */
  resync: Resync;
}

/** Where positions are kept across page loads (e.g. localStorage). */
export interface PositionStorage {
  load(): Record<string, { epoch: string; pos: number }> | null | undefined;
  save(positions: Record<string, { epoch: string; pos: number }>): void;
}

/** The WebSocket the client uses: the browser's, Node's (22+, or 20 with --experimental-websocket), or any alike. */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}
export type WebSocketFactory = new (url: string) => WebSocketLike;

/** Timers, replaceable in tests. */
export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(t: unknown): void;
  now(): number;
}

export interface ClientOptions {
  /** The node's WebSocket URL, e.g. ws://127.0.0.1:3102/sub. */
  url?: string;
  /** Or the push API's base URL (http://host:3111): nodes come from /im/nodes/weighted. */
  api?: string;
  /** The platform asked of /im/nodes/weighted (default "web"). */
  platform?: string;
  /** A client token. */
  token?: string;
  /** Called for a token at each connect, and again when the server refuses one (4401). */
  getToken?: () => string | Promise<string>;
  /** Keeps positions across page loads; memory only without it. */
  storage?: PositionStorage;
  /** Acknowledge user messages once the message handlers returned (default true). */
  autoAck?: boolean;
  /** At most one ack per this many ms (default 1000). */
  ackIntervalMs?: number;
  /** Reconnect backoff: full jitter of min(maxMs, baseMs × factor^attempt). */
  backoff?: { baseMs?: number; maxMs?: number; factor?: number };
  /** A packet body larger than this closes the connection (default 1 MiB). */
  maxBody?: number;
  /** How long an upstream send, room change or subscription waits for its reply (default 10 s). */
  requestTimeoutMs?: number;
  /** How long a connection may take from its start to the server's auth reply (default 10 s). */
  handshakeTimeoutMs?: number;
  /** The most streams whose positions are kept (default 256): the oldest others are forgotten. */
  maxStreams?: number;
  WebSocket?: WebSocketFactory;
  fetch?: typeof fetch;
  timers?: Timers;
  random?: () => number;
}

/** The client's state. */
export type State = "idle" | "connecting" | "connected" | "waiting" | "closed";

/** The close codes the server sends (README "Close codes"). */
export const Close = {
  Normal: 1000,
  GoingAway: 1001,
  ProtocolError: 1002,
  Abnormal: 1006,
  PolicyViolation: 1008,
  TooLarge: 1009,
  Internal: 1011,
  TryAgainLater: 1013,
  SlowConsumer: 4008,
  Replaced: 4009,
  RateLimited: 4029,
  Unauthorized: 4401,
  Forbidden: 4403,
  BadAck: 4422,
  RecoverAgain: 4503,
} as const;

/** What the client does on a close code: reconnect, or stop. */
export function onClose(code: number): "reconnect" | "token" | "stop" {
  switch (code) {
    case Close.Unauthorized:
      return "token";
    case Close.Replaced: // a newer connection of this key: it is the one
    case Close.Forbidden: // the same token will not help
    case Close.ProtocolError: // a client bug: reconnecting repeats it
    case Close.PolicyViolation:
    case Close.TooLarge:
    case Close.BadAck:
      return "stop";
    default:
      return "reconnect";
  }
}

/** The error an upstream send, room change or subscription is rejected with. */
export class RequestError extends Error {
  constructor(
    message: string,
    readonly code?: number,
  ) {
    super(message);
    this.name = "RequestError";
  }
}

type Handler<T> = (payload: T) => void;

interface Pending {
  op: number;
  resolve: (body: Uint8Array) => void;
  reject: (err: Error) => void;
  timer: unknown;
}

const realTimers: Timers = {
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (t) => clearTimeout(t as ReturnType<typeof setTimeout>),
  now: () => Date.now(),
};

/** Heartbeats missed in a row that make a connection dead. */
const MAX_MISSED_HEARTBEATS = 2;
/** A connection that stayed up this long resets the backoff. */
const STABLE_MS = 10_000;
/** op 21 names at most this many streams (the server's bound). */
const MAX_RECOVER_STREAMS = 65;

export class Client {
  private readonly opts: Required<Pick<ClientOptions, "platform" | "autoAck" | "ackIntervalMs" | "maxBody" | "requestTimeoutMs" | "handshakeTimeoutMs" | "maxStreams">> &
    ClientOptions;
  private readonly handlers = new Map<keyof ClientEvents, Set<Handler<never>>>();
  private readonly timers: Timers;
  private readonly random: () => number;
  private ws: WebSocketLike | null = null;
  private st: State = "idle";
  private seq = 0;
  private attempt = 0;
  private connectedAt = 0;
  private missed = 0;
  private heartbeatTimer: unknown = null;
  private handshakeTimer: unknown = null;
  private asked = new Set<string>(); // the streams this connection's op 21 named
  private dirty = false; // positions changed since the last save
  private retryTimer: unknown = null;
  private ackTimer: unknown = null;
  private pending = new Map<number, Pending>();
  private nodes: string[] = [];
  private nodeIndex = 0;
  private tokenRefused = false;
  private sess: Session | null = null;
  private count = 0;
  private readonly positions = new Map<string, { epoch: string; pos: number }>();
  private acked: { epoch: string; pos: number } | null = null;

  constructor(options: ClientOptions) {
    if (!options.url && !options.api) throw new TypeError("imcloud-client: url or api is required");
    if (!options.token && !options.getToken) throw new TypeError("imcloud-client: token or getToken is required");
    this.opts = { platform: "web", autoAck: true, ackIntervalMs: 1000, maxBody: 1 << 20, requestTimeoutMs: 10_000, handshakeTimeoutMs: 10_000, maxStreams: 256, ...options };
    this.timers = options.timers ?? realTimers;
    this.random = options.random ?? Math.random;
    const saved = options.storage?.load();
    for (const [stream, p] of Object.entries(saved ?? {}).slice(-this.opts.maxStreams)) {
      if (validPos(p)) this.positions.set(stream, { epoch: p.epoch, pos: p.pos });
    }
  }

  /** Subscribes to an event; returns the unsubscribe function. */
  on<E extends keyof ClientEvents>(event: E, fn: Handler<ClientEvents[E]>): () => void {
    let set = this.handlers.get(event);
    if (!set) this.handlers.set(event, (set = new Set()));
    set.add(fn as Handler<never>);
    return () => set.delete(fn as Handler<never>);
  }

  get state(): State {
    return this.st;
  }
  /** The op 8 reply of the current connection. */
  get session(): Session | null {
    return this.sess;
  }
  /** The room's online count, as of the last heartbeat reply. */
  get online(): number {
    return this.count;
  }
  /** The last position received of each stream. */
  get streamPositions(): StreamPos[] {
    return [...this.positions].map(([stream, p]) => ({ stream, ...p }));
  }

  /** Connects, and keeps connecting until close() or a close code that says stop. */
  connect(): void {
    if (this.st !== "idle" && this.st !== "closed") return;
    this.attempt = 0;
    this.open();
  }

  /** Closes the connection for good. */
  close(): void {
    try {
      this.flushAck();
    } catch (err) {
      this.emit("error", asError(err));
    }
    const was = this.st;
    this.st = "closed";
    this.timers.clearTimeout(this.retryTimer);
    this.teardown(Close.Normal, "closed by the client");
    this.sess = null;
    if (was !== "idle" && was !== "closed") this.emit("disconnected", { code: Close.Normal, reason: "closed by the client", reconnect: false });
  }

  /** Sends an upstream message (op 4); settled by the server's op 5. */
  send(body: Uint8Array | string): Promise<void> {
    return this.request(Op.SendMsg, Op.SendMsgReply, body).then(() => undefined);
  }

  /** Leaves the connection's rooms and joins room ("" leaves all); resolves with the room joined. */
  joinRoom(room: string): Promise<string> {
    return this.request(Op.ChangeRoom, Op.ChangeRoomReply, room).then((b) => {
      if (this.sess) this.sess.rooms = room ? [room] : [];
      return bodyText(b);
    });
  }

  /** Accepts these business operations too. */
  subscribe(ops: number[]): Promise<void> {
    return this.request(Op.Sub, Op.SubReply, ops.join(",")).then(() => undefined);
  }

  /** Stops accepting these business operations. */
  unsubscribe(ops: number[]): Promise<void> {
    return this.request(Op.Unsub, Op.UnsubReply, ops.join(",")).then(() => undefined);
  }

  /** Acknowledges the user stream up to the last message received now, rather than at the next interval. */
  ack(): void {
    this.flushAck();
  }

  private emit<E extends keyof ClientEvents>(event: E, payload: ClientEvents[E]): void {
    for (const fn of this.handlers.get(event) ?? []) {
      try {
        (fn as Handler<ClientEvents[E]>)(payload);
      } catch (err) {
        if (event !== "error") this.emit("error", asError(err));
      }
    }
  }

  private async open(): Promise<void> {
    this.st = "connecting";
    let url: string;
    let token: string;
    try {
      url = await this.pickURL();
      token = await this.token();
    } catch (err) {
      this.emit("error", asError(err));
      this.retry(Close.TryAgainLater, "no node or token: " + asError(err).message);
      return;
    }
    if (this.st !== "connecting") return; // closed meanwhile
    const WS = this.opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketFactory }).WebSocket;
    if (!WS) {
      this.st = "closed";
      this.emit("error", new Error("imcloud-client: no WebSocket (Node 20 needs --experimental-websocket, or pass options.WebSocket)"));
      return;
    }
    let ws: WebSocketLike;
    try {
      ws = new WS(url);
    } catch (err) {
      this.emit("error", asError(err));
      this.retry(Close.Abnormal, asError(err).message);
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.missed = 0;
    // No auth reply in time (a server that accepts and says nothing, a
    // proxy that hangs): the attempt failed.
    this.handshakeTimer = this.timers.setTimeout(() => this.fail(ws, "no auth reply in time"), this.opts.handshakeTimeoutMs);
    ws.onopen = () => this.guard(() => ws.send(encode(Op.Auth, this.nextSeq(), token)));
    ws.onmessage = (ev) => this.guard(() => this.onFrame(ws, ev.data, url));
    ws.onerror = () => {
      // Browsers follow an error with a close that says why; Node 20's
      // WebSocket, refused, fires only the error. A socket that never
      // opened has failed now; an open one gets a moment for its close.
      if (ws.readyState !== 1) this.fail(ws, "connection failed");
      else this.timers.setTimeout(() => this.fail(ws, "connection error"), 1000);
    };
    ws.onclose = (ev) => this.guard(() => this.onSocketClose(ws, ev.code, ev.reason));
  }

  /**
   * Ends a connection that failed without a close from the server. The
   * socket's handlers are detached before it is closed (teardown): Node's
   * WebSocket dispatches another error from close() on a socket still
   * connecting, and closing from within its handler recursed until the
   * stack gave out, leaving the client connecting forever (the SDK's
   * restart test, 1 run in 3 under load).
   */
  private fail(ws: WebSocketLike, reason: string): void {
    if (ws !== this.ws) return;
    this.onSocketClose(ws, Close.Abnormal, reason);
  }

  private guard(fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.emit("error", asError(err));
      if (err instanceof ProtocolError && this.ws) {
        // A frame we cannot read: this connection's state is unknown. A
        // server bug, so come back with backoff (a page may only close
        // with 1000 or 3000-4999).
        this.fail(this.ws, "protocol error: " + err.message.slice(0, 80));
      }
    }
  }

  private async pickURL(): Promise<string> {
    if (this.opts.url && !this.opts.api) return this.opts.url;
    if (this.nodes.length === 0 || this.nodeIndex >= this.nodes.length) {
      const f = this.opts.fetch ?? fetch;
      const res = await f(`${this.opts.api!.replace(/\/$/, "")}/im/nodes/weighted?platform=${encodeURIComponent(this.opts.platform)}`);
      if (!res.ok) throw new Error(`nodes/weighted: HTTP ${res.status}`);
      const data = (await res.json()) as { data?: { nodes?: { host: string; ws_port?: number; wss_port?: number }[] } };
      const secure = typeof location !== "undefined" && location.protocol === "https:";
      this.nodes = (data.data?.nodes ?? [])
        .map((n) => (n.wss_port && (secure || !n.ws_port) ? `wss://${hostPort(n.host, n.wss_port)}/sub` : n.ws_port ? `ws://${hostPort(n.host, n.ws_port)}/sub` : ""))
        .filter((u) => u !== "");
      this.nodeIndex = 0;
      if (this.nodes.length === 0) {
        if (this.opts.url) return this.opts.url;
        throw new Error("nodes/weighted lists no node");
      }
    }
    return this.nodes[this.nodeIndex];
  }

  private async token(): Promise<string> {
    if (this.opts.getToken && (this.tokenRefused || !this.opts.token)) {
      this.tokenRefused = false;
      return await this.opts.getToken();
    }
    return this.opts.token!;
  }

  private nextSeq(): number {
    this.seq = (this.seq + 1) >>> 0;
    return this.seq;
  }

  private onFrame(ws: WebSocketLike, data: unknown, url: string): void {
    if (ws !== this.ws) return;
    if (!(data instanceof ArrayBuffer)) throw new ProtocolError("a text frame");
    const packets = decode(new Uint8Array(data), this.opts.maxBody);
    for (const p of packets) this.onPacket(ws, p, url);
    this.savePositions();
  }

  private onPacket(ws: WebSocketLike, p: Packet, url: string): void {
    switch (p.op) {
      case Op.AuthReply:
        this.onAuth(ws, p.body, url);
        return;
      case Op.HeartbeatReply:
        this.missed = 0;
        this.count = decodeOnline(p.body);
        this.emit("online", this.count);
        return;
      case Op.StreamMsg:
        this.onStreamMessage(p);
        return;
      case Op.RecoverReply:
        this.onRecoverReply(p.body);
        return;
      case Op.SendMsgReply:
      case Op.ChangeRoomReply:
      case Op.SubReply:
      case Op.UnsubReply: {
        const req = this.pending.get(p.seq);
        if (req && req.op === p.op) {
          this.pending.delete(p.seq);
          this.timers.clearTimeout(req.timer);
          req.resolve(p.body);
        }
        return;
      }
    }
    if (p.op >= Op.MinBusiness) {
      const body = p.body;
      this.emit("message", { op: p.op, seq: p.seq, body, text: () => bodyText(body) });
    }
  }

  private onAuth(ws: WebSocketLike, body: Uint8Array, url: string): void {
    let r: Record<string, unknown>;
    try {
      r = JSON.parse(bodyText(body));
    } catch {
      throw new ProtocolError("op 8: not JSON");
    }
    if (typeof r !== "object" || r === null || !Number.isSafeInteger(r.mid) || typeof r.key !== "string") {
      throw new ProtocolError("op 8: no mid or key");
    }
    const rooms = Array.isArray(r.rooms) ? r.rooms.filter((x): x is string => typeof x === "string") : [];
    const streams = Array.isArray(r.streams) ? r.streams.filter(validStreamPos) : [];
    this.timers.clearTimeout(this.handshakeTimer);
    this.sess = { mid: r.mid as number, key: r.key, rooms, heartbeat: heartbeatSeconds(r.heartbeat), recover: r.recover === true, acks: r.acks === true, url };
    this.st = "connected";
    this.connectedAt = this.timers.now();
    this.asked.clear();
    if (this.sess.recover) {
      // A stream without a saved position starts where op 8 says; op 21
      // names every stream kept (this connection's first), the server
      // answers each.
      for (const sp of streams) {
        if (!this.positions.has(sp.stream)) this.setPosition(sp.stream, sp.epoch, sp.pos);
      }
      const mine = new Set(streams.map((sp) => sp.stream));
      const named = [...this.positions.keys()].sort((a, b) => Number(mine.has(b)) - Number(mine.has(a))).slice(0, MAX_RECOVER_STREAMS);
      this.asked = new Set(named);
      ws.send(encode(Op.Recover, this.nextSeq(), encodeRecover(named.map((stream) => ({ stream, ...this.positions.get(stream)! })))));
      // The first ack of a connection sends the position as it stands.
      this.acked = null;
    }
    // One heartbeat now: its reply carries the room's online count, which
    // otherwise would wait a whole interval (4 minutes by default).
    this.missed = 1;
    ws.send(encode(Op.Heartbeat, this.nextSeq()));
    this.scheduleHeartbeat(ws);
    this.emit("connected", { ...this.sess, rooms: [...rooms] });
  }

  /** Records a stream's position, keeping at most maxStreams (the least recently moved go first). */
  private setPosition(stream: string, epoch: string, pos: number): void {
    this.positions.delete(stream);
    this.positions.set(stream, { epoch, pos });
    this.dirty = true;
    if (this.positions.size > this.opts.maxStreams) {
      for (const old of this.positions.keys()) {
        if (this.positions.size <= this.opts.maxStreams) break;
        if (old !== stream) this.positions.delete(old);
      }
    }
  }

  private onStreamMessage(p: Packet): void {
    const m = decodeStreamMessage(p.body);
    const known = this.positions.get(m.stream);
    if (known && known.epoch !== m.epoch) {
      this.emit("resync", { stream: m.stream, reason: "epoch", epoch: m.epoch, pos: m.pos - 1 });
    } else if (known && m.pos <= known.pos) {
      return; // had it: the server does not send one twice, but a stored position may be ahead
    }
    this.setPosition(m.stream, m.epoch, m.pos);
    const body = m.body;
    this.emit("message", { op: m.op, seq: p.seq, body, text: () => bodyText(body), stream: m.stream, epoch: m.epoch, pos: m.pos });
    if (this.sess?.acks && this.opts.autoAck && m.stream === `user:${this.sess.mid}`) this.scheduleAck();
  }

  private onRecoverReply(body: Uint8Array): void {
    const results = decodeRecoverReply(body);
    // Only the streams this connection asked for: a server cannot make
    // the client keep (and store) streams it never had.
    const mine = results.filter((r) => this.asked.has(r.stream));
    for (const r of mine) {
      if (!r.recovered) {
        if (r.reason === "forbidden") {
          this.positions.delete(r.stream);
          this.dirty = true;
        } else {
          this.setPosition(r.stream, r.epoch, r.pos);
        }
        this.emit("resync", { stream: r.stream, reason: r.reason ?? "", epoch: r.epoch, pos: r.pos });
      }
    }
    this.emit("recovered", mine);
  }

  private scheduleHeartbeat(ws: WebSocketLike): void {
    const ms = (this.sess?.heartbeat ?? 30) * 1000;
    this.heartbeatTimer = this.timers.setTimeout(() => {
      if (ws !== this.ws || !this.ws) return;
      if (this.missed >= MAX_MISSED_HEARTBEATS) {
        // Two heartbeats unanswered: the connection is dead, whatever
        // the socket says.
        this.ws.close(Close.Normal, "heartbeat replies missed");
        this.onSocketClose(ws, Close.Abnormal, "heartbeat replies missed");
        return;
      }
      this.missed++;
      this.guard(() => ws.send(encode(Op.Heartbeat, this.nextSeq())));
      this.scheduleHeartbeat(ws);
    }, ms);
  }

  private scheduleAck(): void {
    if (this.ackTimer !== null) return;
    this.ackTimer = this.timers.setTimeout(() => {
      this.ackTimer = null;
      this.guard(() => this.flushAck());
    }, this.opts.ackIntervalMs);
  }

  private flushAck(): void {
    this.timers.clearTimeout(this.ackTimer);
    this.ackTimer = null;
    if (!this.sess?.acks || !this.ws || this.st !== "connected") return;
    const p = this.positions.get(`user:${this.sess.mid}`);
    // Position 0 is "nothing received yet" (a new user's stream): nothing to ack.
    if (!p || p.pos < 1 || (this.acked && this.acked.epoch === p.epoch && this.acked.pos >= p.pos)) return;
    this.ws.send(encode(Op.Ack, this.nextSeq(), encodeAck(p.epoch, p.pos)));
    this.acked = { ...p };
  }

  private savePositions(): void {
    if (!this.opts.storage || !this.dirty) return;
    this.dirty = false;
    try {
      this.opts.storage.save(Object.fromEntries(this.positions));
    } catch (err) {
      this.emit("error", asError(err));
    }
  }

  private request(op: number, replyOp: number, body: Uint8Array | string): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      const ws = this.ws;
      if (!ws || this.st !== "connected") {
        reject(new RequestError("not connected"));
        return;
      }
      const seq = this.nextSeq();
      const timer = this.timers.setTimeout(() => {
        if (this.pending.delete(seq)) reject(new RequestError(`no reply to op ${op} in ${this.opts.requestTimeoutMs} ms`));
      }, this.opts.requestTimeoutMs);
      this.pending.set(seq, { op: replyOp, resolve, reject, timer });
      try {
        ws.send(encode(op, seq, body));
      } catch (err) {
        this.pending.delete(seq);
        this.timers.clearTimeout(timer);
        reject(asError(err));
      }
    });
  }

  private teardown(code: number, reason: string): void {
    this.timers.clearTimeout(this.heartbeatTimer);
    this.timers.clearTimeout(this.handshakeTimer);
    this.timers.clearTimeout(this.ackTimer);
    this.ackTimer = null;
    for (const [seq, req] of this.pending) {
      this.pending.delete(seq);
      this.timers.clearTimeout(req.timer);
      req.reject(new RequestError(`connection closed (${code}${reason ? ": " + reason : ""})`, code));
    }
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(Close.Normal, reason.slice(0, 60));
      } catch {
        // already closed
      }
    }
  }

  private onSocketClose(ws: WebSocketLike, code: number, reason: string): void {
    if (ws !== this.ws) return;
    const wasConnected = this.st === "connected";
    if (wasConnected && this.timers.now() - this.connectedAt >= STABLE_MS) this.attempt = 0;
    this.teardown(code, reason);
    this.sess = null;
    if (this.st === "closed") return;
    const what = onClose(code);
    if (what === "stop" || (what === "token" && !this.opts.getToken)) {
      this.st = "closed";
      this.emit("disconnected", { code, reason, reconnect: false });
      if (what === "token") this.emit("error", new Error(`token refused (4401${reason ? ": " + reason : ""}); no getToken to ask for another`));
      return;
    }
    if (what === "token") this.tokenRefused = true;
    // Drained (1001), or never got as far as op 8 (down, refused, hung):
    // the next node listed; past the last, the list is asked again.
    if (this.nodes.length > 0 && (code === Close.GoingAway || !wasConnected)) this.nodeIndex++;
    this.retry(code, reason);
  }

  private retry(code: number, reason: string): void {
    const b = this.opts.backoff ?? {};
    const cap = Math.min(b.maxMs ?? 30_000, (b.baseMs ?? 1000) * (b.factor ?? 1.6) ** this.attempt);
    const delay = Math.floor(this.random() * cap);
    this.attempt++;
    this.st = "waiting";
    this.emit("disconnected", { code, reason, reconnect: true, backoffMs: delay });
    this.retryTimer = this.timers.setTimeout(() => {
      if (this.st === "waiting") this.open();
    }, delay);
  }
}

function hostPort(host: string, port: number): string {
  return host.includes(":") && !host.startsWith("[") ? `[${host}]:${port}` : `${host}:${port}`;
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

/** The heartbeat period op 8 gives, bounded: 1 s to 24 days, 30 s when absent or not a number. */
function heartbeatSeconds(v: unknown): number {
  return typeof v === "number" && Number.isFinite(v) && v > 0 ? Math.min(Math.max(v, 1), 24 * 24 * 3600) : 30;
}

function validPos(p: unknown): p is { epoch: string; pos: number } {
  const q = p as { epoch?: unknown; pos?: unknown } | null;
  return !!q && typeof q.epoch === "string" && q.epoch.length >= 1 && q.epoch.length <= 32 && Number.isSafeInteger(q.pos) && (q.pos as number) >= 0;
}

function validStreamPos(p: unknown): p is StreamPos {
  return validPos(p) && typeof (p as { stream?: unknown }).stream === "string";
}
