"""Scenarios for the unmodified centrifuge-python SDK against /connection/websocket.

Run by tests/tests/centrifugo_sdk.rs with the venv's python:

    .venv/bin/python scenarios.py URL SECRET basic|refresh|presence|pings

It talks to the Rust test as the Node scenarios do (lib.mjs): a line `@@VERB ARGS...`
asks it to act (cut or restore the proxy, publish natively), and it answers `@@ok JSON`
or `@@err MESSAGE` on stdin. Each step prints `ok   NAME (ms)`; the last line is
`centrifugo: N passed, 0 failed`. Everything connects to 127.0.0.1 only.
"""

import asyncio
import base64
import collections
import hashlib
import hmac
import json
import logging
import sys
import threading
import time
import traceback

from centrifuge import (
    Client,
    ClientEventHandler,
    ClientState,
    SubscriptionEventHandler,
    SubscriptionState,
)

STEP_TIMEOUT = 20.0

# The last frames and SDK decisions (websockets logs every frame at DEBUG), printed when a
# step fails.
FRAMES: "collections.deque[str]" = collections.deque(maxlen=40)


class _Ring(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        FRAMES.append(f"{record.name}: {text[:400]}")


for _name in ("websockets.client", "centrifuge"):
    _logger = logging.getLogger(_name)
    _logger.setLevel(logging.DEBUG)
    _logger.addHandler(_Ring())
    _logger.propagate = False


# === tokens ===


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256(secret: str, claims: dict) -> str:
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(sig)}"


def token(secret: str, sub: str, ttl: int = 3600) -> str:
    return hs256(secret, {"sub": sub, "exp": int(time.time()) + ttl})


# === the conversation with the Rust test ===

_answers: "asyncio.Queue[str]"


def _read_stdin(loop: asyncio.AbstractEventLoop) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(_answers.put_nowait, line.rstrip("\n"))


async def ask(verb: str, *args) -> object:
    print("@@" + " ".join([verb, *map(str, args)]), flush=True)
    line = await asyncio.wait_for(_answers.get(), 60)
    if line.startswith("@@ok"):
        rest = line[4:].strip()
        return json.loads(rest) if rest else None
    raise AssertionError(f"the test could not {verb}: {line}")


# === waiting and checking ===


async def until(what: str, check, timeout: float = STEP_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.025)


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def exactly_once_in_order(pubs, want, what):
    got = [p["i"] for p in pubs]
    expect(got == list(want), f"{what}: got {got[:20]}... ({len(got)}), want {list(want)[:20]}... ({len(want)})")
    offsets = [p["offset"] for p in pubs]
    expect(all(b > a for a, b in zip(offsets, offsets[1:])), f"{what}: offsets not increasing: {offsets}")


# === clients ===


class ClientLog(ClientEventHandler):
    def __init__(self):
        self.connecting = 0
        self.connected = []
        self.disconnected = []
        self.errors = []

    async def on_connecting(self, ctx):
        self.connecting += 1

    async def on_connected(self, ctx):
        self.connected.append(ctx)

    async def on_disconnected(self, ctx):
        self.disconnected.append((ctx.code, ctx.reason))

    async def on_error(self, ctx):
        self.errors.append((ctx.code, repr(ctx.error)[:300]))


class SubLog(SubscriptionEventHandler):
    def __init__(self):
        self.pubs = []
        self.subscribed = []
        self.unsubscribed = []
        self.errors = []
        self.joins = []
        self.leaves = []

    async def on_subscribed(self, ctx):
        self.subscribed.append(ctx)

    async def on_unsubscribed(self, ctx):
        self.unsubscribed.append((ctx.code, ctx.reason))

    async def on_publication(self, ctx):
        data = ctx.pub.data if isinstance(ctx.pub.data, dict) else {}
        self.pubs.append({"i": data.get("i"), "offset": ctx.pub.offset})

    async def on_join(self, ctx):
        self.joins.append(ctx.info)

    async def on_leave(self, ctx):
        self.leaves.append(ctx.info)

    async def on_error(self, ctx):
        self.errors.append((ctx.code, repr(ctx.error)))


DESCRIBE = {}


def client(name, url, **kw):
    log = ClientLog()
    c = Client(url, events=log, proxy=None, min_reconnect_delay=0.1, max_reconnect_delay=1.0, **kw)
    c.log = log
    DESCRIBE[name] = lambda: {
        "state": c.state.value,
        "connecting": log.connecting,
        "disconnected": log.disconnected[-3:],
        "errors": log.errors[-5:],
    }
    return c


def subscription(name, c, channel, **kw):
    log = SubLog()
    sub = c.new_subscription(channel, events=log, **kw)
    sub.log = log
    DESCRIBE[name] = lambda: {
        "state": sub.state.value,
        "pubs": len(log.pubs),
        "last": log.pubs[-3:],
        "subscribed": [repr(s) for s in log.subscribed[-3:]],
        "unsubscribed": log.unsubscribed,
        "errors": log.errors[-5:],
    }
    return sub


async def subscribed(sub, n=1):
    await until(
        f"{sub.channel} subscribed (event #{n})",
        lambda: sub.state == SubscriptionState.SUBSCRIBED and len(sub.log.subscribed) >= n,
    )


# === scenarios ===


async def basic(step, url, secret):
    channel = "room:py-basic"
    c = client("alice", url, token=token(secret, "alice"))
    sub = subscription("sub", c, channel, recoverable=True)
    state = {}

    async def connect():
        await c.connect()
        await until("connected", lambda: c.state == ClientState.CONNECTED)
        expect(c.log.connected[0].client, f"no client id: {c.log.connected[0]}")

    await step("connect with a JWT", connect)

    async def sub_recoverable():
        await sub.subscribe()
        await subscribed(sub)
        ctx = sub.log.subscribed[0]
        expect(ctx.recoverable and ctx.stream_position is not None, f"subscribed: {ctx}")
        state["epoch"] = ctx.stream_position.epoch

    await step("subscribe with recovery", sub_recoverable)

    async def publish():
        for i in range(1, 4):
            await sub.publish({"i": i})
        await until("3 publications", lambda: len(sub.log.pubs) >= 3)
        exactly_once_in_order(sub.log.pubs, range(1, 4), "live")

    await step("publish through the subscription, receive", publish)

    async def history():
        h = await sub.history(limit=10)
        expect([p.data["i"] for p in h.publications] == [1, 2, 3], f"history {h}")
        expect(h.epoch == state["epoch"], f"history epoch {h.epoch}, want {state['epoch']}")
        z = await sub.history(limit=0)
        expect(z.publications == [] and z.offset == sub.log.pubs[-1]["offset"] and z.epoch == state["epoch"],
               f"limit 0: {z}")

    await step("history forward, position only", history)

    async def cut():
        before = c.log.connecting
        await ask("cut")
        await until("the client to notice the cut", lambda: c.log.connecting > before)
        await ask("publish", channel, 4, 10)
        await ask("restore")
        await subscribed(sub, 2)
        ctx = sub.log.subscribed[1]
        expect(ctx.was_recovering and ctx.recovered, f"resubscribe after the cut: {ctx}")
        await until("13 publications", lambda: len(sub.log.pubs) >= 13)
        exactly_once_in_order(sub.log.pubs, range(1, 14), "after the cut")

    await step("network cut: missed publications recovered once, in order", cut)

    async def alive():
        # The SDK drops a connection without a ping within ping + max_server_ping_delay:
        # stay connected across more than one server ping interval with traffic.
        connecting = c.log.connecting
        for i in range(14, 17):
            await sub.publish({"i": i})
        await until("16 publications", lambda: len(sub.log.pubs) >= 16)
        exactly_once_in_order(sub.log.pubs, range(1, 17), "live after recovery")
        expect(c.log.connecting == connecting, "reconnected")

    await step("live after recovery", alive)

    async def reverse():
        r = await sub.history(limit=10, reverse=True)
        got = [p.data["i"] for p in r.publications]
        expect(got == list(range(16, 6, -1)), f"reverse history: {got}")

    await step("history(reverse=True): newest first", reverse)
    await c.disconnect()


async def refresh(step, url, secret):
    ttl, refreshes = 3, 3
    minted = [0]

    async def get_token():
        minted[0] += 1
        return token(secret, "alice", ttl)

    c = client("alice", url, token=token(secret, "alice", ttl), get_token=get_token)
    sub = subscription("sub", c, "room:py-refresh", recoverable=True)

    async def connect():
        await c.connect()
        await sub.subscribe()
        await subscribed(sub)

    await step(f"connect with a token that expires in {ttl} s", connect)

    async def expiries():
        await until(f"{refreshes} refreshes", lambda: minted[0] >= refreshes, (ttl + 3) * (refreshes + 1))
        expect(c.state == ClientState.CONNECTED, f"state {c.state}")
        expect(c.log.connecting == 1, f"reconnected: {c.log.connecting} connecting events, {c.log.disconnected}")
        expect(len(sub.log.subscribed) == 1, f"resubscribed {len(sub.log.subscribed) - 1} times")
        await sub.publish({"i": 1})
        await until("publication 1", lambda: len(sub.log.pubs) >= 1)

    await step(f"{refreshes} expiries: get_token called, the connection stays up", expiries)
    await c.disconnect()


async def presence(step, url, secret):
    channel = "room:py-presence"
    a = client("alice", url, token=token(secret, "alice"))
    b = client("bob", url, token=token(secret, "bob"))
    sa = subscription("subA", a, channel, join_leave=True)
    sb = subscription("subB", b, channel, join_leave=True)
    ids = {}

    async def both():
        await a.connect()
        await sa.subscribe()
        await subscribed(sa)
        await b.connect()
        await sb.subscribe()
        await subscribed(sb)
        ids["a"] = a.log.connected[0].client
        ids["b"] = b.log.connected[0].client
        join = await until("bob's join at alice", lambda: next((i for i in sa.log.joins if i.user == "bob"), None))
        expect(join.client == ids["b"], f"join {join}, bob is {ids['b']}")

    await step("alice and bob subscribe: alice gets bob's join", both)

    async def listed():
        async def two():
            r = await sa.presence()
            return r if len(r.clients) >= 2 else None

        r = await until("presence of 2", two)
        expect(sorted((v.user, v.client) for v in r.clients.values()) == sorted([("alice", ids["a"]), ("bob", ids["b"])]),
               f"presence {r}")
        s = await sa.presence_stats()
        expect((s.num_clients, s.num_users) == (2, 2), f"presence stats {s}")

    await step("presence lists both, stats count 2 and 2", listed)

    async def leave():
        await sb.unsubscribe()
        info = await until("bob's leave at alice", lambda: next((i for i in sa.log.leaves if i.user == "bob"), None))
        expect(info.client == ids["b"], f"leave {info}")

    await step("bob unsubscribes: alice gets bob's leave", leave)
    await a.disconnect()
    await b.disconnect()


async def pings(step, url, secret):
    # The router pings every 2 s (sessions.ping_interval); the SDK allows 1.5 s past that
    # and resets its timer on `{}` only, not on publications.
    seconds = 8
    c = client("alice", url, token=token(secret, "alice"), max_server_ping_delay=1.5)
    sub = subscription("sub", c, "room:py-pings", recoverable=True)

    async def connect():
        await c.connect()
        await sub.subscribe()
        await subscribed(sub)
        expect(c._ping_interval == 2, f"ping interval {c._ping_interval}")

    await step("connect: the reply advertises a 2 s ping", connect)

    async def flow():
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            i += 1
            await sub.publish({"i": i})
            await asyncio.sleep(0.2)
        await until(f"{i} publications", lambda: len(sub.log.pubs) >= i)
        exactly_once_in_order(sub.log.pubs, range(1, i + 1), "publications")
        expect(c.log.connecting == 1, f"reconnected: {c.log.connecting} connecting events")

    await step(f"publish every 200 ms for {seconds} s: no reconnect", flow)
    await c.disconnect()


async def main():
    global _answers
    url, secret, mode = sys.argv[1:4]
    _answers = asyncio.Queue()
    threading.Thread(target=_read_stdin, args=(asyncio.get_running_loop(),), daemon=True).start()
    passed = [0]
    current = ["(setup)"]

    async def step(name, fn):
        current[0] = name
        started = time.monotonic()
        await fn()
        passed[0] += 1
        print(f"ok   {name} ({int((time.monotonic() - started) * 1000)} ms)", flush=True)

    scenario = {"basic": basic, "refresh": refresh, "presence": presence, "pings": pings}[mode]
    try:
        await asyncio.wait_for(scenario(step, url, secret), 140)
    except BaseException as e:  # noqa: BLE001 - everything is a failure of the step
        print(f"FAIL {current[0]}: {''.join(traceback.format_exception(e))}", flush=True)
        for name, fn in DESCRIBE.items():
            try:
                print(f"  {name}: {fn()}", flush=True)
            except Exception as d:  # noqa: BLE001
                print(f"  {name}: (cannot describe: {d!r})", flush=True)
        print("  last frames and SDK decisions:", flush=True)
        for line in FRAMES:
            print(f"    {line}", flush=True)
        print(f"centrifugo: {passed[0]} passed, 1 failed", flush=True)
        return 1
    print(f"centrifugo: {passed[0]} passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
