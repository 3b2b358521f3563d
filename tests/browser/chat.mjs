// Drives the chat page in headless Chromium as two users (two browser contexts):
//   1. alice and bob sign in with dev tokens and land in room:lobby;
//   2. bob sees alice's message, `from` alice;
//   3. alice's connection drops; bob sends three messages; after alice reconnects she has
//      each exactly once, in order (recovery);
//   4. alice opens a dialog with bob; bob's page opens it from his inbox and shows the message;
//   5. the cluster view renders /api/v1/cluster.
// Usage: node chat.mjs http://127.0.0.1:PORT   (CHROMIUM=/path overrides /usr/bin/chromium)
// Prints one line per step and "browser: N passed, 0 failed"; exits non-zero on failure.
import { chromium } from 'playwright-core';

const base = process.argv[2];
if (!base) {
  console.error('usage: node chat.mjs BASE_URL');
  process.exit(2);
}
const STEP_TIMEOUT = 20_000;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update'],
});
let passed = 0;

async function step(name, fn) {
  const started = Date.now();
  await fn();
  passed++;
  console.log(`ok   ${name} (${Date.now() - started} ms)`);
}

async function signIn(user) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.on('pageerror', (e) => console.log(`[${user} page error] ${e}`));
  await page.goto(base + '/');
  await page.fill('#user', user);
  await page.click('#login-dev');
  await page.waitForSelector('#status[data-state="connected"]');
  await page.waitForFunction(() => {
    const ch = window.chatDebug.state.channels.get('room:lobby');
    return ch && ch.subscribed;
  });
  return page;
}

const texts = (page) => page.$$eval('#messages li[data-offset]', (lis) => lis.map((li) => ({
  offset: Number(li.dataset.offset), from: li.dataset.from, text: li.querySelector('.text').textContent,
})));

async function send(page, text) {
  await page.fill('#text', text);
  await page.click('#send');
}

try {
  const tag = Math.random().toString(36).slice(2, 8);
  let alice, bob;
  await step('alice and bob sign in and join room:lobby', async () => {
    alice = await signIn('alice');
    bob = await signIn('bob');
  });

  await step('bob sees the message alice sends, from alice', async () => {
    await send(alice, `hello from alice ${tag}`);
    await bob.waitForSelector(`#messages li[data-from="alice"] >> text=hello from alice ${tag}`);
  });

  await step('a reconnect neither loses nor repeats messages', async () => {
    await alice.evaluate(() => window.chatDebug.drop());
    await alice.waitForSelector('#status[data-state="reconnecting"]');
    for (let i = 1; i <= 3; i++) await send(bob, `while you were away ${i} ${tag}`);
    await bob.waitForSelector(`#messages li >> text=while you were away 3 ${tag}`);
    await alice.evaluate(() => window.chatDebug.resume());
    await alice.waitForSelector('#status[data-state="connected"]');
    await alice.waitForSelector(`#messages li >> text=while you were away 3 ${tag}`);
    const seen = await texts(alice);
    const away = seen.filter((m) => m.text.startsWith('while you were away') && m.text.endsWith(tag));
    const want = [1, 2, 3].map((i) => `while you were away ${i} ${tag}`);
    if (JSON.stringify(away.map((m) => m.text)) !== JSON.stringify(want)) {
      throw new Error(`after the reconnect alice has ${JSON.stringify(away)}`);
    }
    const offs = seen.map((m) => m.offset);
    if (new Set(offs).size !== offs.length) throw new Error(`duplicate offsets: ${offs}`);
    for (let i = 1; i < offs.length; i++) {
      if (offs[i] !== offs[i - 1] + 1) throw new Error(`gap in offsets: ${offs}`);
    }
    const recovered = await alice.evaluate(() => window.chatDebug.state.channels.get('room:lobby').offset);
    if (recovered !== offs[offs.length - 1]) throw new Error(`recovery position ${recovered} vs ${offs}`);
  });

  await step('a direct message opens the dialog on the other side', async () => {
    await alice.fill('#dm-input', 'bob');
    await alice.click('#dm-open');
    await alice.waitForFunction(() => window.chatDebug.state.channels.get('dialog:alice:bob')?.subscribed);
    await send(alice, `psst ${tag}`);
    await bob.waitForSelector('#dms li[data-channel="dialog:alice:bob"]');
    await bob.click('#dms li[data-channel="dialog:alice:bob"]');
    await bob.waitForSelector(`#messages li[data-from="alice"] >> text=psst ${tag}`);
    await send(bob, `hi alice ${tag}`);
    await alice.waitForSelector(`#messages li[data-from="bob"] >> text=hi alice ${tag}`);
  });

  await step('the cluster view shows /api/v1/cluster', async () => {
    await alice.waitForSelector('#cluster table th >> text=leader');
  });

  console.log(`browser: ${passed} passed, 0 failed`);
  await browser.close();
} catch (e) {
  console.log(`FAIL after ${passed} steps: ${e.stack || e}`);
  console.log(`browser: ${passed} passed, 1 failed`);
  await browser.close();
  process.exit(1);
}
