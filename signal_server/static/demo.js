// The demo page: a mesh video call built on signal-client.js.
// URL parameters: room, token, server (signaling server origin; default this
// page's), name, autojoin=1. In dev mode a token is fetched from /dev/token.
const params = new URLSearchParams(location.search);
const server = (params.get("server") ?? location.origin).replace(/\/+$/, "");
const { WebRTCCall } = await import(`${server}/webrtc/signal-client.js`);

const $ = (id) => document.getElementById(id);
const tiles = new Map(); // user id ("self" for us) -> tile element
let call = null;
window.demo = { get call() { return call; }, messages: [] };

const MESSAGES = {
  ROOM_FULL: "This room is full. Try another room, or try again later.",
  UNAUTHORIZED: "Your sign-in was refused (UNAUTHORIZED): the token is missing, invalid or expired.",
  FORBIDDEN: "You are not allowed in this room (FORBIDDEN).",
  SESSION_REPLACED: "You joined this room from another tab or device (SESSION_REPLACED).",
};

function banner(text, kind = "error") {
  const element = $("banner");
  element.textContent = text;
  element.className = kind;
  element.style.display = text ? "block" : "none";
  if (text) window.demo.messages.push(text);
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
  }
  element.querySelector(".label").textContent = label;
  return element;
}

function removeTile(id) {
  tiles.get(id)?.remove();
  tiles.delete(id);
}

async function token() {
  const given = params.get("token") || $("token").value.trim();
  if (given) return given;
  const user = params.get("name") || `guest-${Math.random().toString(36).slice(2, 7)}`;
  const response = await fetch(`${server}/dev/token?user=${encodeURIComponent(user)}`);
  if (!response.ok) {
    $("token-label").hidden = false;
    throw Object.assign(new Error("UNAUTHORIZED: this server needs a token from your app"), { code: "UNAUTHORIZED" });
  }
  return (await response.json()).token;
}

async function join() {
  banner("");
  $("join").disabled = true;
  let jwt;
  try {
    jwt = await token(); // fixed for this call, so reconnects resume as the same user
  } catch (error) {
    banner(error.message);
    $("join").disabled = false;
    return;
  }
  call = new WebRTCCall(server, jwt, $("room").value.trim());
  call.onLocalStream = (stream) => { tile("self", "You", true).querySelector("video").srcObject = stream; };
  call.onRemoteStream = (userId, stream) => {
    const name = call.participants.get(userId)?.username ?? userId;
    tile(userId, name, false).querySelector("video").srcObject = stream;
  };
  call.onRoomState = (participants, payload) => {
    tile("self", `You (${payload.self.username})`, true);
    for (const p of participants) if (p.user_id !== payload.self.user_id) tile(p.user_id, p.username, false);
    for (const id of [...tiles.keys()]) if (id !== "self" && !call.participants.has(id)) removeTile(id);
  };
  call.onParticipantJoined = (p) => tile(p.user_id, p.username, false);
  call.onParticipantLeft = (p) => removeTile(p.user_id);
  call.onConnectionStateChange = (userId, state) => {
    const element = tiles.get(userId);
    if (element) {
      element.querySelector(".state").textContent = state;
      element.querySelector(".state").dataset.state = state;
    }
  };
  call.onError = (message, code) => banner(MESSAGES[code] ? `${MESSAGES[code]} — ${message}` : message);
  call.onStatus = (status) => {
    $("status").textContent = status;
    document.body.dataset.status = status;
    if (status === "reconnecting") banner("Connection lost. Reconnecting…", "info");
    if (status === "joined") banner("");
    if (status === "failed" || status === "closed") setControls(false);
  };
  try {
    await call.initLocalStream({ video: { width: 640, height: 480 }, audio: true });
    await call.connect();
    setControls(true);
  } catch (error) {
    if (!window.demo.messages.length) banner(error.message ?? String(error));
    $("join").disabled = false;
  }
}

function setControls(inCall) {
  $("mute").disabled = $("camera").disabled = $("leave").disabled = !inCall;
  $("join").disabled = inCall;
}

$("join").onclick = join;
$("mute").onclick = () => {
  const on = call.toggleAudio();
  $("mute").textContent = on ? "Mute" : "Unmute";
  $("mute").classList.toggle("off", !on);
};
$("camera").onclick = () => {
  const on = call.toggleVideo();
  $("camera").textContent = on ? "Camera off" : "Camera on";
  $("camera").classList.toggle("off", !on);
};
$("leave").onclick = async () => {
  await call.disconnect();
  for (const id of [...tiles.keys()]) removeTile(id);
  setControls(false);
};
if (params.get("room")) $("room").value = params.get("room");
if (params.get("autojoin") === "1") join();
