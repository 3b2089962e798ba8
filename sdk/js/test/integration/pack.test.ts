// npm pack makes a package a fresh Node project installs and uses.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { Server, sign, waitFor } from "./server.js";

const pkgDir = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

test("npm pack's tarball installs in a fresh project and receives a push", { timeout: 120_000 }, async (t) => {
  const tmp = mkdtempSync(join(tmpdir(), "imcloud-pack-"));
  t.after(() => rmSync(tmp, { recursive: true, force: true }));
  // dist/ is built (make test-js builds before testing): pack it as is.
  execFileSync("npm", ["pack", "--ignore-scripts", "--pack-destination", tmp], { cwd: pkgDir, stdio: "pipe" });
  const tarball = readdirSync(tmp).find((f) => f.endsWith(".tgz"));
  assert.ok(tarball, "npm pack wrote no tarball");
  const app = join(tmp, "app");
  execFileSync("mkdir", ["-p", app]);
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
  // No dependencies: it installs without the registry.
  execFileSync("npm", ["install", "--offline", "--no-audit", "--no-fund", join(tmp, tarball!)], { cwd: app, stdio: "pipe" });
  assert.ok(existsSync(join(app, "node_modules", "imcloud-client", "dist", "index.d.ts")), "the package has no types");
  assert.ok(!existsSync(join(app, "node_modules", "imcloud-client", "src")), "the package ships its sources");
  writeFileSync(
    join(app, "main.mjs"),
    `import { Client } from "imcloud-client";
const c = new Client({ url: process.env.WS, token: process.env.TOKEN });
c.on("connected", () => console.log("connected"));
c.on("message", (m) => { console.log("got " + m.text()); c.close(); });
c.on("error", (e) => console.log("error " + e.message));
c.connect();
`,
  );
  const srv = new Server();
  await srv.start();
  t.after(() => srv.stop());
  const proc = spawn(process.execPath, ["--experimental-websocket", "main.mjs"], {
    cwd: app,
    env: { ...process.env, WS: srv.ws, TOKEN: sign({ mid: 31 }) },
    stdio: ["ignore", "pipe", "pipe"],
  });
  t.after(() => proc.kill());
  let out = "";
  proc.stdout.on("data", (b) => (out += b));
  proc.stderr.on("data", (b) => (out += b));
  await waitFor("the app to connect", () => out.includes("connected"), 15_000).catch((err) => {
    throw new Error(`${err.message}; the app printed: ${out}`);
  });
  await srv.push("mids", { operation: "1000", mids: "31" }, "hello, package");
  await waitFor("the app to get the push", () => out.includes("got hello, package"), 15_000).catch((err) => {
    throw new Error(`${err.message}; the app printed: ${out}`);
  });
});
