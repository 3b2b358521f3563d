// Real processes for the integration tests: switchyard nodes and an etcd server.
//
// It owns spawning them on 127.0.0.1 with temporary directories, reading the router's
// `switchyard listening on ADDR` line, free ports (bind port 0, read, release), HS256
// tokens made with node:crypto, and killing every process it started (`killAll`, called
// from each test file's `after`). It must never sleep a fixed time to wait for a
// condition (waits are polls with deadlines), never bind anything but 127.0.0.1, and never
// leave a child running.

import { spawn, spawnSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtemp, rm, writeFile, mkdir } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { existsSync } from 'node:fs';

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.SWITCHYARD_BIN ? resolve(process.env.SWITCHYARD_BIN) : resolve(here, '../../../target/debug/switchyard');
const ETCD = process.env.SWITCHYARD_ETCD_BIN || 'etcd';

const children = new Set();
const dirs = new Set();

/** Kills every process this harness started and removes its temporary directories. */
export async function killAll() {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
  await Promise.all([...children].map((c) => exited(c)));
  children.clear();
  await Promise.all([...dirs].map((d) => rm(d, { recursive: true, force: true })));
  dirs.clear();
}

function exited(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((r) => child.once('exit', r));
}

export async function tempDir(prefix = 'switchyard-sdk-') {
  const d = await mkdtemp(join(tmpdir(), prefix));
  dirs.add(d);
  return d;
}

/** A port that was free a moment ago on 127.0.0.1. */
export function freePort() {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.once('error', rej);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

/** Polls `check` every 25 ms until it returns a truthy value; fails naming `what` after `timeoutMs`. */
export async function waitFor(what, check, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  let lastErr;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      lastErr = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastErr ? `: ${lastErr}` : ''}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A router process. `start()` again after `stop()` reuses the config and data dir. */
export class Node {
  constructor({ dir, config = '', port = 0, dataDir }) {
    this.dir = dir;
    this.config = config;
    this.port = port;
    this.dataDir = dataDir ?? join(dir, 'data');
    this.child = undefined;
    this.addr = undefined;
    this.stderr = '';
  }

  static async start(opts = {}) {
    const dir = opts.dir ?? (await tempDir());
    const node = new Node({ ...opts, dir });
    await node.start();
    return node;
  }

  get url() {
    return `ws://${this.addr}/ws`;
  }

  get http() {
    return `http://${this.addr}`;
  }

  async start(port = this.port) {
    if (!existsSync(BIN)) throw new Error(`router binary ${BIN} not found: build it or set SWITCHYARD_BIN`);
    this.port = port;
    await mkdir(this.dataDir, { recursive: true });
    const configPath = join(this.dir, 'switchyard.toml');
    await writeFile(configPath, this.config);
    const args = ['serve', '--config', configPath, '--listen', `127.0.0.1:${port}`, '--data-dir', this.dataDir, '--plugins-dir', join(this.dir, 'plugins')];
    // cwd: the node's own directory, so that nothing lands in the checkout.
    const child = spawn(BIN, args, { cwd: this.dir, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1', RUST_LOG: process.env.RUST_LOG ?? 'warn' } });
    children.add(child);
    this.child = child;
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d) => {
      this.stderr = (this.stderr + d).slice(-20000);
    });
    let out = '';
    child.stdout.setEncoding('utf8');
    const addr = await new Promise((res, rej) => {
      const timer = setTimeout(() => rej(new Error(`router did not print its listening line; stderr:\n${this.stderr}`)), 30000);
      child.stdout.on('data', (d) => {
        out += d;
        const m = /switchyard listening on (\S+)/.exec(out);
        if (m) {
          clearTimeout(timer);
          res(m[1]);
        }
      });
      child.once('exit', (code, sig) => {
        clearTimeout(timer);
        rej(new Error(`router exited (${code ?? sig}) before listening; stderr:\n${this.stderr}`));
      });
    });
    this.addr = addr;
    return this;
  }

  /** Sends `signal` and waits for the exit; returns the exit code. */
  async stop(signal = 'SIGTERM', timeoutMs = 30000) {
    const child = this.child;
    if (!child) return undefined;
    this.child = undefined;
    child.kill(signal);
    await waitFor('router exit', () => child.exitCode !== null || child.signalCode !== null, timeoutMs);
    return child.exitCode ?? child.signalCode;
  }
}

/** An etcd server on free loopback ports with a temporary data dir. */
export async function startEtcd() {
  const dir = await tempDir('switchyard-sdk-etcd-');
  for (let attempt = 0; ; attempt++) {
    const client = `http://127.0.0.1:${await freePort()}`;
    const peer = `http://127.0.0.1:${await freePort()}`;
    const child = spawn(
      ETCD,
      ['--name', 'test', '--data-dir', join(dir, `data${attempt}`), '--listen-client-urls', client, '--advertise-client-urls', client, '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer, '--initial-cluster', `test=${peer}`],
      { stdio: ['ignore', 'ignore', 'ignore'] },
    );
    children.add(child);
    try {
      await waitFor('etcd health', async () => {
        if (child.exitCode !== null) throw new Error(`etcd exited with ${child.exitCode}`);
        const r = await fetch(`${client}/health`);
        return r.ok && (await r.json()).health === 'true';
      }, 15000);
      return { endpoint: client, child };
    } catch (e) {
      child.kill('SIGKILL');
      if (attempt >= 3) throw e;
    }
  }
}

/** Whether the etcd binary can be run here. */
export function haveEtcd() {
  return spawnSync(ETCD, ['--version'], { stdio: 'ignore' }).status === 0;
}

/** The HS256 secret of `jwtConfig`. */
export const SECRET = 'sdk-test-secret-0123456789';

/** A config in jwt mode where the `room` namespace is public. */
export const jwtConfig = `[auth]\nmode = "jwt"\nhs256_secret = "${SECRET}"\n\n[namespaces.room]\nrule = "public"\n`;

/** `{sub, exp: now + ttlSecs}` signed HS256 with `SECRET`. */
export function token(sub, ttlSecs) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + ttlSecs })}`;
  return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}
