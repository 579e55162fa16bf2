// The demo page: a mesh video call built on signal-client.js.
//
// It talks only to the server that served it, and imports the client module
// by a relative path: no URL parameter can make it load code from, or send a
// token to, another origin. URL parameters only fill in the form: room,
// token (shown with whose it is), name (dev mode), receive_only=1. Joining
// always takes a click, so a link from another site cannot put a visitor in
// a room, and the URL never changes the guest identity kept for the tab.
import { WebRTCCall } from "./webrtc/signal-client.js";

const params = new URLSearchParams(location.search);
const server = location.origin;
const $ = (id) => document.getElementById(id);
const SELF = Symbol("self"); // the local tile's key: no user id can be equal to it
const tiles = new Map(); // user id (or SELF) -> tile element
const MAX_MESSAGES = 50;
let call = null;
window.demo = { get call() { return call; }, messages: [] };

const MESSAGES = {
  ROOM_FULL: "This room is full. Try another room, or try again later.",
  RATE_LIMITED: "The server dropped a message of ours (RATE_LIMITED); the call renegotiates.",
  UNAUTHORIZED:
    "Your sign-in was refused (UNAUTHORIZED): the token is missing, invalid or expired. " +
    "If the server was restarted, it signs with a new secret: get a new token and join again.",
  FORBIDDEN: "You are not allowed in this room (FORBIDDEN).",
  SESSION_REPLACED: "You joined this room from another tab or device (SESSION_REPLACED).",
  NETWORK_ERROR: `The signaling server at ${server} cannot be reached. Check that it is running, then join again.`,
  SERVER_BUSY: "The server is busy (SERVER_BUSY). Try again in a moment.",
};

function banner(text, kind = "error") {
  const element = $("banner");
  element.textContent = text;
  element.className = kind;
  element.hidden = !text;
  if (text) {
    const messages = window.demo.messages;
    messages.push(text);
    if (messages.length > MAX_MESSAGES) messages.splice(0, messages.length - MAX_MESSAGES);
  }
  layout();
}

function tile(id, label, muted) {
  let element = tiles.get(id);
  if (!element) {
    element = document.createElement("div");
    element.className = "tile";
    if (id === SELF) element.dataset.self = "";
    else element.dataset.user = id;
    element.innerHTML = '<video autoplay playsinline></video><span class="label"></span><span class="state"></span>';
    element.querySelector("video").muted = muted;
    $("grid").append(element);
    tiles.set(id, element);
    layout();
  }
  element.querySelector(".label").textContent = label;
  return element;
}

function removeTile(id) {
  if (id === SELF) return; // only leaving, or a failed call, clears the local tile (clearTiles)
  tiles.get(id)?.remove();
  tiles.delete(id);
  layout();
}

function clearTiles() {
  for (const element of tiles.values()) element.remove();
  tiles.clear();
  layout();
}

/** Size the tiles so that all of them fit the space between header and controls. */
function layout() {
  const grid = $("grid");
  const count = Math.max(1, tiles.size);
  const gap = 8;
  const width = grid.clientWidth - 2 * gap;
  const height = grid.clientHeight - 2 * gap;
  let best = 0;
  for (let columns = 1; columns <= count; columns++) {
    const rows = Math.ceil(count / columns);
    const byWidth = (width - gap * (columns - 1)) / columns;
    const byHeight = ((height - gap * (rows - 1)) / rows) * (4 / 3);
    best = Math.max(best, Math.min(byWidth, byHeight));
  }
  grid.style.setProperty("--tile-width", `${Math.max(160, Math.floor(best))}px`);
}
new ResizeObserver(layout).observe($("grid"));

/** sessionStorage, or a variable where storage is refused (a sandboxed or third-party frame). */
const storage = {
  memory: new Map(),
  get(key) {
    try {
      return sessionStorage.getItem(key);
    } catch {
      return this.memory.get(key) ?? null;
    }
  },
  set(key, value) {
    try {
      sessionStorage.setItem(key, value);
    } catch {
      this.memory.set(key, value);
    }
  },
};

/**
 * The dev-mode name: ?name= for this page only, else a random guest name kept
 * for this tab (written on Join, never from the URL), so rejoining or
 * reloading is still you.
 */
function guestName() {
  if (params.get("name")) return params.get("name");
  let name = storage.get("signal-demo-guest");
  if (!name) {
    name = `guest-${Math.random().toString(36).slice(2, 7)}`;
    storage.set("signal-demo-guest", name);
  }
  return name;
}

/** Whose token this is (its unverified claims), for the visitor to check before joining. */
function tokenOwner(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
    const name = typeof claims.name === "string" && claims.name !== claims.sub ? ` (${claims.name})` : "";
    return `user ${String(claims.sub)}${name}`;
  } catch {
    return "an unreadable token";
  }
}

function showTokenOwner() {
  const token = $("token").value.trim();
  $("token-owner").textContent = token ? `Joins as ${tokenOwner(token)}` : "";
}

/** A fixed token, or (dev mode) a function that fetches a fresh one for every (re)connection. */
async function tokenSource() {
  const given = $("token").value.trim();
  if (given) return given;
  const user = guestName();
  const fetchToken = async () => {
    let response;
    try {
      response = await fetch(`/dev/token?user=${encodeURIComponent(user)}`);
    } catch (error) {
      throw Object.assign(new Error(`NETWORK_ERROR: ${error.message}`), { code: "NETWORK_ERROR" });
    }
    if (response.status === 404) {
      $("token-label").hidden = false;
      throw Object.assign(new Error("UNAUTHORIZED: this server needs a token from your app"), { code: "UNAUTHORIZED" });
    }
    if (!response.ok) throw Object.assign(new Error(`HTTP_${response.status}`), { code: "NETWORK_ERROR" });
    return (await response.json()).token;
  };
  // Fetched here, to fail with a clear message when there is no dev mode; the call's
  // first attempt uses it, later attempts (reconnects) fetch a fresh one.
  let first = await fetchToken();
  return async () => {
    const token = first ?? (await fetchToken());
    first = null;
    return token;
  };
}

/** Errors caused by what another participant sent: their details (attacker text) go to the console only. */
const REMOTE_INPUT = new Set(["SIGNALING_FAILED", "OFFER_REFUSED", "MESSAGE_TOO_LARGE"]);

function explain(message, code) {
  if (REMOTE_INPUT.has(code)) {
    console.warn(message);
    return `Another participant sent something this page could not use (${code}); the rest of the call goes on.`;
  }
  return MESSAGES[code] ? `${MESSAGES[code]} — ${message}` : message;
}

async function join() {
  banner("");
  setControls("joining");
  if (call) await leave();
  let token;
  try {
    token = await tokenSource();
  } catch (error) {
    banner(explain(error.message, error.code));
    setControls("idle");
    return;
  }
  const current = (call = new WebRTCCall(server, token, $("room").value.trim()));
  const mine = (handler) => (...args) => { if (call === current) handler(...args); };
  current.on("localstream", mine((stream) => { tile(SELF, "You", true).querySelector("video").srcObject = stream; }));
  current.on("remotestream", mine((userId, stream) => {
    const name = current.participants.get(userId)?.username ?? userId;
    tile(userId, name, false).querySelector("video").srcObject = stream;
  }));
  current.on("roomstate", mine((participants, payload) => {
    tile(SELF, `You (${payload.self.username})`, true);
    for (const p of participants) if (p.user_id !== payload.self.user_id) tile(p.user_id, p.username, false);
    for (const id of [...tiles.keys()]) if (id !== SELF && !current.participants.has(id)) removeTile(id);
  }));
  current.on("participantjoined", mine((p) => tile(p.user_id, p.username, false)));
  current.on("participantleft", mine((p) => removeTile(p.user_id)));
  current.on("connectionstatechange", mine((userId, state) => {
    const badge = tiles.get(userId)?.querySelector(".state");
    if (badge) {
      badge.textContent = state;
      badge.dataset.state = state;
    }
  }));
  current.on("error", mine((message, code) => {
    if (current.status !== "reconnecting") banner(explain(message, code));
  }));
  current.on("status", mine((status) => {
    $("status").textContent = status;
    document.body.dataset.status = status;
    if (status === "reconnecting") banner("Connection lost. Reconnecting…", "info");
    if (status === "joined") banner("");
    if (status === "failed") {
      clearTiles();
      setControls("idle");
    }
  }));
  try {
    if (!$("receive-only").checked) {
      await current.initLocalStream({ video: { width: 640, height: 480 }, audio: true });
    }
    await current.connect();
    if (call === current) setControls("joined");
  } catch (error) {
    if (call !== current) return;
    await current.disconnect(); // the camera is off again, nothing half-joined stays behind
    clearTiles();
    banner(explain(error.message ?? String(error), error.code));
    setControls("idle");
  }
}

async function leave() {
  const previous = call;
  call = null;
  await previous?.disconnect();
  clearTiles();
  $("status").textContent = "not connected";
  document.body.dataset.status = "closed";
}

function setControls(state) {
  const inCall = state === "joined";
  $("mute").disabled = $("camera").disabled = !inCall || !call?.localStream;
  $("leave").disabled = !inCall;
  $("join").disabled = state !== "idle";
  $("receive-only").disabled = state !== "idle";
  showMedia(inCall && call?.localStream);
}

function showMedia(on) {
  $("mute").textContent = "Mute";
  $("camera").textContent = "Camera off";
  $("mute").classList.remove("off");
  $("camera").classList.remove("off");
  if (on) {
    call.setMicrophoneEnabled(true);
    call.setCameraEnabled(true);
  }
}

$("join").onclick = join;
$("mute").onclick = () => {
  const on = call.setMicrophoneEnabled($("mute").textContent !== "Mute");
  $("mute").textContent = on ? "Mute" : "Unmute";
  $("mute").classList.toggle("off", !on);
};
$("camera").onclick = () => {
  const on = call.setCameraEnabled($("camera").textContent !== "Camera off");
  $("camera").textContent = on ? "Camera off" : "Camera on";
  $("camera").classList.toggle("off", !on);
};
$("leave").onclick = async () => {
  await leave();
  banner("");
  setControls("idle");
};
$("token").oninput = showTokenOwner;
if (params.get("room")) $("room").value = params.get("room");
if (params.get("receive_only") === "1") $("receive-only").checked = true;
if (params.get("token")) {
  // Filled in and shown, never used without a click: a link may carry someone else's token.
  $("token").value = params.get("token");
  $("token-label").hidden = false;
  showTokenOwner();
}
if (params.has("server") && params.get("server") !== location.origin) {
  banner("The server parameter is ignored: this page only talks to the server that served it.", "info");
}
layout();
window.demo.ready = true;
