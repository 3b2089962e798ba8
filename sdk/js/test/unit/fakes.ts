// A fake clock and a fake WebSocket: the client's timing and close
// handling driven step by step, with no socket and no waiting.
import { Op, decode, encode, type Packet, type Timers, type WebSocketLike } from "../../src/index.js";

export class FakeClock implements Timers {
  private t = 0;
  private seq = 0;
  private readonly due = new Map<number, { at: number; fn: () => void }>();

  now(): number {
    return this.t;
  }
  setTimeout(fn: () => void, ms: number): unknown {
    const id = ++this.seq;
    this.due.set(id, { at: this.t + ms, fn });
    return id;
  }
  clearTimeout(id: unknown): void {
    this.due.delete(id as number);
  }
  /** Moves the clock forward, running what falls due, in time order. */
  advance(ms: number): void {
    const end = this.t + ms;
    for (;;) {
      let next: [number, { at: number; fn: () => void }] | undefined;
      for (const e of this.due) if (e[1].at <= end && (!next || e[1].at < next[1].at)) next = e;
      if (!next) break;
      this.due.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
    }
    this.t = end;
  }
  /** The delays of the timers set now, from now. */
  pending(): number[] {
    return [...this.due.values()].map((d) => d.at - this.t).sort((a, b) => a - b);
  }
}

/** Sockets the client opened, newest last. */
export class FakeServer {
  readonly sockets: FakeSocket[] = [];
  readonly WebSocket: new (url: string) => WebSocketLike;

  constructor() {
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const server = this;
    this.WebSocket = class extends FakeSocket {
      constructor(url: string) {
        super(url);
        server.sockets.push(this);
      }
    };
  }
  get last(): FakeSocket {
    return this.sockets[this.sockets.length - 1];
  }
}

export class FakeSocket implements WebSocketLike {
  binaryType = "blob";
  readyState = 0;
  readonly sent: Packet[] = [];
  closedWith: { code?: number; reason?: string } | null = null;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;

  constructor(readonly url: string) {}

  send(data: Uint8Array): void {
    this.sent.push(...decode(data));
  }
  /** Like Node 20's WebSocket: close() on a socket still connecting dispatches an error, at once. */
  errorOnClose = false;
  close(code?: number, reason?: string): void {
    this.closedWith ??= { code, reason };
    if (this.errorOnClose && this.readyState === 0) this.onerror?.({});
  }
  // The server's side.
  open(): void {
    this.readyState = 1;
    this.onopen?.({});
  }
  deliver(...packets: Uint8Array[]): void {
    const all = new Uint8Array(packets.reduce((n, p) => n + p.length, 0));
    let off = 0;
    for (const p of packets) {
      all.set(p, off);
      off += p.length;
    }
    this.onmessage?.({ data: all.buffer });
  }
  auth(reply: object): void {
    this.deliver(encode(Op.AuthReply, 1, JSON.stringify(reply)));
  }
  serverClose(code: number, reason = ""): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  ops(): number[] {
    return this.sent.map((p) => p.op);
  }
}

/** Lets pending promise callbacks run (the client awaits its token and node): one turn of the event loop. */
export function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
