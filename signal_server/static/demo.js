// The demo page: a mesh video call built on signal-client.js.
//
// It talks only to the server that served it, and imports the client module
// by a relative path: no URL parameter can make it load code from, or send a
// token to, another origin. URL parameters: room, token, name (dev mode),
// autojoin=1.
import { WebRTCCall } from "./webrtc/signal-client.js";

const params = new URLSearchParams(location.search);
const server = location.origin;
const $ = (id) => document.getElementById(id);
const tiles = new Map(); // user id ("self" for us) -> tile element
let call = null;
window.demo = { get call() { return call; }, messages: [] };

const MESSAGES = {
  ROOM_FULL: "This room is full. Try another room, or try again later.",
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
  if (text) window.demo.messages.push(text);
  layout();
}

function tile(id, label, muted) {
  let element = tiles.get(id);
  if (!element) {
    element = document.createElement("div");
    element.className = "tile";
    element.dataset.user = id;
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
  tiles.get(id)?.remove();
  tiles.delete(id);
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

/** A guest name kept for this tab, so rejoining (or reloading) is still you. */
function guestName() {
  let name = params.get("name") || sessionStorage.getItem("signal-demo-guest");
  if (!name) name = `guest-${Math.random().toString(36).slice(2, 7)}`;
  sessionStorage.setItem("signal-demo-guest", name);
  return name;
}

/** A fixed token, or (dev mode) a function that fetches a fresh one for every (re)connection. */
async function tokenSource() {
  const given = params.get("token") || $("token").value.trim();
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
  await fetchToken(); // fail here, with a clear message, when there is no dev mode
  return fetchToken;
}

function explain(message, code) {
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
  current.on("localstream", mine((stream) => { tile("self", "You", true).querySelector("video").srcObject = stream; }));
  current.on("remotestream", mine((userId, stream) => {
    const name = current.participants.get(userId)?.username ?? userId;
    tile(userId, name, false).querySelector("video").srcObject = stream;
  }));
  current.on("roomstate", mine((participants, payload) => {
    tile("self", `You (${payload.self.username})`, true);
    for (const p of participants) if (p.user_id !== payload.self.user_id) tile(p.user_id, p.username, false);
    for (const id of [...tiles.keys()]) if (id !== "self" && !current.participants.has(id)) removeTile(id);
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
      for (const id of [...tiles.keys()]) removeTile(id);
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
    for (const id of [...tiles.keys()]) removeTile(id);
    banner(explain(error.message ?? String(error), error.code));
    setControls("idle");
  }
}

async function leave() {
  const previous = call;
  call = null;
  await previous?.disconnect();
  for (const id of [...tiles.keys()]) removeTile(id);
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
if (params.get("room")) $("room").value = params.get("room");
if (params.get("receive_only") === "1") $("receive-only").checked = true;
if (params.has("server") && params.get("server") !== location.origin) {
  banner("The server parameter is ignored: this page only talks to the server that served it.", "info");
}
layout();
if (params.get("autojoin") === "1") join();
