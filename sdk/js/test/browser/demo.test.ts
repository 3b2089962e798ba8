// The demo page in a real browser: Debian's Chromium driven by
// playwright-core, against the page imcloud serves. A browser that
// cannot start fails the test: it is never skipped.
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium, type Browser } from "playwright-core";

import { Server, apiKey, sign } from "../integration/server.js";

const out = process.env.TEST_OUTPUT ?? join(dirname(fileURLToPath(import.meta.url)), "..", "..", "test-output");
let browser: Browser;
const srv = new Server();

before(async () => {
  mkdirSync(out, { recursive: true });
  await srv.start();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    // As root in CI, with this machine's closed network: no sandbox,
    // nothing fetched in the background.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});
after(async () => {
  await browser?.close();
  await srv.stop();
});

test("the demo page shows pushes live, and pushes through the API itself", { timeout: 60_000 }, async () => {
  const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  const problems: string[] = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  const token = sign({ mid: 21, rooms: ["live://demo"], recover: true });
  const frag = new URLSearchParams({ token, api: srv.api, key: apiKey });
  await page.goto(`http://127.0.0.1:${srv.ports.ws}/demo#${frag}`);
  await page.locator("#state", { hasText: "connected" }).waitFor({ timeout: 15_000 });
  assert.equal(await page.locator("#mid").textContent(), "21");
  assert.equal(await page.locator("#rooms").textContent(), "live://demo");

  // From the backend: a user push and a room push.
  await srv.push("mids", { operation: "1000", mids: "21" }, "hello from the backend");
  await srv.push("room", { operation: "1001", type: "live", room: "demo" }, "to the whole room");
  const items = page.locator("#messages li:not(.note)");
  await items.filter({ hasText: "to the whole room" }).waitFor({ timeout: 15_000 });
  await items.filter({ hasText: "hello from the backend" }).waitFor({ timeout: 15_000 });
  // Newest first, with its operation and position.
  const first = await items.first().textContent();
  assert.match(first ?? "", /op 1001.*room:live:\/\/demo #1.*to the whole room/);

  // From the page: its own push form, through the API (CORS).
  await page.fill("#push-msg", "pushed from the page");
  await page.click("#push-btn");
  await items.filter({ hasText: "pushed from the page" }).waitFor({ timeout: 15_000 });
  assert.match((await page.locator("#push-result").textContent()) ?? "", /accepted/);
  assert.equal(await page.locator("#count").textContent(), "3");
  assert.equal(await page.locator("#online").textContent(), "1");
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(out, "demo.png") });

  // Readable on a phone: nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page is ${overflow} px wider than a phone's screen`);
  await page.screenshot({ path: join(out, "demo-phone.png"), fullPage: true });
  assert.deepEqual(problems, []);
});

test("a reload recovers what was pushed while the page was away", { timeout: 60_000 }, async () => {
  // One browser profile for both loads: the page keeps its positions in
  // localStorage.
  const profile = await browser.newContext();
  const page = await profile.newPage();
  const token = sign({ mid: 22, rooms: ["live://demo2"], recover: true });
  const url = `http://127.0.0.1:${srv.ports.ws}/demo#${new URLSearchParams({ token, api: srv.api, key: apiKey })}`;
  await page.goto(url);
  await page.locator("#state", { hasText: "connected" }).waitFor({ timeout: 15_000 });
  await srv.push("mids", { operation: "1000", mids: "22" }, "before");
  await page.locator("#messages li", { hasText: "before" }).waitFor({ timeout: 15_000 });
  await page.close();
  await srv.push("mids", { operation: "1000", mids: "22" }, "while away");
  const again = await profile.newPage();
  await again.goto(url);
  await again.locator("#messages li", { hasText: "while away" }).waitFor({ timeout: 15_000 });
  assert.equal(await again.locator("#messages li", { hasText: "before" }).count(), 0, "a message the page had was sent again");
});
