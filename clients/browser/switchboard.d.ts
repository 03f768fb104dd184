// TypeScript declarations of Switchboard's browser client (switchboard.js, served by Switchboard at
// /_switchboard/client/v1/switchboard.js). The wire format is docs/protocol.md.
//
//   import { connect } from 'https://switchboard.example.org/_switchboard/client/v1/switchboard.js';
//   const client = await connect({ homeserver: 'https://matrix.example.org', accessToken });
//   client.addEventListener('message', (e) => console.log(e.detail.address, e.detail.bytes));
//   await client.watch(peer); await client.open(peer); await client.send(peer, 'hello');
//
// Guarantees (the same as the Rust client's): every message reaches the peer's application exactly
// once and in the order sent, over the data channel while it is alive and through Matrix to-device
// messages otherwise (and across the switch between them). Addresses are compared
// case-insensitively: events name a peer in the form the application first used, or as
// Switchboard checksummed it.

/** Options of connect(). Times in milliseconds. */
export interface ConnectOptions {
  /** The homeserver's client-server API base URL. */
  homeserver: string;
  /** The Matrix access token of this device: sent to the homeserver and to Switchboard only (never in a URL). */
  accessToken: string;
  /** Switchboard's client base URL; default: the homeserver's well-known `org.switchboard.client` (none: Matrix only). */
  switchboard?: string;
  /** Every data channel through TURN (no local address revealed). Default false. */
  relayOnly?: boolean;
  /** An ordered data channel. Default false (the delivery layer orders messages itself). */
  ordered?: boolean;
  /** /sync long-poll timeout. Default 30,000. */
  syncTimeout?: number;
  /** Peers with state at most. Default 10,000. */
  maxPeers?: number;
  /** Sends waiting for room in one peer's replay buffer, at most (more: SwitchboardError 'busy'). Default 1,024. */
  maxWaitingSends?: number;
  /**
   * Bytes held for undelivered incoming messages (out of order, being reassembled) across all peers, at most.
   * Past it the peers holding the most let go of what they hold undelivered and take it again from the senders'
   * resends. Default 64 MiB; below `limits.maxMessageBytes + limits.reorderBufferBytes`, connect() throws
   * SwitchboardError 'config'.
   */
  maxHeldBytes?: number;
  /** Wait before calling again after a channel died: 1,000 doubling to 30,000. */
  upgradeBackoff?: Backoff;
  /** Wait before reconnecting to Switchboard: 1,000 doubling to 30,000 (at once after close 1012). */
  reconnectBackoff?: Backoff;
  /** Wait before resending a failed to-device send (same txn id): 1,000 doubling to 30,000. */
  matrixBackoff?: Backoff;
  /** Bounds of the delivery layer (see DEFAULT_LIMITS). */
  limits?: Partial<Limits>;
}

export interface Backoff {
  initial: number;
  max: number;
}

/** docs/protocol.md, "Limits and defaults" (times in ms). */
export interface Limits {
  replayBufferBytes: number;
  reorderBufferBytes: number;
  maxMessageBytes: number;
  streamsPerPeer: number;
  batchLines: number;
  batchBodyBytes: number;
  ackDelay: number;
  matrixAckDelay: number;
  ackAfterFragments: bigint;
  resendTimeout: number;
  maxResendTimeout: number;
  pingInterval: number;
  pingTimeout: number;
  deadAfter: number;
}
export const DEFAULT_LIMITS: Readonly<Limits>;

export type ChannelPath = 'relay' | 'direct';
export type DcState = 'closed' | 'handshake' | 'alive' | 'stalled' | 'dead';

/** A watched address's state, as Switchboard pushes it (GET …/v1/peers/{address}). */
export interface PresenceDetail {
  address: string;
  reachable: boolean;
  users: Array<{
    user_id: string;
    presence: string;
    last_active_ago: number | null;
    capabilities: Record<string, boolean | string> | null;
    verified: boolean;
  }>;
}

export interface ClientEventMap {
  /** A watched address's state (on watch, then at every change). */
  presence: CustomEvent<PresenceDetail>;
  /** A data channel to `address` is open and alive (the peer's HELLO came, our first PING was answered). */
  channelup: CustomEvent<{ address: string; path: ChannelPath }>;
  /** The data channel is gone; sends go through Matrix, what it carried unacknowledged is resent there first. */
  channeldown: CustomEvent<{ address: string; reason: string }>;
  /** A message from `address`, exactly once and in the order sent. */
  message: CustomEvent<{ address: string; bytes: Uint8Array }>;
  /** The signalling connection to Switchboard came up or went down. */
  switchboard: CustomEvent<{ connected: boolean }>;
  /** The /sync loop ended for good (the token was refused): nothing more arrives through Matrix. */
  syncstopped: CustomEvent<{ reason: string }>;
}

export interface PeerStats {
  dcState: DcState;
  path: ChannelPath | null;
  /** The last PING/PONG round trip on the data channel. */
  rttMs: number | null;
  channelsUp: number;
  /** Calls started by this side. */
  calls: number;
  /** DATA frames written to data channels. */
  dcDataFrames: number;
  /** Message lines (fragments) in to-device batches the homeserver accepted. */
  matrixLines: number;
  replayBufferedBytes: number;
}

export type ErrorCode = 'matrix' | 'invalid_address' | 'too_large' | 'busy' | 'stopped' | 'switchboard' | 'config';
export class SwitchboardError extends Error {
  readonly code: ErrorCode;
  /** For 'matrix': the homeserver's HTTP status and errcode, when it answered. */
  status?: number;
  errcode?: string;
}

/** A running client: an EventTarget of the events of ClientEventMap. */
export class SwitchboardClient extends EventTarget {
  /** This client's Matrix user. */
  readonly userId: string;
  readonly deviceId: string | null;
  /** The address Switchboard verified for this user (null before `ready`, or unverified). */
  readonly address: string | null;
  /** Presence of `address` comes as `presence` events while Switchboard is connected (watched again after reconnects). */
  watch(address: string): Promise<void>;
  /** This side calls `address` (now, or once Switchboard is connected) and calls again whenever the channel dies, until close(). */
  open(address: string): Promise<void>;
  /** Resolves once the message is in the replay buffer (waits while it is full: backpressure). Strings go as UTF-8. */
  send(address: string, data: Uint8Array | ArrayBuffer | string): Promise<void>;
  /** Hangs up the channel to `address` and stops calling it; messages still flow through Matrix. */
  close(address: string): Promise<void>;
  /** Drops the channel as a failure would (no hangup): for tests and checking the fallback. */
  resetChannel(address: string): Promise<void>;
  stats(address: string): PeerStats | null;
  /** Hangs up, closes the WebSocket, ends /sync; waiting sends are rejected ('stopped'). */
  shutdown(): Promise<void>;
  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (this: SwitchboardClient, event: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (this: SwitchboardClient, event: ClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

/** Checks the token (whoami), starts /sync and connects to Switchboard in the background. */
export function connect(options: ConnectOptions): Promise<SwitchboardClient>;
/** The homeserver's well-known `org.switchboard.client.base_url`, null when absent; throws when malformed. */
export function discoverSwitchboard(homeserver: string, fetchImpl?: typeof fetch): Promise<string | null>;

// ----- The delivery layer (sans-IO; times are ms on any monotonic clock) -----

export const FRAGMENT_SIZE: number;
export const BATCH_LIMIT: number;
export const CHANNEL_LABEL: 'switchboard';
export const EVENT_MESSAGE: 'm.room.message';
export const EVENT_ACK: 'org.switchboard.ack';
export const STREAM_FIELD: 'org.switchboard.stream';

export class ProtocolError extends Error {}

export type Frame =
  | { type: 'data'; more: boolean; seq: bigint; payload: Uint8Array }
  | { type: 'ack'; seq: bigint }
  | { type: 'ping' | 'pong'; nonce: bigint }
  | { type: 'hello'; stream: bigint; firstUnacked: bigint; peerStream: bigint; delivered: bigint };

export interface Ack {
  stream: bigint;
  seq: bigint;
}
export interface Line {
  more: boolean;
  payload: Uint8Array;
}
export interface Batch {
  stream: bigint;
  seq: bigint;
  base: bigint;
  lines: Line[];
  ack?: Ack | null;
}
/** A to-device send the delivery layer wants made (retry with the same txnId). */
export interface ToDevice {
  eventType: 'm.room.message' | 'org.switchboard.ack';
  txnId: string;
  content: Record<string, unknown>;
  lines: { first: bigint; count: number } | null;
  ack: Ack | null;
}

export function streamHex(id: bigint): string;
export function parseStreamHex(text: string): bigint;
export function randomStreamId(): bigint;
export function encodeFrame(frame: Frame): Uint8Array;
/** null for an unknown type; throws ProtocolError when malformed. */
export function decodeFrame(bytes: Uint8Array): Frame | null;
export function joinFrames(frames: Uint8Array[]): Uint8Array;
export function splitFrames(bytes: Uint8Array): Uint8Array[];
export function lineText(payload: Uint8Array): { text: string; b64: boolean; size: number };
export function encodeBatch(batch: Batch): Record<string, unknown>;
export function decodeContent(content: unknown): null | { plain: Uint8Array[] } | { batch: Batch };
export function decodeAck(content: unknown): Ack;

/** One peer's delivery state: the same rules as the Rust client's `reliable::Peer`. */
export class ReliablePeer {
  constructor(stream: bigint, limits?: Partial<Limits>);
  readonly stream: bigint;
  readonly limits: Limits;
  /** false: the replay buffer is full (push again after acks); throws RangeError for a message larger than the buffer. */
  push(now: number, message: Uint8Array): boolean;
  hasRoom(len: number): boolean;
  /** Bytes held for undelivered incoming messages: out of order, before the HELLO, being reassembled. */
  retainedBytes(): number;
  /** Lets go of all incoming fragments not yet delivered (nothing of it was acked: the sender resends it). */
  shedIncoming(): void;
  rtt(): number | null;
  onChannelOpen(now: number): void;
  onChannelLost(): void;
  dcState(now: number): DcState;
  /** The messages now deliverable, in order; throws ProtocolError for a malformed message. */
  receiveDc(now: number, message: Uint8Array): Uint8Array[];
  receiveMatrix(now: number, content: unknown): Uint8Array[];
  receiveMatrixAck(now: number, content: unknown): void;
  /** Frames to write on the channel now (join them with joinFrames up to BATCH_LIMIT). */
  pollDc(now: number, maxBytes?: number): Uint8Array[];
  pollMatrix(now: number): ToDevice | null;
  onHomeserverAccepted(send: ToDevice): void;
  onMatrixFailed(now: number, send: ToDevice): void;
  pollTimeout(now: number): number | null;
  handleTimeout(now: number): void;
}
