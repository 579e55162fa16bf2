// signal-client.js: a dependency-free browser ES module for signal-server.
//
// API-compatible in spirit with the integration guide's WebRTCService, minus its
// failure modes:
//  * the WebSocket reconnects by itself (exponential backoff with jitter) and
//    resumes the room within the server's grace period;
//  * one RTCPeerConnection per remote participant (a mesh), negotiated with the
//    "perfect negotiation" pattern, so offer glare cannot wedge a call;
//  * ICE candidates that arrive before the remote description are queued;
//  * a peer connection that fails is repaired with an ICE restart;
//  * it reads the camelCase ICE configuration RTCPeerConnection understands.
//
// Usage:
//   import { WebRTCCall } from "https://signal.example/webrtc/signal-client.js";
//   const call = new WebRTCCall("https://signal.example", token, "room-1");
//   call.onRemoteStream = (userId, stream) => { ... };
//   await call.initLocalStream();
//   await call.connect();

/** Close codes after which reconnecting cannot help (docs/protocol.md). */
const FINAL_CLOSE_CODES = new Set([4400, 4401, 4403, 4409, 4410, 4431]);
const PING_INTERVAL_MS = 5000;
const STALE_AFTER_MS = 15000;

export class SignalingError extends Error {
  constructor(code, message) {
    super(message);
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

export class WebRTCCall {
  /**
   * @param {string} serverUrl  e.g. "https://signal.example" (http(s), no trailing path)
   * @param {string | (() => Promise<string>)} token  a JWT, or a function that fetches a fresh one
   * @param {string} roomId
   * @param {{basePath?: string, maxBackoffMs?: number}} [options]
   */
  constructor(serverUrl, token, roomId, options = {}) {
    this.serverUrl = serverUrl.replace(/\/+$/, "");
    this.token = token;
    this.roomId = roomId;
    this.basePath = options.basePath ?? "/webrtc";
    this.maxBackoffMs = options.maxBackoffMs ?? 5000;
    this.localStream = null;
    this.selfId = null;
    this.participants = new Map(); // user_id -> {user_id, username}
    this.peers = new Map(); // user_id -> peer state
    this.rtcConfig = null;
    this.ws = null;
    this.status = "idle";
    this._leaving = false;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._lastSeen = 0;
    this._finalError = null;

    // Callbacks, as in the guide (plus the user id where a call has several peers).
    this.onLocalStream = null; // (stream)
    this.onRemoteStream = null; // (userId, stream)
    this.onParticipantJoined = null; // (participant)
    this.onParticipantLeft = null; // (participant, reason)
    this.onRoomState = null; // (participants, payload)
    this.onError = null; // (message, code)
    this.onConnectionStateChange = null; // (userId, state)
    this.onStatus = null; // ("connecting" | "joined" | "reconnecting" | "closed" | "failed", detail)
  }

  async initLocalStream(constraints = { video: true, audio: true }) {
    this.localStream = await navigator.mediaDevices.getUserMedia(constraints);
    this.onLocalStream?.(this.localStream);
    for (const peer of this.peers.values()) this._addLocalTracks(peer);
    return this.localStream;
  }

  /** Fetch the ICE configuration, then join the room. Resolves on the first room_state. */
  async connect() {
    this._leaving = false;
    this._finalError = null;
    this._setStatus("connecting");
    try {
      this.rtcConfig = rtcConfiguration(await this.getConfig());
    } catch (error) {
      this._fail(error);
      throw error;
    }
    return new Promise((resolve, reject) => {
      this._joined = { resolve, reject };
      this._openSocket();
    });
  }

  async getConfig() {
    const token = await this._token();
    const response = await fetch(`${this.serverUrl}${this.basePath}/config`, {
      headers: { Authorization: `Bearer ${token}` },
    });
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      const code = body?.error ?? `HTTP_${response.status}`;
      throw new SignalingError(code, body?.message ?? `${code}: ${response.statusText}`);
    }
    return body;
  }

  toggleAudio() {
    return this._toggle(this.localStream?.getAudioTracks());
  }

  toggleVideo() {
    return this._toggle(this.localStream?.getVideoTracks());
  }

  /** Leave for good: a clean close, so the others see user_left at once. */
  async disconnect() {
    this._leaving = true;
    clearTimeout(this._reconnectTimer);
    this._stopPings();
    for (const id of [...this.peers.keys()]) this._closePeer(id);
    this.localStream?.getTracks().forEach((track) => track.stop());
    this.localStream = null;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
    this.ws = null;
    this._setStatus("closed");
  }

  // ------------------------------------------------------------- socket

  async _token() {
    return typeof this.token === "function" ? await this.token() : this.token;
  }

  async _openSocket() {
    let token;
    try {
      token = await this._token();
    } catch (error) {
      this._scheduleReconnect(error);
      return;
    }
    const base = this.serverUrl.replace(/^http/, "ws");
    const url = `${base}${this.basePath}/ws/${encodeURIComponent(this.roomId)}?token=${encodeURIComponent(token)}`;
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => {
      this._lastSeen = Date.now();
      this._startPings(ws);
    };
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      this._lastSeen = Date.now();
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this._handle(message);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this._stopPings();
      this.ws = null;
      if (this._leaving) return;
      if (this._finalError || FINAL_CLOSE_CODES.has(event.code)) {
        this._fail(this._finalError ?? new SignalingError(`CLOSE_${event.code}`, `closed with ${event.code}`));
        return;
      }
      this._scheduleReconnect(new SignalingError("CONNECTION_LOST", `connection lost (${event.code})`));
    };
  }

  _scheduleReconnect(reason) {
    this._setStatus("reconnecting", reason);
    // Full jitter on an exponential backoff: the first retry comes fast, well
    // inside the server's grace period, and a crowd does not retry in step.
    const ceiling = Math.min(this.maxBackoffMs, 250 * 2 ** this._attempt);
    this._attempt += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._openSocket(), delay);
  }

  _startPings(ws) {
    this._stopPings();
    // Browsers cannot see WebSocket pings, so a dead network is noticed by
    // the silence: ping when quiet, and reconnect when nothing comes back.
    this._pingTimer = setInterval(() => {
      const quiet = Date.now() - this._lastSeen;
      if (quiet > STALE_AFTER_MS) {
        ws.close(4000, "stale"); // an application code: the server holds our slot
      } else if (quiet > PING_INTERVAL_MS && ws.readyState === WebSocket.OPEN) {
        ws.send(JSON.stringify({ type: "ping" }));
      }
    }, PING_INTERVAL_MS / 2);
  }

  _stopPings() {
    clearInterval(this._pingTimer);
    this._pingTimer = null;
  }

  _send(type, payload) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type, payload }));
    }
  }

  _setStatus(status, detail) {
    this.status = status;
    this.onStatus?.(status, detail);
  }

  _fail(error) {
    this._setStatus("failed", error);
    this.onError?.(error.message, error.code);
    if (this._joined) {
      this._joined.reject(error);
      this._joined = null;
    }
  }

  // ----------------------------------------------------------- messages

  _handle(message) {
    const payload = message.payload ?? {};
    switch (message.type) {
      case "room_state":
        this._roomState(payload);
        break;
      case "user_joined":
        this.participants.set(payload.user_id, { user_id: payload.user_id, username: payload.username });
        this.onParticipantJoined?.({ user_id: payload.user_id, username: payload.username });
        break;
      case "user_left":
        this.participants.delete(payload.user_id);
        this._closePeer(payload.user_id);
        this.onParticipantLeft?.({ user_id: payload.user_id, username: payload.username }, payload.reason);
        break;
      case "offer":
      case "answer":
        this._enqueue(payload.sender_id ?? message.sender_id, (peer) =>
          this._description(peer, { type: payload.type, sdp: payload.sdp }),
        );
        break;
      case "ice_candidate":
        this._enqueue(payload.sender_id ?? message.sender_id, (peer) => this._candidate(peer, payload));
        break;
      case "error":
        if (FINAL_CLOSE_CODES_BY_ERROR.has(payload.code)) {
          this._finalError = new SignalingError(payload.code, payload.message);
        } else {
          this.onError?.(payload.message, payload.code);
        }
        break;
      default:
        break; // pong, and anything newer than this module
    }
  }

  _roomState(payload) {
    this._attempt = 0;
    this.selfId = payload.self.user_id;
    const others = payload.participants.filter((p) => p.user_id !== this.selfId);
    this.participants = new Map(others.map((p) => [p.user_id, p]));
    const keep = payload.resumed === true && payload.recovered === true;
    for (const id of [...this.peers.keys()]) {
      if (!this.participants.has(id) || !payload.resumed) this._closePeer(id);
    }
    for (const participant of others) {
      const existing = this.peers.get(participant.user_id);
      if (!existing) {
        // We arrived (or came back without our slot): we make the offers.
        this._addLocalTracks(this._createPeer(participant.user_id));
      } else if (!keep) {
        existing.pc.restartIce(); // messages were lost: renegotiate, with fresh ICE
      }
    }
    this._setStatus("joined", payload);
    this.onRoomState?.([...payload.participants], payload);
    if (this._joined) {
      this._joined.resolve(payload);
      this._joined = null;
    }
  }

  // ---------------------------------------------- perfect negotiation

  _createPeer(userId) {
    const pc = new RTCPeerConnection(this.rtcConfig ?? {});
    const peer = {
      userId,
      pc,
      polite: this.selfId > userId, // both sides agree on who yields
      makingOffer: false,
      ignoreOffer: false,
      settingRemoteAnswer: false,
      pendingCandidates: [],
      tracksAdded: false,
      stream: null,
      chain: Promise.resolve(),
    };
    this.peers.set(userId, peer);
    pc.onnegotiationneeded = async () => {
      try {
        peer.makingOffer = true;
        await pc.setLocalDescription();
        const { type, sdp } = pc.localDescription;
        this._send(type, { type, sdp, target_user_id: userId });
      } catch (error) {
        this.onError?.(`NEGOTIATION_FAILED: ${error}`, "NEGOTIATION_FAILED");
      } finally {
        peer.makingOffer = false;
      }
    };
    pc.onicecandidate = ({ candidate }) => {
      // No end-of-candidates message: the guide's client cannot parse an empty one.
      if (!candidate) return;
      this._send("ice_candidate", {
        candidate: candidate.candidate,
        sdp_mid: candidate.sdpMid,
        sdp_m_line_index: candidate.sdpMLineIndex,
        target_user_id: userId,
      });
    };
    pc.ontrack = ({ track, streams }) => {
      if (!peer.stream) peer.stream = streams[0] ?? new MediaStream();
      if (!streams[0]) peer.stream.addTrack(track);
      this.onRemoteStream?.(userId, peer.stream);
    };
    pc.onconnectionstatechange = () => {
      this.onConnectionStateChange?.(userId, pc.connectionState);
      if (pc.connectionState === "failed") pc.restartIce();
    };
    return peer;
  }

  _addLocalTracks(peer) {
    if (peer.tracksAdded) return;
    peer.tracksAdded = true;
    if (this.localStream) {
      for (const track of this.localStream.getTracks()) peer.pc.addTrack(track, this.localStream);
    } else {
      peer.pc.addTransceiver("audio", { direction: "recvonly" });
      peer.pc.addTransceiver("video", { direction: "recvonly" });
    }
  }

  /** Run signaling work for one peer strictly in arrival order. */
  _enqueue(userId, work) {
    if (!userId || userId === this.selfId) return;
    const peer = this.peers.get(userId) ?? this._createPeer(userId);
    peer.chain = peer.chain
      .then(() => (this.peers.get(userId) === peer ? work(peer) : undefined))
      .catch((error) => this.onError?.(`SIGNALING_FAILED: ${error}`, "SIGNALING_FAILED"));
  }

  async _description(peer, description) {
    const pc = peer.pc;
    const readyForOffer =
      !peer.makingOffer && (pc.signalingState === "stable" || peer.settingRemoteAnswer);
    const collision = description.type === "offer" && !readyForOffer;
    peer.ignoreOffer = !peer.polite && collision;
    if (peer.ignoreOffer) return;
    peer.settingRemoteAnswer = description.type === "answer";
    await pc.setRemoteDescription(description); // a polite peer rolls back implicitly
    peer.settingRemoteAnswer = false;
    for (const candidate of peer.pendingCandidates.splice(0)) await this._addCandidate(peer, candidate);
    if (description.type === "offer") {
      this._addLocalTracks(peer); // after the offer, so its transceivers are reused
      await pc.setLocalDescription();
      const { type, sdp } = pc.localDescription;
      this._send(type, { type, sdp, target_user_id: peer.userId });
    }
  }

  async _candidate(peer, payload) {
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
    await this._addCandidate(peer, candidate);
  }

  async _addCandidate(peer, candidate) {
    try {
      await peer.pc.addIceCandidate(candidate);
    } catch (error) {
      if (!peer.ignoreOffer) throw error; // candidates of an ignored offer may fail
    }
  }

  _closePeer(userId) {
    const peer = this.peers.get(userId);
    if (!peer) return;
    this.peers.delete(userId);
    peer.pc.close();
    this.onConnectionStateChange?.(userId, "closed");
  }

  _toggle(tracks) {
    if (!tracks || tracks.length === 0) return false;
    const enabled = !tracks[0].enabled;
    for (const track of tracks) track.enabled = enabled;
    return enabled;
  }
}

/** Error codes that end the session: the close that follows is not retried. */
const FINAL_CLOSE_CODES_BY_ERROR = new Set([
  "UNAUTHORIZED",
  "FORBIDDEN",
  "INVALID_ROOM",
  "ROOM_FULL",
  "SESSION_REPLACED",
  "TOO_MANY_ROOMS",
]);

export default WebRTCCall;
