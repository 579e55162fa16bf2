// Type declarations for signal-client.js (hand-written; keep in step with the module).

/** The call's lifecycle, in the order a call usually goes through it. */
export type CallStatus = "idle" | "connecting" | "joined" | "reconnecting" | "failed" | "closed";

/** Errors that end the call: connect() rejects, status becomes "failed", no retry. */
export type FinalErrorCode =
  | "UNAUTHORIZED"
  | "FORBIDDEN"
  | "INVALID_ROOM"
  | "ROOM_FULL"
  | "SESSION_REPLACED"
  | "TOO_MANY_ROOMS"
  | "KICKED"
  | "ROOM_CLOSED";

/**
 * Errors that are retried (reported once per streak of retries). RATE_LIMITED
 * also comes alone: the server dropped one of our messages (the call slows
 * down and renegotiates every peer; the socket stays open).
 */
export type RetriedErrorCode =
  | "NETWORK_ERROR"
  | "CONNECTION_LOST"
  | "SERVER_BUSY"
  | "SLOW_CONSUMER"
  | "RATE_LIMITED"
  | "TOO_MANY_CONNECTIONS";

/** Errors the server reports about one message; the call goes on. */
export type MessageErrorCode = "INVALID_MESSAGE" | "UNSUPPORTED_TYPE" | "TARGET_NOT_FOUND";

/** Errors of this module itself. */
export type ClientErrorCode =
  | "ABORTED"
  | "NEGOTIATION_FAILED"
  /** A remote description or candidate was refused; the message may quote what the other side sent. */
  | "SIGNALING_FAILED"
  /** A remote offer with more media sections than a call uses, or a data channel: ignored. */
  | "OFFER_REFUSED"
  /** A frame of ours over maxMessageSize: not sent, that peer connection closed. */
  | "MESSAGE_TOO_LARGE"
  | "REPLACE_TRACK_FAILED"
  | `HTTP_${number}`;

export type ErrorCode = FinalErrorCode | RetriedErrorCode | MessageErrorCode | ClientErrorCode;

export class SignalingError extends Error {
  constructor(code: ErrorCode, message?: string, options?: ErrorOptions);
  readonly name: "SignalingError";
  /** The error code; `message` starts with it. */
  readonly code: ErrorCode;
}

export interface Participant {
  user_id: string;
  username: string;
}

export interface RoomStatePayload {
  /** Everyone in the room, you included. */
  participants: Participant[];
  self: Participant;
  max_participants: number;
  reconnect_grace: number;
  /** The server kept your slot (a reconnect within the grace, or a takeover). */
  resumed: boolean;
  /** With resumed: no message to you was lost meanwhile. */
  recovered?: boolean;
}

export type PeerState = RTCPeerConnectionState;

/** Event name -> listener arguments. */
export interface CallEvents {
  status: [status: CallStatus, detail?: SignalingError | RoomStatePayload];
  roomstate: [participants: Participant[], payload: RoomStatePayload];
  participantjoined: [participant: Participant];
  participantleft: [participant: Participant, reason: "left" | "timeout" | "kicked" | "node_lost"];
  localstream: [stream: MediaStream];
  remotestream: [userId: string, stream: MediaStream];
  remotestreamremoved: [userId: string, stream: MediaStream];
  connectionstatechange: [userId: string, state: PeerState];
  error: [message: string, code: ErrorCode, error: unknown];
  /** A server_message from the app's backend (the room service API): its payload. */
  servermessage: [payload: Record<string, unknown>];
}

export type CallEventName = keyof CallEvents;

export interface WebRTCCallOptions {
  /** Where the signaling sub-app is mounted (default "/webrtc"). */
  basePath?: string;
  /** Ceiling of the reconnection backoff, ms (default 5000). */
  maxBackoffMs?: number;
  /** Attempts before connect() gives up, when it never joined (default 3). */
  connectAttempts?: number;
  /** Ping after this much silence, ms (default 5000). */
  pingIntervalMs?: number;
  /** Give the socket up after this much silence, ms (default 12000). */
  staleAfterMs?: number;
  /** The server's --max-message-size, bytes (default 65536): a larger frame is never sent. */
  maxMessageSize?: number;
  /** Signaling messages per second (default 40; the server's --rate-limit defaults to 50). */
  sendRate?: number;
  /** Messages sent at once before pacing starts (default 100; the server's --rate-burst defaults to 200). */
  sendBurst?: number;
  /** Roll an unanswered offer back and offer again after this long, ms (default 10000; doubles per retry, up to 8x). */
  offerTimeoutMs?: number;
}

export type TokenSource = string | (() => string | Promise<string>);

export class WebRTCCall {
  constructor(serverUrl: string, token: TokenSource, roomId: string, options?: WebRTCCallOptions);

  readonly status: CallStatus;
  readonly roomId: string;
  readonly selfId: string | null;
  readonly localStream: MediaStream | null;
  /** A copy of the other participants, by user id. */
  readonly participants: Map<string, Participant>;

  getPeerConnection(userId: string): RTCPeerConnection | null;
  getRemoteStream(userId: string): MediaStream | null;

  /** Add a listener; returns a function that removes it. */
  on<E extends CallEventName>(type: E, listener: (...args: CallEvents[E]) => void): () => void;
  off<E extends CallEventName>(type: E, listener: (...args: CallEvents[E]) => void): void;

  /**
   * Capture camera and microphone; the call owns (and stops) these tracks. Rejects with
   * ABORTED (the camera stopped) when disconnect() or a fatal error comes while it opens.
   */
  initLocalStream(constraints?: MediaStreamConstraints): Promise<MediaStream>;
  /** Send a stream you own; the call never stops it. */
  setLocalStream(stream: MediaStream): Promise<void>;
  /** Send another track of the same kind without renegotiating (device switch, screen share). */
  replaceTrack(track: MediaStreamTrack): Promise<void>;
  setMicrophoneEnabled(enabled: boolean): boolean;
  setCameraEnabled(enabled: boolean): boolean;
  toggleAudio(): boolean;
  toggleVideo(): boolean;

  /** Resolves with the first room_state; rejects with a SignalingError. */
  connect(): Promise<RoomStatePayload>;
  /** The raw /webrtc/config response. */
  getConfig(): Promise<Record<string, unknown>>;
  /** Leave for good; a pending connect() rejects with ABORTED. */
  disconnect(): Promise<void>;

  // Single callbacks, as in the integration guide (on() adds more).
  onStatus: ((...args: CallEvents["status"]) => void) | null;
  onRoomState: ((...args: CallEvents["roomstate"]) => void) | null;
  onParticipantJoined: ((...args: CallEvents["participantjoined"]) => void) | null;
  onParticipantLeft: ((...args: CallEvents["participantleft"]) => void) | null;
  onLocalStream: ((...args: CallEvents["localstream"]) => void) | null;
  onRemoteStream: ((...args: CallEvents["remotestream"]) => void) | null;
  onRemoteStreamRemoved: ((...args: CallEvents["remotestreamremoved"]) => void) | null;
  onConnectionStateChange: ((...args: CallEvents["connectionstatechange"]) => void) | null;
  onError: ((...args: CallEvents["error"]) => void) | null;
  onServerMessage: ((...args: CallEvents["servermessage"]) => void) | null;
}

/** The server's /webrtc/config response as RTCPeerConnection reads it (camelCase). */
export function rtcConfiguration(config: Record<string, unknown>): RTCConfiguration;

export default WebRTCCall;
