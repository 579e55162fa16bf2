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
//  * ICE restarts use freshly fetched (TURN) credentials.
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
/** Server errors that come right before the server closes the socket. */
const CLOSING_ERRORS = new Set([...FINAL_ERRORS, "SERVER_BUSY", "SLOW_CONSUMER", "RATE_LIMITED", "TOO_MANY_CONNECTIONS"]);
const KINDS = ["audio", "video"];
/** Outgoing signaling kept while the socket is down; beyond it, renegotiate. */
const OUTBOX_LIMIT = 256;
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

export class WebRTCCall {
  #serverUrl;
  #token;
  #roomId;
  #basePath;
  #maxBackoffMs;
  #connectAttempts;
  #pingIntervalMs;
  #staleAfterMs;
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
  #socketError = null; // an error frame that announced the close to come
  #pending = null; // {gen, resolve, reject} of connect()
  #rtcConfig = null;
  #selfId = null;
  #participants = new Map(); // user_id -> {user_id, username}
  #peers = new Map(); // user_id -> peer state
  #outbox = [];
  #outboxOverflowed = false;
  #localStream = null;
  #ownedTracks = new Set(); // tracks this module captured, and so stops

  /**
   * @param {string} serverUrl  e.g. "https://signal.example" (http(s), no trailing path)
   * @param {string | (() => string | Promise<string>)} token  a JWT, or a function that fetches a fresh one
   * @param {string} roomId
   * @param {object} [options]  basePath, maxBackoffMs, connectAttempts, pingIntervalMs, staleAfterMs
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

    // Single callbacks, as in the guide; on()/off() add as many listeners as you like.
    this.onLocalStream = null; // (stream)
    this.onRemoteStream = null; // (userId, stream)
    this.onRemoteStreamRemoved = null; // (userId, stream)
    this.onParticipantJoined = null; // (participant)
    this.onParticipantLeft = null; // (participant, reason)
    this.onRoomState = null; // (participants, payload)
    this.onError = null; // (message, code, error)
    this.onServerMessage = null; // (payload, targeted): a message from the app's backend
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
   * connect().
   */
  async initLocalStream(constraints = { video: true, audio: true }) {
    const stream = await navigator.mediaDevices.getUserMedia(constraints);
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
      throw networkError(error, this.#serverUrl);
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
      const announced = this.#socketError;
      this.#detach();
      const finalCode = FINAL_CLOSE_CODES.get(event.code);
      if (announced && FINAL_ERRORS.has(announced.code)) this.#fail(announced);
      else if (finalCode) this.#fail(new SignalingError(finalCode, `${finalCode}: closed with ${event.code}`));
      else if (announced) this.#retry(gen, announced);
      else {
        const code = this.#joinedOnce ? "CONNECTION_LOST" : "NETWORK_ERROR";
        this.#retry(gen, new SignalingError(code, `${code}: the signaling connection closed (${event.code})`));
      }
    };
    this.#startWatchdog(ws, gen);
  }

  /**
   * Drop the current socket at once: no more events from it, no waiting for its
   * close. 4000 is an application code, so a close that does get through keeps
   * our slot; 1000 leaves the room.
   */
  #detach(code = 4000) {
    const ws = this.#ws;
    clearInterval(this.#watchdog);
    this.#watchdog = null;
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
        this.#lastPing = now;
        ws.send(JSON.stringify({ type: "ping" }));
      }
    }, tick);
  }

  /** Send signaling now, or keep it (bounded) until the room is rejoined. */
  #send(type, payload) {
    const frame = JSON.stringify({ type, payload });
    if (this.#ws && this.#inRoom && this.#ws.readyState === WebSocket.OPEN) {
      this.#ws.send(frame);
    } else if (this.#outbox.length < OUTBOX_LIMIT) {
      this.#outbox.push({ target: payload.target_user_id, frame });
    } else {
      this.#outboxOverflowed = true;
    }
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
      case "answer":
        this.#enqueue(payload.sender_id ?? message.sender_id, (peer) =>
          this.#description(peer, { type: payload.type, sdp: payload.sdp }),
        );
        break;
      case "ice_candidate":
        this.#enqueue(payload.sender_id ?? message.sender_id, (peer) => this.#candidate(peer, payload));
        break;
      case "error": {
        const error = new SignalingError(payload.code, payload.message ?? payload.code);
        if (CLOSING_ERRORS.has(payload.code)) this.#socketError = error; // the close follows
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
      for (const { target, frame } of outbox) {
        if (!target || this.#peers.has(target)) this.#ws.send(frame);
      }
    }
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
      pendingCandidates: [],
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
        this.#send(type, { type, sdp, target_user_id: userId });
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

  async #description(peer, description) {
    const pc = peer.pc;
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
    if (!payload.candidate) return; // end of candidates
    const candidate = {
      candidate: payload.candidate,
      sdpMid: payload.sdp_mid ?? null,
      sdpMLineIndex: payload.sdp_m_line_index ?? null,
    };
    if (!peer.pc.remoteDescription) {
      peer.pendingCandidates.push(candidate); // early: keep it until the description lands
      return;
    }
    await this.#addCandidate(peer, candidate);
  }

  async #addCandidate(peer, candidate) {
    try {
      await peer.pc.addIceCandidate(candidate);
    } catch (error) {
      if (!peer.ignoreOffer) throw error; // candidates of an ignored offer may fail
    }
  }

  /** After a resume that lost messages: drop a half-done offer and start over with fresh ICE. */
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
    peer.pc.close();
    if (peer.stream) this.#emit("remotestreamremoved", userId, peer.stream);
    this.#emit("connectionstatechange", userId, "closed");
  }
}

export default WebRTCCall;
