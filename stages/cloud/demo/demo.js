// The demo page's script: the SDK (imcloud-client.js, built from sdk/js)
// connected with the token from the form or the URL's fragment
// (#token=…&api=…&key=…), and what arrives shown newest first. Every
// string from the network goes into the page as text, never as markup.
import { Client } from "./imcloud-client.js";

const $ = (id) => document.getElementById(id);
const frag = new URLSearchParams(location.hash.slice(1));
const wsDefault = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/sub`;
$("token").value = frag.get("token") ?? "";
$("url").value = frag.get("url") ?? wsDefault;
$("api").value = frag.get("api") ?? `${location.protocol}//${location.hostname}:3111`;
$("apikey").value = frag.get("key") ?? "";
// The token and key now live in the form: out of the address bar, the
// history and whatever is shared of the screen.
if (location.hash) history.replaceState(null, "", location.pathname + location.search);

const MAX_SHOWN = 500;
let client = null;
let shown = 0;

function setState(state, text) {
  const el = $("state");
  el.className = `state ${state}`;
  el.textContent = text;
  $("connect-btn").disabled = state === "connected" || state === "connecting" || state === "waiting";
  $("disconnect-btn").disabled = !$("connect-btn").disabled;
}

function showError(err) {
  const el = $("error");
  el.hidden = !err;
  el.textContent = err ? String(err.message ?? err) : "";
}

function addItem(meta, text, note = false) {
  const li = document.createElement("li");
  if (note) li.className = "note";
  const m = document.createElement("div");
  m.className = "meta";
  for (const part of [new Date().toLocaleTimeString(), ...meta]) {
    const s = document.createElement("span");
    s.textContent = part;
    m.append(s);
  }
  const b = document.createElement("div");
  b.className = "body";
  b.textContent = text;
  li.append(m, b);
  $("messages").prepend(li);
  while ($("messages").children.length > MAX_SHOWN) $("messages").lastElementChild.remove();
  if (!note) $("count").textContent = String(++shown);
}

function clearSession() {
  for (const id of ["mid", "key", "rooms", "online", "positions"]) $(id).textContent = "–";
}

function showPositions() {
  const ps = client?.streamPositions ?? [];
  $("positions").textContent = ps.length ? ps.map((p) => `${p.stream} @${p.pos}`).join(", ") : "–";
}

// Positions survive a reload: the page recovers what it missed.
function storageFor(token) {
  const key = `imcloud-demo:${token.slice(-24)}`;
  return {
    load: () => JSON.parse(localStorage.getItem(key) ?? "null"),
    save: (p) => localStorage.setItem(key, JSON.stringify(p)),
  };
}

function connect() {
  const token = $("token").value.trim();
  if (!token) {
    showError("paste a client token first");
    return;
  }
  showError(null);
  client?.close();
  const c = new Client({ url: $("url").value.trim(), token, storage: storageFor(token) });
  client = c;
  c.on("connected", (s) => {
    setState("connected", "connected");
    $("mid").textContent = String(s.mid);
    $("key").textContent = s.key;
    $("rooms").textContent = s.rooms.join(", ") || "none";
    $("room").value ||= s.rooms[0] ?? "";
    showPositions();
    addItem(["connected"], `${s.url} as user ${s.mid}${s.recover ? ", recovering what was missed" : ""}`, true);
  });
  c.on("message", (m) => {
    const meta = [`op ${m.op}`];
    if (m.stream) meta.push(`${m.stream} #${m.pos}`);
    addItem(meta, m.text());
    showPositions();
  });
  c.on("online", (n) => ($("online").textContent = String(n)));
  c.on("resync", (r) => addItem(["resync"], `${r.stream}: ${r.reason}; continuing after ${r.pos}`, true));
  c.on("disconnected", (d) => {
    setState(d.reconnect ? "waiting" : "closed", d.reconnect ? `reconnecting in ${(d.backoffMs / 1000).toFixed(1)} s` : "stopped");
    addItem([`closed ${d.code}`], d.reason || (d.reconnect ? "reconnecting" : "stopped"), true);
    if (!d.reconnect) clearSession();
    if (d.code === 4401) {
      showError("The server refused this token (expired, or signed with another secret). If you restarted imcloud, open the new demo URL it printed: standalone makes a new secret each run.");
    }
  });
  c.on("error", (e) => {
    if (!/^token refused/.test(e.message)) showError(e);
  });
  setState("connecting", "connecting");
  c.connect();
}

$("connect-btn").addEventListener("click", connect);
$("disconnect-btn").addEventListener("click", () => {
  client?.close();
  client = null;
  setState("idle", "not connected");
  clearSession();
});

$("room-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const room = await client.joinRoom($("room").value.trim());
    $("rooms").textContent = room || "none";
  } catch (err) {
    showError(err);
  }
});

$("push-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const to = $("push-to").value;
  const q = new URLSearchParams({ operation: $("push-op").value });
  if (to === "mids") q.set("mids", $("mid").textContent);
  if (to === "room") {
    const [type, id] = ($("rooms").textContent.split(", ")[0] ?? "").split("://");
    q.set("type", type);
    q.set("room", id ?? "");
  }
  const out = $("push-result");
  try {
    const headers = { "Content-Type": "text/plain" };
    if ($("apikey").value) headers.Authorization = `Bearer ${$("apikey").value}`;
    const res = await fetch(`${$("api").value.replace(/\/$/, "")}/im/push/${to}?${q}`, { method: "POST", headers, body: $("push-msg").value });
    const r = await res.json();
    out.textContent = res.ok ? `accepted: ${r.data.online} online${r.data.positions ? ", " + r.data.positions.map((p) => `${p.stream} #${p.pos}`).join(", ") : ""}` : `HTTP ${res.status}: ${r.message}`;
  } catch (err) {
    out.textContent = `push failed: ${err.message} (is logic.cors_origins set for this page's origin?)`;
  }
});

if ($("token").value) connect();
