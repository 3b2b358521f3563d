// A scripted stand-in for the browser WebSocket, injected through the `WebSocket` option.
//
// It owns recording what the client sends and letting a test play the server: open,
// reply, push (several objects per frame as JSON lines), close. It must never use a
// timer of its own except to deliver a client-initiated close asynchronously, as
// browsers do.

export class FakeWebSocket {
  static sockets = [];

  static reset() {
    FakeWebSocket.sockets = [];
  }

  static last() {
    return FakeWebSocket.sockets[FakeWebSocket.sockets.length - 1];
  }

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = undefined;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeWebSocket.sockets.push(this);
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close(code = 1000, reason = '') {
    if (this.readyState >= 2) return;
    this.closedWith = { code, reason };
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code, reason }), 0);
  }

  // --- the test plays the server ---

  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  /** Sends one frame holding these objects as JSON lines. */
  frame(...objects) {
    this.onmessage?.({ data: objects.map((o) => JSON.stringify(o)).join('\n') });
  }

  /** The last command sent with this op. */
  lastSent(op) {
    return [...this.sent].reverse().find((c) => c.op === op);
  }

  reply(op, ok) {
    const cmd = this.lastSent(op);
    if (!cmd) throw new Error(`no ${op} was sent`);
    this.frame({ id: cmd.id, ok });
    return cmd;
  }

  serverClose(code = 1006, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

/** Polls `check` every 5 ms until it returns a truthy value; fails after `timeoutMs`. */
export async function waitFor(what, check, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
