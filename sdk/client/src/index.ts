// The public surface of @switchyard/client.
//
// It owns what is exported, and nothing else: no code lives here. It must never export
// internals that users could come to depend on (the frame parser and the backoff
// function are exported for tests and advanced use, documented as such).

export { Switchyard } from './client.js';
export type { ClientEvents, ClientOptions, ClientState, HistoryOptions, PublishOptions } from './client.js';
export { Subscription } from './subscription.js';
export type { RecoveryFailed, Subscribed, SubscriptionEvents, SubscriptionOptions, SubscriptionState } from './subscription.js';
export { SwitchyardError, UnauthorizedError } from './errors.js';
export type {
  ConnectInfo,
  From,
  HistoryPage,
  Message,
  Position,
  PresenceEntry,
  PresencePush,
  PresenceStats,
  PublishResult,
  SubscribeReply,
} from './protocol.js';
export type { WebSocketConstructor, WebSocketLike } from './socket.js';
export { Emitter } from './events.js';
export type { Listener } from './events.js';
export { backoffDelay } from './backoff.js';
export { parseFrame } from './frames.js';
export { tokenExpiryMs } from './jwt.js';
