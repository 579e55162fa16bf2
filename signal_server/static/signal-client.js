// signal-client.js: a dependency-free browser ES module for signal-server.
//
// API-compatible in spirit with the integration guide's WebRTCService, minus its
// failure modes:
//  * the WebSocket reconnects by itself (exponential backoff, full jitter) and
//    resumes the room within the server's grace period; a socket that goes
//    silent (a dead network sends no FIN) is dropped at once, not closed
//    politely, so the reconnect lands inside the grace;
//  * signaling sent while the socket is down is queued and flushed after the
//    resume, or every peer renegotiates when the server lost messages;
//  * one RTCPeerConnection per remote participant (a mesh), negotiated with the
//    "perfect negotiation" pattern, so offer glare cannot wedge a call;
//  * the camera may start before or after connect(): transceivers are reused;
//  * every async step checks that its attempt is still current, so
//    disconnect() wins over a connect() in flight (React StrictMode);
//  * ICE restarts use freshly fetched (TURN) credentials;
//  * a hostile participant cannot make it break the server's limits: remote
//    offers with more media sections than a call uses are refused, no frame
//    over the server's message size is sent, outgoing signaling is paced
//    under the server's rate limit, a peer's offers are answered at most
//    twice a second, early candidates are bounded, and an offer that is never
//    answered is rolled back and tried again.
//
// Usage (see docs/client.md):
//   import { WebRTCCall } from "./signal-client.js";
//   const call = new WebRTCCall("https://signal.example", getToken, "room-1");
//   call.on("remotestream", (userId, stream) => { ... });
//   await call.initLocalStream();
//   await call.connect();

/** Error codes after which reconnecting cannot help (docs/protocol.md). */
const FINAL_ERRORS = new Set([
  "UNAUTHORIZED",
  "FORBIDDEN",
  "INVALID_ROOM",
  "ROOM_FULL",
  "SESSION_REPLACED",
  "TOO_MANY_ROOMS",
  "KICKED", // removed by the app's backend: rejoining is the app's decision, never automatic
  "ROOM_CLOSED",
]);
const FINAL_CLOSE_CODES = new Map([
  [4400, "INVALID_ROOM"],
  [4401, "UNAUTHORIZED"],
  [4403, "FORBIDDEN"],
  [4409, "ROOM_FULL"],
  [4410, "SESSION_REPLACED"],
  [4411, "KICKED"],
  [4412, "ROOM_CLOSED"],
  [4431, "TOO_MANY_ROOMS"],
]);
/** The close code that follows each closing error (docs/protocol.md). */
const CLOSE_CODES = new Map([
  ...[...FINAL_CLOSE_CODES].map(([close, code]) => [code, close]),
  ["SERVER_BUSY", 1013],
  ["SLOW_CONSUMER", 4408],
  ["RATE_LIMITED", 4429],
  ["TOO_MANY_CONNECTIONS", 4430],
]);
/** Retried errors known by their close code alone (the error frame may not arrive). */
const RETRIED_CLOSE_CODES = new Map([
  [1013, "SERVER_BUSY"],
  [4408, "SLOW_CONSUMER"],
  [4429, "RATE_LIMITED"],
  [4430, "TOO_MANY_CONNECTIONS"],
]);
/**
 * Server errors that come right before the server closes the socket.
 * RATE_LIMITED is not one: at first the server only drops a message (and says
 * so); a close 4429 comes only after sustained flooding.
 */
const CLOSING_ERRORS = new Set([...FINAL_ERRORS, "SERVER_BUSY", "SLOW_CONSUMER", "TOO_MANY_CONNECTIONS"]);
const KINDS = ["audio", "video"];
/** Outgoing signaling queued (socket down, or paced); beyond it, renegotiate. */
const OUTBOX_LIMIT = 256;
/** Media sections a remote offer may have: ours are one audio and one video; a small margin. */
const MAX_REMOTE_SECTIONS = 4;
/** Early candidates kept per peer, and the longest candidate line accepted (real ones are ~100 bytes). */
const MAX_PENDING_CANDIDATES = 100;
const MAX_CANDIDATE_LENGTH = 1024;
/** A remote peer's offers are answered at most once per this interval; newer ones replace waiting ones. */
const OFFER_INTERVAL_MS = 500;
/** After the server dropped a message of ours, renegotiate this much later (it reports at most once a second). */
const REPAIR_DELAY_MS = 1500;
const EVENTS = {
  status: "onStatus",
  roomstate: "onRoomState",
  participantjoined: "onParticipantJoined",
  participantleft: "onParticipantLeft",
  localstream: "onLocalStream",
  remotestream: "onRemoteStream",
  remotestreamremoved: "onRemoteStreamRemoved",
  connectionstatechange: "onConnectionStateChange",
  error: "onError",
  servermessage: "onServerMessage",
};

export class SignalingError extends Error {
  /**
   * @param {string} code  e.g. "ROOM_FULL", "NETWORK_ERROR", "ABORTED"
   * @param {string} message  starts with the code, like the server's messages
   */
  constructor(code, message, options) {
    super(message ?? code, options);
    this.name = "SignalingError";
    this.code = code;
  }
}

/** Turn the server's configuration into what RTCPeerConnection reads. */
export function rtcConfiguration(config) {
  const result = {
    iceServers: config.iceServers ?? config.ice_servers ?? [],
  };
  const transport = config.iceTransportPolicy ?? config.ice_transport_policy;
  const bundle = config.bundlePolicy ?? config.bundle_policy;
  const rtcpMux = config.rtcpMuxPolicy ?? config.rtcp_mux_policy;
  if (transport) result.iceTransportPolicy = transport;
  if (bundle) result.bundlePolicy = bundle;
  if (rtcpMux) result.rtcpMuxPolicy = rtcpMux;
  return result;
}

/** A SignalingError for anything an attempt threw (a token function may throw its own coded error). */
function networkError(error, what) {
  if (error instanceof SignalingError) return error;
  if (typeof error?.code === "string") return new SignalingError(error.code, error.message, { cause: error });
  return new SignalingError("NETWORK_ERROR", `NETWORK_ERROR: cannot reach ${what} (${error?.message ?? error})`, {
    cause: error,
  });
}

/**
 * The config fetch failed without a response. The browser does not tell a page why
 * (a server that is down, an origin the server's CORS refuses and a certificate it
 * does not trust all read as one TypeError), so the message names all three.
 */
function fetchFailed(error, what) {
  if (error?.name !== "TypeError") return networkError(error, what);
  return new SignalingError(
    "NETWORK_ERROR",
    `NETWORK_ERROR: cannot reach ${what} (${error.message}): the server may be down, may not allow this ` +
      "page's origin (its --allowed-origin list, CORS), or its TLS certificate may not be trusted by this " +
      "browser; the browser console says which",
    { cause: error },
  );
}

export class WebRTCCall {
  #serverUrl;
  #token;
  #roomId;
  #basePath;
  #maxBackoffMs;
  #connectAttempts;
  #pingIntervalMs;
  #staleAfterMs;
  #maxMessageSize;
  #sendRate;
  #sendBurst;
  #offerTimeoutMs;
  #rate; // the current send rate: sendRate, halved after each RATE_LIMITED
  #tokens = 0; // the send token bucket (per socket, like the server's)
  #tokensAt = 0;
  #pumpTimer = null;
  #repairTimer = null;
  #rateLimitReported = false; // RATE_LIMITED reported in this streak of drops
  #listeners = new Map(); // event -> Set of functions
  #gen = 0; // bumped by connect(), disconnect() and a fatal error: older work stops
  #status = "idle";
  #ws = null;
  #inRoom = false; // room_state seen on the current socket
  #watchdog = null;
  #retryTimer = null;
  #lastSeen = 0;
  #lastPing = 0;
  #attempt = 0;
  #failures = 0; // failed attempts before the first join
  #joinedOnce = false;
  #reported = null; // the error code already reported for this streak of retries
  #socketError = null; // {error, at}: an error frame that announced the close to come
  #pending = null; // {gen, resolve, reject} of connect()
  #rtcConfig = null;
  #selfId = null;
  #participants = new Map(); // user_id -> {user_id, username}
  #peers = new Map(); // user_id -> peer state
  #outbox = [];
  #outboxOverflowed = false;
  #localStream = null;
  #ownedTracks = new Set(); // tracks this module captured, and so stops
  #mediaGen = 0; // bumped when the call lets its media go (disconnect(), a fatal error)

  /**
   * @param {string} serverUrl  e.g. "https://signal.example" (http(s), no trailing path)
   * @param {string | (() => string | Promise<string>)} token  a JWT, or a function that fetches a fresh one
   * @param {string} roomId
   * @param {object} [options]  basePath, maxBackoffMs, connectAttempts, pingIntervalMs, staleAfterMs,
   *   maxMessageSize, sendRate, sendBurst, offerTimeoutMs
   */
  constructor(serverUrl, token, roomId, options = {}) {
    this.#serverUrl = String(serverUrl).replace(/\/+$/, "");
    this.#token = token;
    this.#roomId = roomId;
    this.#basePath = options.basePath ?? "/webrtc";
    this.#maxBackoffMs = options.maxBackoffMs ?? 5000;
    this.#connectAttempts = Math.max(1, options.connectAttempts ?? 3);
    this.#pingIntervalMs = options.pingIntervalMs ?? 5000;
    this.#staleAfterMs = options.staleAfterMs ?? 12000;
    // The server's defaults are --max-message-size 65536 and --rate-limit 50/s
    // with a burst of 200: stay under them (set these for a stricter server).
    this.#maxMessageSize = options.maxMessageSize ?? 65536;
    this.#sendRate = Math.max(0.1, options.sendRate ?? 40);
    this.#sendBurst = Math.max(1, options.sendBurst ?? 100);
    this.#rate = this.#sendRate;
    this.#offerTimeoutMs = options.offerTimeoutMs ?? 10000;

    // Single callbacks, as in the guide; on()/off() add as many listeners as you like.
    this.onLocalStream = null; // (stream)
    this.onRemoteStream = null; // (userId, stream)
    this.onRemoteStreamRemoved = null; // (userId, stream)
    this.onParticipantJoined = null; // (participant)
    this.onParticipantLeft = null; // (participant, reason)
    this.onRoomState = null; // (participants, payload)
    this.onError = null; // (message, code, error)
    this.onServerMessage = null; // (payload): a message from the app's backend
    this.onConnectionStateChange = null; // (userId, state)
    this.onStatus = null; // (status, detail)
  }

  // ------------------------------------------------------------ public state

  get status() {
    return this.#status;
  }

  get roomId() {
    return this.#roomId;
  }

  get selfId() {
    return this.#selfId;
  }

  get localStream() {
    return this.#localStream;
  }

  /** A copy: the other participants, by user id. */
  get participants() {
    return new Map(this.#participants);
  }

  getPeerConnection(userId) {
    return this.#peers.get(userId)?.pc ?? null;
  }

  getRemoteStream(userId) {
    return this.#peers.get(userId)?.stream ?? null;
  }

  // ------------------------------------------------------------------ events

  /** Add a listener; returns a function that removes it. */
  on(type, listener) {
    if (!(type in EVENTS)) throw new TypeError(`unknown event ${type}`);
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this.#listeners.get(type)?.delete(listener);
  }

  #emit(type, ...args) {
    const handlers = [this[EVENTS[type]], ...(this.#listeners.get(type) ?? [])];
    for (const handler of handlers) {
      if (typeof handler !== "function") continue;
      try {
        handler(...args);
      } catch (error) {
        queueMicrotask(() => {
          throw error; // an app's bug is reported, and does not break the call
        });
      }
    }
  }

  // ------------------------------------------------------------- local media

  /**
   * Capture camera and microphone. The call owns what it captures: it stops
   * these tracks on disconnect() and on a fatal error. Works before or after
   * connect(). A camera that opens only after disconnect() or a fatal error
   * (a permission prompt answered late, React StrictMode's cleanup) is stopped
   * at once, and this rejects with ABORTED.
   */
  async initLocalStream(constraints = { video: true, audio: true }) {
    const mediaGen = this.#mediaGen;
    const stream = await navigator.mediaDevices.getUserMedia(constraints);
    if (mediaGen !== this.#mediaGen) {
      for (const track of stream.getTracks()) track.stop();
      throw new SignalingError("ABORTED", "ABORTED: the call let its media go while the camera was opening");
    }
    for (const track of stream.getTracks()) this.#ownedTracks.add(track);
    this.#stopOwned(this.#localStream, stream);
    await Promise.all(this.#useStream(stream));
    return stream;
  }

  /** Send a stream you captured yourself (you keep ownership: it is never stopped here). */
  async setLocalStream(stream) {
    if (stream !== this.#localStream) this.#stopOwned(this.#localStream, stream);
    await Promise.all(this.#useStream(stream));
  }

  /**
   * Send another track in place of the current one of its kind (device
   * switching, screen share) without renegotiating. A track you pass stays
   * yours; a replaced track this call captured is stopped.
   */
  async replaceTrack(track) {
    if (!this.#localStream) this.#localStream = new MediaStream();
    const stream = this.#localStream;
    for (const old of stream.getTracks().filter((t) => t.kind === track.kind && t !== track)) {
      stream.removeTrack(old);
      if (this.#ownedTracks.delete(old)) old.stop();
    }
    if (!stream.getTracks().includes(track)) stream.addTrack(track);
    await Promise.all(this.#useStream(stream));
  }

  /** Idempotent: returns whether the microphone is now enabled (false without one). */
  setMicrophoneEnabled(enabled) {
    return this.#setEnabled("audio", enabled);
  }

  setCameraEnabled(enabled) {
    return this.#setEnabled("video", enabled);
  }

  toggleAudio() {
    return this.setMicrophoneEnabled(!this.#isEnabled("audio"));
  }

  toggleVideo() {
    return this.setCameraEnabled(!this.#isEnabled("video"));
  }

  #isEnabled(kind) {
    return this.#tracks(kind).some((track) => track.enabled);
  }

  #setEnabled(kind, enabled) {
    const tracks = this.#tracks(kind);
    for (const track of tracks) track.enabled = Boolean(enabled);
    return tracks.length > 0 && Boolean(enabled);
  }

  #tracks(kind) {
    return this.#localStream?.getTracks().filter((track) => track.kind === kind) ?? [];
  }

  /** Returns the pending replaceTrack() calls. */
  #useStream(stream) {
    this.#localStream = stream;
    const pending = [...this.#peers.values()].flatMap((peer) => this.#syncTracks(peer));
    this.#emit("localstream", stream);
    return pending;
  }

  #stopOwned(stream, keep) {
    for (const track of stream?.getTracks() ?? []) {
      if (keep?.getTracks().includes(track)) continue;
      if (this.#ownedTracks.delete(track)) track.stop();
    }
  }

  #releaseMedia() {
    this.#mediaGen += 1; // a camera still opening is stopped when it opens
    for (const track of this.#ownedTracks) track.stop();
    this.#ownedTracks.clear();
    this.#localStream = null;
  }

  // -------------------------------------------------------------- lifecycle

  /**
   * Fetch the ICE configuration, then join the room. Resolves with the first
   * room_state payload; rejects with a SignalingError after a final error, after
   * `connectAttempts` failed attempts, or with code ABORTED when disconnect()
   * comes first.
   */
  connect() {
    if (this.#pending) return this.#pending.promise;
    const gen = ++this.#gen;
    this.#detach(); // a second connect() starts over on a new socket
    clearTimeout(this.#retryTimer);
    this.#resetAttempts();
    this.#joinedOnce = false;
    this.#failures = 0;
    this.#rate = this.#sendRate;
    this.#setStatus("connecting");
    let settle;
    const promise = new Promise((resolve, reject) => {
      settle = { resolve, reject };
    });
    this.#pending = { gen, promise, ...settle };
    this.#open(gen);
    return promise;
  }

  /** The raw /webrtc/config response. */
  async getConfig() {
    return this.#fetchConfig(await this.#getToken());
  }

  /**
   * Leave for good: a clean close (the others see user_left at once), every
   * peer connection closed, the media this call captured stopped. A pending
   * connect() rejects with ABORTED. connect() may be called again afterwards.
   */
  async disconnect() {
    this.#gen += 1;
    this.#detach(1000);
    this.#teardown();
    this.#setStatus("closed");
    this.#settle(null, new SignalingError("ABORTED", "ABORTED: disconnect() was called"));
  }

  #teardown() {
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#repairTimer);
    this.#repairTimer = null;
    this.#rateLimitReported = false;
    for (const id of [...this.#peers.keys()]) this.#closePeer(id);
    this.#participants.clear();
    this.#outbox = [];
    this.#releaseMedia();
  }

  #fail(error) {
    this.#gen += 1;
    this.#detach();
    this.#teardown();
    this.#setStatus("failed", error);
    if (this.#reported !== error.code) this.#emit("error", error.message, error.code, error); // not twice
    this.#reported = null;
    this.#settle(null, error);
  }

  #settle(value, error) {
    const pending = this.#pending;
    if (!pending) return;
    this.#pending = null;
    if (error) pending.reject(error);
    else pending.resolve(value);
  }

  #resetAttempts() {
    this.#attempt = 0;
    this.#reported = null;
  }

  // ------------------------------------------------------------------ socket

  async #getToken() {
    return typeof this.#token === "function" ? await this.#token() : this.#token;
  }

  async #fetchConfig(token) {
    let response;
    try {
      // Bounded: a pooled HTTP connection may sit on the same dead network.
      response = await fetch(`${this.#serverUrl}${this.#basePath}/config`, {
        headers: { Authorization: `Bearer ${token}` },
        signal: AbortSignal.timeout(this.#staleAfterMs),
      });
    } catch (error) {
      throw fetchFailed(error, this.#serverUrl);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      const code = body?.error ?? (response.status === 503 ? "SERVER_BUSY" : `HTTP_${response.status}`);
      throw new SignalingError(code, body?.message ?? `${code}: ${response.statusText}`);
    }
    return body;
  }

  /** One attempt: token, fresh ICE configuration, then the socket. */
  async #open(gen) {
    let token;
    try {
      token = await this.#getToken();
      if (gen !== this.#gen) return;
      const config = rtcConfiguration(await this.#fetchConfig(token));
      if (gen !== this.#gen) return;
      this.#rtcConfig = config;
    } catch (error) {
      if (gen === this.#gen) this.#retry(gen, networkError(error, this.#serverUrl));
      return;
    }
    const base = this.#serverUrl.replace(/^http/, "ws");
    const room = encodeURIComponent(this.#roomId);
    const ws = new WebSocket(`${base}${this.#basePath}/ws/${room}?token=${encodeURIComponent(token)}`);
    this.#ws = ws;
    this.#inRoom = false;
    this.#socketError = null;
    this.#tokens = this.#sendBurst; // a new connection starts with a full bucket on the server too
    this.#tokensAt = performance.now();
    const current = () => ws === this.#ws && gen === this.#gen;
    ws.onmessage = (event) => {
      if (!current()) return;
      this.#lastSeen = Date.now();
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this.#handle(message, gen);
    };
    ws.onclose = (event) => {
      if (!current()) return;
      const announced = this.#announced(event.code);
      this.#detach();
      const finalCode = FINAL_CLOSE_CODES.get(event.code);
      const retriedCode = RETRIED_CLOSE_CODES.get(event.code);
      if (announced && FINAL_ERRORS.has(announced.code)) this.#fail(announced);
      else if (finalCode) this.#fail(new SignalingError(finalCode, `${finalCode}: closed with ${event.code}`));
      else if (announced) this.#retry(gen, announced);
      else if (retriedCode) this.#retry(gen, new SignalingError(retriedCode, `${retriedCode}: closed with ${event.code}`));
      else {
        const code = this.#joinedOnce ? "CONNECTION_LOST" : "NETWORK_ERROR";
        this.#retry(gen, new SignalingError(code, `${code}: the signaling connection closed (${event.code})`));
      }
    };
    this.#startWatchdog(ws, gen);
  }

  /**
   * The error frame that announced this close: one whose close code it is, or
   * (a close without a close frame, 1006) one that came just before. An older
   * error is not blamed for an unrelated close.
   */
  #announced(closeCode) {
    const announced = this.#socketError;
    this.#socketError = null;
    if (!announced) return null;
    if (CLOSE_CODES.get(announced.error.code) === closeCode) return announced.error;
    if (closeCode === 1006 && Date.now() - announced.at < 2000) return announced.error;
    return null;
  }

  /**
   * Drop the current socket at once: no more events from it, no waiting for its
   * close. 4000 is an application code, so a close that does get through keeps
   * our slot; 1000 leaves the room.
   */
  #detach(code = 4000) {
    const ws = this.#ws;
    clearInterval(this.#watchdog);
    clearTimeout(this.#pumpTimer);
    this.#watchdog = null;
    this.#pumpTimer = null;
    this.#ws = null;
    this.#inRoom = false;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    if (ws.readyState <= WebSocket.OPEN) ws.close(code);
  }

  #retry(gen, error) {
    if (gen !== this.#gen) return;
    if (FINAL_ERRORS.has(error.code)) {
      this.#fail(error);
      return;
    }
    if (!this.#joinedOnce) {
      this.#failures += 1;
      if (this.#failures >= this.#connectAttempts) {
        this.#fail(error);
        return;
      }
    }
    if (this.#reported !== error.code) {
      this.#reported = error.code; // once per streak, not once per attempt
      this.#emit("error", error.message, error.code, error);
    }
    this.#setStatus(this.#joinedOnce ? "reconnecting" : "connecting", error);
    // Full jitter: anywhere between 0 and an exponentially growing ceiling.
    const ceiling = Math.min(this.#maxBackoffMs, 250 * 2 ** this.#attempt);
    this.#attempt += 1;
    const delay = Math.random() * ceiling;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(() => this.#open(gen), delay);
  }

  #startWatchdog(ws, gen) {
    this.#lastSeen = this.#lastPing = Date.now();
    // Browsers cannot see WebSocket pings, so a dead network is noticed by the
    // silence: ping when quiet, and give the socket up when nothing comes back
    // (a connection attempt that never opens counts as silence too).
    const tick = Math.max(50, Math.min(1000, this.#pingIntervalMs / 2));
    this.#watchdog = setInterval(() => {
      if (ws !== this.#ws || gen !== this.#gen) return;
      const now = Date.now();
      if (now - this.#lastSeen > this.#staleAfterMs) {
        this.#detach();
        this.#attempt = 0; // retry now: the server holds our slot only for its grace
        this.#retry(gen, new SignalingError("CONNECTION_LOST", "CONNECTION_LOST: the signaling connection went silent"));
      } else if (
        now - this.#lastSeen > this.#pingIntervalMs &&
        now - this.#lastPing > this.#pingIntervalMs &&
        ws.readyState === WebSocket.OPEN
      ) {
        if (!this.#takeToken()) return; // busy sending: the server's limit counts pings too
        this.#lastPing = now;
        ws.send(JSON.stringify({ type: "ping" }));
      }
    }, tick);
  }

  /**
   * Queue signaling (bounded): it goes out paced under the server's rate
   * limit, and waits while the socket is down until the room is rejoined. A
   * frame the server would refuse as too large (and close our socket for) is
   * never sent: that one peer connection is closed instead. Returns whether
   * the frame was queued.
   */
  #send(type, payload) {
    const frame = JSON.stringify({ type, payload });
    const target = payload.target_user_id;
    // Up to 3 UTF-8 bytes per UTF-16 unit: count the bytes only when it may matter.
    const size = frame.length * 3 > this.#maxMessageSize ? new TextEncoder().encode(frame).length : frame.length;
    if (size > this.#maxMessageSize) {
      const message =
        `MESSAGE_TOO_LARGE: the ${type} for ${target} is ${size} bytes, over the server's limit of ` +
        `${this.#maxMessageSize}; that peer connection is closed`;
      this.#emit("error", message, "MESSAGE_TOO_LARGE", new SignalingError("MESSAGE_TOO_LARGE", message));
      if (target) this.#closePeer(target);
      return false;
    }
    if (this.#outbox.length >= OUTBOX_LIMIT) {
      this.#outboxOverflowed = true; // lost: renegotiate (now, or at the next room_state)
      if (this.#inRoom) this.#scheduleRepair();
      return false;
    }
    this.#outbox.push({ target, frame });
    this.#pump();
    return true;
  }

  /** Send what the token bucket allows now; come back for the rest. */
  #pump() {
    clearTimeout(this.#pumpTimer);
    this.#pumpTimer = null;
    const ws = this.#ws;
    if (!ws || !this.#inRoom || ws.readyState !== WebSocket.OPEN) return;
    while (this.#outbox.length > 0 && this.#takeToken()) ws.send(this.#outbox.shift().frame);
    if (this.#outbox.length > 0) this.#pumpTimer = setTimeout(() => this.#pump(), Math.ceil(1000 / this.#rate));
  }

  #takeToken() {
    const now = performance.now();
    this.#tokens = Math.min(this.#sendBurst, this.#tokens + ((now - this.#tokensAt) / 1000) * this.#rate);
    this.#tokensAt = now;
    if (this.#tokens < 1) return false;
    this.#tokens -= 1;
    return true;
  }

  /**
   * The server dropped a message of ours (a non-fatal RATE_LIMITED): report it
   * once per streak, slow down, and renegotiate every peer shortly after (the
   * lost message may have been any offer, answer or candidate).
   */
  #rateLimited(error) {
    this.#tokens = 0;
    this.#rate = Math.max(1, this.#rate / 2);
    if (!this.#rateLimitReported) {
      this.#rateLimitReported = true;
      this.#emit("error", error.message, error.code, error);
    }
    this.#scheduleRepair(); // a close 4429 after sustained flooding speaks for itself
  }

  #scheduleRepair() {
    if (this.#repairTimer) return; // one repair covers every drop until it runs
    const gen = this.#gen;
    this.#repairTimer = setTimeout(() => {
      this.#repairTimer = null;
      if (gen !== this.#gen) return;
      this.#rateLimitReported = false;
      if (this.#inRoom) this.#outboxOverflowed = false;
      for (const peer of this.#peers.values()) this.#renegotiate(peer);
    }, REPAIR_DELAY_MS);
  }

  #setStatus(status, detail) {
    this.#status = status;
    this.#emit("status", status, detail);
  }

  // ---------------------------------------------------------------- messages

  #handle(message, gen) {
    const payload = message.payload ?? {};
    switch (message.type) {
      case "room_state":
        this.#roomState(payload, gen);
        break;
      case "user_joined": {
        const participant = { user_id: payload.user_id, username: payload.username };
        this.#participants.set(payload.user_id, participant);
        this.#emit("participantjoined", participant);
        break;
      }
      case "user_left":
        this.#participants.delete(payload.user_id);
        this.#closePeer(payload.user_id);
        this.#emit("participantleft", { user_id: payload.user_id, username: payload.username }, payload.reason);
        break;
      case "offer":
      case "answer": {
        if (typeof payload.sdp !== "string") break;
        const description = { type: message.type, sdp: payload.sdp };
        const from = payload.sender_id ?? message.sender_id;
        if (message.type === "offer") this.#remoteOffer(from, description);
        else this.#enqueue(from, (peer) => this.#description(peer, description));
        break;
      }
      case "ice_candidate":
        this.#enqueue(payload.sender_id ?? message.sender_id, (peer) => this.#candidate(peer, payload));
        break;
      case "error": {
        const error = new SignalingError(payload.code, payload.message ?? payload.code);
        if (payload.code === "RATE_LIMITED") this.#rateLimited(error);
        else if (CLOSING_ERRORS.has(payload.code)) this.#socketError = { error, at: Date.now() }; // the close follows
        else this.#emit("error", error.message, error.code, error);
        break;
      }
      case "server_message":
        // From the app's backend (room service API); no participant can send one.
        if (message.sender_id === "") this.#emit("servermessage", payload);
        break;
      default:
        break; // pong, and anything newer than this module
    }
  }

  #roomState(payload, gen) {
    this.#inRoom = true;
    this.#joinedOnce = true;
    this.#resetAttempts();
    this.#selfId = payload.self.user_id;
    const others = payload.participants.filter((p) => p.user_id !== this.#selfId);
    this.#participants = new Map(others.map((p) => [p.user_id, { user_id: p.user_id, username: p.username }]));
    const recovered = payload.resumed === true && payload.recovered === true && !this.#outboxOverflowed;
    for (const id of [...this.#peers.keys()]) {
      if (!this.#participants.has(id) || !payload.resumed) this.#closePeer(id);
    }
    const outbox = this.#outbox;
    this.#outbox = [];
    this.#outboxOverflowed = false;
    for (const participant of others) {
      const existing = this.#peers.get(participant.user_id);
      if (!existing) {
        this.#createPeer(participant.user_id, true); // we arrived (or came back without our slot): we offer
      } else {
        this.#applyConfig(existing);
        if (!recovered) this.#renegotiate(existing); // messages may be lost either way
      }
    }
    if (recovered) {
      const kept = outbox.filter(({ target }) => !target || this.#peers.has(target));
      this.#outbox = [...kept, ...this.#outbox];
    }
    this.#pump();
    this.#setStatus("joined", payload);
    this.#emit("roomstate", [...payload.participants], payload);
    if (this.#pending?.gen === gen) this.#settle(payload);
  }

  // ----------------------------------------------------- perfect negotiation

  #createPeer(userId, offerer) {
    const pc = new RTCPeerConnection(this.#rtcConfig ?? {});
    const peer = {
      userId,
      pc,
      polite: this.#selfId > userId, // both sides agree on who yields
      ready: offerer, // may add transceivers (an answerer waits for the first offer's)
      makingOffer: false,
      ignoreOffer: false,
      settingRemoteAnswer: false,
      pendingCandidates: [], // early candidates, at most MAX_PENDING_CANDIDATES
      candidateErrorReported: false,
      nextOffer: null, // the newest remote offer not handled yet
      lastOfferAt: -Infinity, // when a remote offer was last handled
      offerTimer: null, // rolls back our offer when no answer comes
      offerRetries: 0,
      transceivers: {}, // kind -> the transceiver our local track goes out on
      stream: null,
      looseStream: null, // for tracks that arrive without a stream
      chain: Promise.resolve(),
    };
    this.#peers.set(userId, peer);
    pc.onnegotiationneeded = async () => {
      if (this.#peers.get(userId) !== peer) return;
      try {
        peer.makingOffer = true;
        await pc.setLocalDescription();
        const { type, sdp } = pc.localDescription;
        if (this.#send(type, { type, sdp, target_user_id: userId }) && type === "offer") this.#armOfferTimer(peer);
      } catch (error) {
        this.#emit("error", `NEGOTIATION_FAILED: ${error}`, "NEGOTIATION_FAILED", error);
      } finally {
        peer.makingOffer = false;
      }
    };
    pc.onicecandidate = ({ candidate }) => {
      // No end-of-candidates message: the guide's client cannot parse an empty one.
      if (!candidate || !candidate.candidate) return;
      this.#send("ice_candidate", {
        candidate: candidate.candidate,
        sdp_mid: candidate.sdpMid,
        sdp_m_line_index: candidate.sdpMLineIndex,
        target_user_id: userId,
      });
    };
    pc.ontrack = ({ track, streams }) => {
      let stream = streams[0];
      if (!stream) {
        // A track without a stream (another client's addTransceiver): gather them.
        if (!peer.looseStream || peer.looseStream.getTracks().some((t) => t.kind === track.kind)) {
          peer.looseStream = new MediaStream();
        }
        stream = peer.looseStream;
        stream.addTrack(track);
      }
      // The other side may come back (a reload, a takeover) with a new stream.
      peer.stream = stream;
      this.#emit("remotestream", userId, stream);
    };
    pc.onsignalingstatechange = () => {
      if (pc.signalingState !== "have-local-offer") clearTimeout(peer.offerTimer);
    };
    pc.onconnectionstatechange = () => {
      if (this.#peers.get(userId) !== peer) return;
      this.#emit("connectionstatechange", userId, pc.connectionState);
      if (pc.connectionState === "failed") this.#iceRestart(peer);
    };
    this.#syncTracks(peer);
    return peer;
  }

  /** Put the local tracks on this peer's transceivers: before or after connect(), no matter. */
  #syncTracks(peer) {
    const pending = [];
    if (!peer.ready || peer.pc.signalingState === "closed") return pending;
    const stream = this.#localStream;
    for (const kind of KINDS) {
      const track = stream?.getTracks().find((t) => t.kind === kind && t.readyState === "live") ?? null;
      let transceiver = peer.transceivers[kind];
      if (!transceiver) {
        transceiver = peer.pc
          .getTransceivers()
          .find((t) => !t.stopped && t.receiver.track.kind === kind && !Object.values(peer.transceivers).includes(t));
        transceiver ??= peer.pc.addTransceiver(kind, { direction: track ? "sendrecv" : "recvonly" });
        peer.transceivers[kind] = transceiver;
      }
      if (transceiver.sender.track !== track) {
        const replaced = transceiver.sender.replaceTrack(track).catch((error) => {
          this.#emit("error", `REPLACE_TRACK_FAILED: ${error}`, "REPLACE_TRACK_FAILED", error);
        });
        pending.push(replaced);
      }
      if (track && stream) transceiver.sender.setStreams?.(stream);
      const direction = track ? "sendrecv" : "recvonly";
      if (transceiver.direction !== direction) transceiver.direction = direction; // renegotiates
    }
    return pending;
  }

  /** Run signaling work for one peer strictly in arrival order. */
  #enqueue(userId, work) {
    if (!userId || userId === this.#selfId) return;
    const peer = this.#peers.get(userId) ?? this.#createPeer(userId, false);
    peer.chain = peer.chain
      .then(() => (this.#peers.get(userId) === peer ? work(peer) : undefined))
      .catch((error) => this.#emit("error", `SIGNALING_FAILED: ${error}`, "SIGNALING_FAILED", error));
  }

  /**
   * A remote offer: handled in order with the rest, but at most one per
   * OFFER_INTERVAL_MS; offers that arrive meanwhile replace the waiting one
   * (each answered offer costs an answer and fresh candidates, which a peer
   * could otherwise use to push us over the server's rate limit).
   */
  #remoteOffer(userId, description) {
    if (!userId || userId === this.#selfId) return;
    const peer = this.#peers.get(userId) ?? this.#createPeer(userId, false);
    const waiting = peer.nextOffer !== null;
    peer.nextOffer = description;
    if (waiting) return;
    this.#enqueue(userId, async () => {
      const wait = peer.lastOfferAt + OFFER_INTERVAL_MS - performance.now();
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
      const offer = peer.nextOffer;
      peer.nextOffer = null;
      peer.lastOfferAt = performance.now();
      if (this.#peers.get(userId) === peer) await this.#description(peer, offer);
    });
  }

  /** Why a remote offer is refused, or null: more media sections than a call uses, or a data channel. */
  #refusal(sdp) {
    const sections = sdp.match(/^m=/gm)?.length ?? 0;
    if (sections > MAX_REMOTE_SECTIONS) return `${sections} media sections (at most ${MAX_REMOTE_SECTIONS})`;
    if (/^m=application/m.test(sdp)) return "a data channel this call did not open";
    return null;
  }

  async #description(peer, description) {
    const pc = peer.pc;
    const refused = description.type === "offer" ? this.#refusal(description.sdp) : null;
    if (refused) {
      // Our answer would repeat every section (and could outgrow the server's frame limit).
      const message = `OFFER_REFUSED: the offer from ${peer.userId} has ${refused}`;
      this.#emit("error", message, "OFFER_REFUSED", new SignalingError("OFFER_REFUSED", message));
      return;
    }
    const readyForOffer = !peer.makingOffer && (pc.signalingState === "stable" || peer.settingRemoteAnswer);
    const collision = description.type === "offer" && !readyForOffer;
    peer.ignoreOffer = !peer.polite && collision;
    if (peer.ignoreOffer) return;
    peer.settingRemoteAnswer = description.type === "answer";
    try {
      await pc.setRemoteDescription(description); // a polite peer rolls back implicitly
    } finally {
      peer.settingRemoteAnswer = false;
    }
    if (description.type === "answer") peer.offerRetries = 0;
    for (const candidate of peer.pendingCandidates.splice(0)) await this.#addCandidate(peer, candidate);
    if (description.type === "offer") {
      peer.ready = true;
      this.#syncTracks(peer); // after the offer, so its transceivers are reused
      await pc.setLocalDescription();
      const { type, sdp } = pc.localDescription;
      this.#send(type, { type, sdp, target_user_id: peer.userId });
    }
  }

  async #candidate(peer, payload) {
    const text = payload.candidate;
    if (!text || typeof text !== "string") return; // end of candidates, or nonsense
    if (text.length > MAX_CANDIDATE_LENGTH) return; // no real candidate line is this long
    const mid = payload.sdp_mid;
    const index = payload.sdp_m_line_index;
    const candidate = {
      candidate: text,
      sdpMid: typeof mid === "string" && mid.length <= 64 ? mid : null,
      sdpMLineIndex: Number.isInteger(index) && index >= 0 && index <= 0xffff ? index : null,
    };
    if (!peer.pc.remoteDescription) {
      // Early: keep it until the description lands (bounded: a peer may never send one).
      if (peer.pendingCandidates.length < MAX_PENDING_CANDIDATES) peer.pendingCandidates.push(candidate);
      return;
    }
    await this.#addCandidate(peer, candidate);
  }

  /** Add one candidate; a bad one is reported (once per peer) and never stops the rest. */
  async #addCandidate(peer, candidate) {
    try {
      await peer.pc.addIceCandidate(candidate);
    } catch (error) {
      if (peer.ignoreOffer || peer.candidateErrorReported) return; // candidates of an ignored offer may fail
      peer.candidateErrorReported = true;
      this.#emit("error", `SIGNALING_FAILED: a candidate from ${peer.userId} was refused: ${error}`,
        "SIGNALING_FAILED", error);
    }
  }

  /** Our offer went out: if no answer comes in time, roll it back and offer again (backing off). */
  #armOfferTimer(peer) {
    // Leaving have-local-offer clears the timer (onsignalingstatechange); a newer offer re-arms it.
    clearTimeout(peer.offerTimer);
    const delay = this.#offerTimeoutMs * 2 ** Math.min(peer.offerRetries, 3);
    peer.offerTimer = setTimeout(() => {
      if (this.#peers.get(peer.userId) !== peer || peer.pc.signalingState !== "have-local-offer") return;
      if (!this.#inRoom) {
        this.#armOfferTimer(peer); // the socket is down: the offer still waits to go out
        return;
      }
      peer.offerRetries += 1;
      this.#renegotiate(peer);
    }, delay);
  }

  /**
   * Messages may have been lost (a resume that lost them, a message the server
   * dropped, an offer never answered): drop a half-done offer and start over
   * with fresh ICE.
   */
  #renegotiate(peer) {
    peer.chain = peer.chain
      .then(async () => {
        if (this.#peers.get(peer.userId) !== peer) return;
        if (peer.pc.signalingState === "have-local-offer") {
          await peer.pc.setLocalDescription({ type: "rollback" });
        }
        peer.pc.restartIce();
      })
      .catch((error) => this.#emit("error", `SIGNALING_FAILED: ${error}`, "SIGNALING_FAILED", error));
  }

  /** ICE failed: fetch fresh (TURN) credentials, then restart ICE with them. */
  async #iceRestart(peer) {
    const gen = this.#gen;
    try {
      this.#rtcConfig = rtcConfiguration(await this.getConfig());
    } catch {
      // keep the old configuration: a restart with it still beats none
    }
    if (gen !== this.#gen || this.#peers.get(peer.userId) !== peer) return;
    this.#applyConfig(peer);
    peer.pc.restartIce();
  }

  #applyConfig(peer) {
    if (!this.#rtcConfig) return;
    try {
      peer.pc.setConfiguration({ ...peer.pc.getConfiguration(), iceServers: this.#rtcConfig.iceServers });
    } catch {
      // a configuration the browser refuses to change: the old one stays
    }
  }

  #closePeer(userId) {
    const peer = this.#peers.get(userId);
    if (!peer) return;
    this.#peers.delete(userId);
    clearTimeout(peer.offerTimer);
    peer.pc.close();
    if (peer.stream) this.#emit("remotestreamremoved", userId, peer.stream);
    this.#emit("connectionstatechange", userId, "closed");
  }
}

export default WebRTCCall;
