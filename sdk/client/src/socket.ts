// Finding a WebSocket implementation, and the minimal interface the client uses.
//
// It owns the choice: the `WebSocket` option if given, else `globalThis.WebSocket`
// (browsers, Deno, Node >= 22), else the `ws` package loaded with a dynamic import (Node).
// It must never import `ws` statically: browsers get no dependency at all.

/** The part of the browser WebSocket API the client uses; `ws` and test fakes fit it. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  /** Present on Node's `ws`: lets the client see the server's pings. */
  on?(event: 'ping', listener: () => void): unknown;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** The readyState of an open socket (the same in every implementation). */
export const OPEN = 1;

/** Resolves the WebSocket class to use. */
export async function resolveWebSocket(given: WebSocketConstructor | undefined): Promise<WebSocketConstructor> {
  if (given) return given;
  const native = (globalThis as { WebSocket?: unknown }).WebSocket;
  if (typeof native === 'function') return native as WebSocketConstructor;
  // A computed specifier keeps bundlers from pulling `ws` into browser builds.
  const name = 'ws';
  const mod = (await import(/* webpackIgnore: true */ /* @vite-ignore */ name)) as { default?: unknown; WebSocket?: unknown };
  const ctor = mod.WebSocket ?? mod.default;
  if (typeof ctor !== 'function') throw new Error('no WebSocket implementation: install the `ws` package');
  return ctor as WebSocketConstructor;
}
