// The wire types of Switchyard client protocol v1 (docs/protocol.md).
//
// It owns the TypeScript shapes of replies and pushes as the client reads them. It must
// never hold behaviour, and its field names must never drift from docs/protocol.md: they are a
// contract. Unknown fields are allowed by the protocol and simply not typed here.

/** Where a channel's stream stands: the last offset seen under an epoch. */
export interface Position {
  offset: number;
  epoch: string;
}

/** `from` of `subscribe`: live only, everything retained, after offset N, or recovery. */
export type From = 'latest' | 'earliest' | number | Position;

/** A channel message, as pushed (`{"push":"message",...}`) or listed by `history`. */
export interface Message {
  channel: string;
  offset: number;
  epoch: string;
  /** Milliseconds since the Unix epoch at which the owner accepted the message. */
  ts: number;
  key?: string;
  /** The publisher's user id when it was authenticated. */
  from?: string;
  data: unknown;
}

/** The `ok` of `connect`. */
export interface ConnectInfo {
  client: string;
  node: string;
  user?: string;
  version: string;
}

/** The `ok` of `subscribe`. */
export interface SubscribeReply {
  channel: string;
  epoch: string;
  offset: number;
  recovered?: boolean;
}

/** The `ok` of `publish`. */
export interface PublishResult {
  offset: number;
  epoch: string;
}

/**
 * The `ok` of `history`: the page's messages (oldest first, or newest first when asked
 * with `reverse`; none for `limit: 0`), the channel's epoch and its current top.
 */
export interface HistoryPage {
  epoch: string;
  offset: number;
  messages: Message[];
}

/** One client in a channel's presence. */
export interface PresenceEntry {
  client: string;
  user: string;
  conn_info?: unknown;
  chan_info?: unknown;
}

/** The `ok` of `presence_stats`. */
export interface PresenceStats {
  num_clients: number;
  num_users: number;
}

/** `{"push":"join"|"leave","channel":c,"info":{...}}`: a client joined or left a channel's presence. */
export interface PresencePush {
  push: 'join' | 'leave';
  channel: string;
  info: PresenceEntry;
}

/** `{"push":"unsubscribed",...}`: the server ended one subscription. */
export interface UnsubscribedPush {
  channel: string;
  code: number;
  reason: string;
}

/** Close codes from docs/protocol.md that the client acts on. */
export const CLOSE_UNAUTHORIZED = 4001;
export const CLOSE_SLOW_CONSUMER = 4008;
export const CLOSE_SHUTTING_DOWN = 4100;
