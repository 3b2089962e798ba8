// A real imcloud for the SDK's tests: the binary make test-js built from
// this tree (IMCLOUD_BIN), started on free loopback ports, stopped and
// started again on the same ones.
import { spawn, type ChildProcess } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { createServer } from "node:net";
import { once } from "node:events";

export const secret = randomBytes(32).toString("hex");
export const apiKey = randomBytes(16).toString("hex");

/** A free loopback port (bound, then released). */
export async function freePort(): Promise<number> {
  const srv = createServer();
  srv.listen(0, "127.0.0.1");
  await once(srv, "listening");
  const port = (srv.address() as { port: number }).port;
  srv.close();
  await once(srv, "close");
  return port;
}

export interface Claims {
  mid: number;
  key?: string;
  rooms?: string[];
  recover?: boolean;
  accepts?: number[];
}

/** An HS256 client token, as imcloud token signs them; ttlSeconds < 0 makes an expired one. */
export function sign(claims: Claims, ttlSeconds = 3600): string {
  const b64 = (v: object) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ ...claims, iat: now - 1, exp: now + ttlSeconds });
  const mac = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${mac}`;
}

/** Waits for cond, checking every few milliseconds until deadline ms. */
export async function waitFor(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

export interface ServerOptions {
  /** Keep the registry and history in Redis (127.0.0.1:6379), so they outlive a restart. */
  redis?: boolean;
  extra?: string[];
}

export class Server {
  private proc: ChildProcess | null = null;
  private output = "";
  ports!: { http: number; grpc: number; tcp: number; ws: number; cgrpc: number };
  constructor(private readonly opts: ServerOptions = {}) {}

  get ws(): string {
    return `ws://127.0.0.1:${this.ports.ws}/sub`;
  }
  get api(): string {
    return `http://127.0.0.1:${this.ports.http}`;
  }
  get log(): string {
    return this.output;
  }

  async start(): Promise<void> {
    const bin = process.env.IMCLOUD_BIN;
    if (!bin) throw new Error("IMCLOUD_BIN is not set: run the tests with make test-js, which builds the binary");
    this.ports ??= { http: await freePort(), grpc: await freePort(), tcp: await freePort(), ws: await freePort(), cgrpc: await freePort() };
    const p = this.ports;
    const sets = [
      `logic.http_addr=127.0.0.1:${p.http}`,
      `logic.grpc_addr=127.0.0.1:${p.grpc}`,
      `cloud.tcp_addr=127.0.0.1:${p.tcp}`,
      `cloud.ws_addr=127.0.0.1:${p.ws}`,
      `cloud.grpc_addr=127.0.0.1:${p.cgrpc}`,
      `cloud.logic_addr=127.0.0.1:${p.grpc}`,
      `logic.api_keys=${apiKey}`,
      `cloud.heartbeat_interval=10s`,
      `logic.connect_rate=100`,
      `logic.connect_burst=100`,
      ...(this.opts.extra ?? []),
    ];
    let args: string[];
    if (this.opts.redis) {
      const prefix = `imcloud:sdktest:${process.pid}:`;
      args = ["run", "--stages", "logic,job,cloud", "--set", "broker.kind=gochannel", "--set", "registry.kind=redis", "--set", `registry.redis.prefix=${prefix}`,
        "--set", `cloud.advertise_addr=127.0.0.1:${p.cgrpc}`, "--set", `cluster.secret=${randomBytes(16).toString("hex")}`];
    } else {
      args = ["standalone"];
    }
    for (const s of sets) args.push("--set", s);
    // IMCLOUD_* variables are imcloud's configuration: IMCLOUD_BIN is ours.
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("IMCLOUD_")));
    const proc = spawn(bin, args, { env: { ...env, IMCLOUD_LOGIC__AUTH__JWT_SECRET: secret }, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    const ready = new Promise<void>((resolve, reject) => {
      const onData = (b: Buffer) => {
        this.output += b.toString();
        if (/imcloud standalone is ready|imcloud started/.test(this.output.slice(-4096))) resolve();
      };
      proc.stdout!.on("data", onData);
      proc.stderr!.on("data", onData);
      proc.once("exit", (code) => reject(new Error(`imcloud exited (${code}) before it was ready:\n${this.output}`)));
    });
    const timer = setTimeout(() => proc.kill("SIGKILL"), 20_000);
    try {
      await ready;
    } finally {
      clearTimeout(timer);
    }
    // Listening once the HTTP API answers.
    await this.until(async () => (await fetch(`${this.api}/im/nodes/weighted?platform=web`)).ok);
  }

  private async until(probe: () => Promise<boolean>): Promise<void> {
    const end = Date.now() + 10_000;
    for (;;) {
      try {
        if (await probe()) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > end) throw new Error(`imcloud did not answer in 10 s:\n${this.output}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Stops the process (SIGTERM: it drains, closing clients with 1001). */
  async stop(): Promise<void> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null) return;
    this.proc = null;
    const exited = once(proc, "exit");
    proc.kill("SIGTERM");
    const timer = setTimeout(() => proc.kill("SIGKILL"), 20_000);
    await exited;
    clearTimeout(timer);
  }

  /** POSTs a push; returns the reply's data. */
  async push(route: string, query: Record<string, string | string[]>, body: string): Promise<{ online: number; positions?: { stream: string; epoch: string; pos: number }[] }> {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) for (const x of [v].flat()) q.append(k, x);
    const res = await fetch(`${this.api}/im/push/${route}?${q}`, { method: "POST", headers: { Authorization: `Bearer ${apiKey}` }, body });
    const r = (await res.json()) as { code: number; message: string; data: never };
    if (!res.ok || r.code !== 0) throw new Error(`push ${route}: HTTP ${res.status} ${r.message}`);
    return r.data;
  }
}
