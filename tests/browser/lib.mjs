// Helpers shared by the browser tests (chat.mjs, cluster.mjs): launching Chromium, named
// steps with timings, polling with a deadline, and a TCP proxy that can cut a browser's
// network. Everything binds 127.0.0.1 only.
import net from 'node:net';
import { chromium } from 'playwright-core';

/** Per-wait deadline: a condition that takes longer fails the step. */
export const STEP_TIMEOUT = 20_000;

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update'],
  });
}

/** Runs named steps, printing one line each and the summary the Rust test checks. */
export function stepper() {
  let passed = 0;
  return {
    get passed() {
      return passed;
    },
    async step(name, fn) {
      const started = Date.now();
      await fn();
      passed++;
      console.log(`ok   ${name} (${Date.now() - started} ms)`);
    },
  };
}

/** Pages to describe when a step fails: name -> page. */
export const pages = new Map();

/** What each registered page shows and counts, for a failure report. */
export async function describePages() {
  const out = [];
  for (const [name, page] of pages) {
    if (page.isClosed()) continue;
    try {
      const d = await page.evaluate(() => ({
        status: document.getElementById('status')?.textContent,
        me: document.getElementById('me')?.textContent,
        notice: document.getElementById('notice')?.textContent,
        client: window.chatDebug?.state?.client?.state,
        stats: window.chatDebug?.stats,
        log: window.chatDebug?.log?.slice(-15),
      }));
      out.push(`  ${name}: ${JSON.stringify(d)}`);
    } catch (e) {
      out.push(`  ${name}: (cannot read: ${e.message})`);
    }
  }
  return out.join('\n');
}

/** Polls `check` (async, returns a truthy value when done) until it does or `timeoutMs` passes. */
export async function until(what, check, timeoutMs = STEP_TIMEOUT) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await check();
    if (last) return last;
    if (Date.now() >= deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * A TCP proxy on 127.0.0.1 in front of `target` ("host:port"). `cut()` destroys every
 * connection through it and refuses new ones until `restore()`: to the browser that is a
 * network failure (close 1006, failing fetches), not a clean close. `retarget()` points it
 * at a restarted router on another port, so the page's origin stays the same.
 */
export async function proxy(target) {
  const sockets = new Set();
  let down = false;
  const server = net.createServer((client) => {
    if (down) return client.destroy();
    const [host, port] = splitAddr(target);
    const upstream = net.connect({ host, port });
    sockets.add(client);
    sockets.add(upstream);
    const close = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    for (const s of [client, upstream]) {
      s.on('error', close);
      s.on('close', close);
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut() {
      down = true;
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    restore() {
      down = false;
    },
    retarget(next) {
      target = next;
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

function splitAddr(addr) {
  const i = addr.lastIndexOf(':');
  return [addr.slice(0, i), Number(addr.slice(i + 1))];
}

/**
 * Reads the cluster picture's canvas pixels in the page: the centre pixel of every
 * partition cell must be the legend colour of that partition's owner (so every cell has
 * an owner colour), and, where cells are large enough to see it, every under-replicated
 * cell carries its dark corner mark. Returns counts; `problems` lists the first few misses.
 */
export async function checkCells(page) {
  return page.evaluate(() => {
    const view = window.chatDebug.cluster;
    const v = view.data;
    const canvas = document.getElementById('cluster-map');
    const d = canvas.dataset;
    const cols = Number(d.cols), cell = Number(d.cell), gap = Number(d.gap);
    const pitch = cell + gap;
    const scale = canvas.width / parseFloat(canvas.style.width);
    const img = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
    const px = (x, y) => {
      const i = (Math.floor(y * scale) * canvas.width + Math.floor(x * scale)) * 4;
      return [img.data[i], img.data[i + 1], img.data[i + 2]];
    };
    const legend = new Map();
    for (const li of document.querySelectorAll('#cluster-legend li[data-node]')) {
      const rgb = getComputedStyle(li.querySelector('.swatch')).backgroundColor.match(/\d+/g).slice(0, 3).map(Number);
      legend.set(li.dataset.node, rgb);
    }
    const owners = v.owners || [];
    const replicas = v.replicas || [], isr = v.isr || [];
    const near = (a, b) => a.every((x, i) => Math.abs(x - b[i]) <= 3);
    const problems = [];
    let coloured = 0, unowned = 0, under = 0, marked = 0;
    for (let p = 0; p < owners.length; p++) {
      const x = (p % cols) * pitch, y = Math.floor(p / cols) * pitch;
      const want = legend.get(owners[p]);
      const got = px(x + cell / 2, y + cell / 2);
      if (!owners[p] || !want) {
        unowned++;
        if (problems.length < 5) problems.push(`partition ${p}: no owner (${owners[p]})`);
      } else if (near(got, want)) {
        coloured++;
      } else if (problems.length < 5) {
        problems.push(`partition ${p}: pixel ${got} is not ${owners[p]}'s ${want}`);
      }
      if ((isr[p]?.length ?? 0) < (replicas[p]?.length ?? 0)) {
        under++;
        const c = px(x + 0.5, y + 0.5);
        if (c[0] + c[1] + c[2] < 90) marked++;
      }
    }
    return {
      partitions: owners.length, coloured, unowned, under, marked, cell, cols,
      nodes: [...legend.keys()], leader: v.leader, epoch: v.epoch, mode: v.mode, problems,
    };
  });
}
