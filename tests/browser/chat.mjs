// Drives the SDK-based chat page in headless Chromium as three users (browser contexts).
// alice's and bob's pages are served through TCP proxies (lib.mjs), so the test can cut
// alice's network and can move both to a restarted router without changing their origin.
//   1. alice (dev tokens of 10 s, so the SDK refreshes them every ~8.5 s) and bob sign in and
//      land in room:lobby;
//   2. bob sees alice's message, `from` alice;
//   3. carol signs in later and sees it in the history loaded on join;
//   4. alice's network is cut: bob sends three messages and alice one (queued by the SDK);
//      after the network is back alice has each exactly once, in order, with contiguous
//      offsets, and bob has hers once (reconnect + recovery + publish resend);
//   5. the router restarts on the same data dir (the Rust test does it when this script
//      prints "@@restart-router", and answers "@@router ADDR" on stdin): both pages
//      reconnect and recover, a message sent during the restart arrives once;
//   6. alice's token is refreshed twice while the two talk, with no disconnect;
//   7. alice opens a dialog with bob; bob's page opens it from his inbox and shows it;
//   8. the cluster picture of a standalone node: one node, every cell in its colour;
//   no page error and no failed recovery on any page up to here;
//   9. alice is cut off while tiny:x (3 messages kept) moves on: her recovery fails, the
//      page says so in its notice and shows the latest messages, live ones follow.
// Usage: node chat.mjs ROUTER_ADDR   (127.0.0.1:PORT; CHROMIUM=/path overrides /usr/bin/chromium)
// Prints one line per step and "browser: N passed, 0 failed"; exits non-zero on failure.
import readline from 'node:readline';
import { checkCells, describePages, pages, launch, proxy, stepper, until, STEP_TIMEOUT } from './lib.mjs';

const routerAddr = process.argv[2];
if (!routerAddr) {
  console.error('usage: node chat.mjs ROUTER_ADDR');
  process.exit(2);
}
// Dev tokens this short make the SDK refresh every ~8.5 s (at 85 % of the lifetime), with
// ~1.5 s to spare before the server would close the connection.
const SHORT_TTL = '10s';
const browser = await launch();
const steps = stepper();
const errors = [];
const proxies = [];

// Lines from the Rust test (the restarted router's address).
const fromRust = [];
readline.createInterface({ input: process.stdin }).on('line', (l) => fromRust.push(l));

async function signIn(user, base, query = '') {
  const context = await browser.newContext();
  const page = await context.newPage();
  pages.set(user, page);
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.on('pageerror', (e) => errors.push(`[${user}] ${e}`));
  page.on('console', (m) => {
    // Failed fetches while the network is cut are expected; the rest is worth seeing.
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) console.log(`[${user} console] ${m.text()}`);
  });
  await page.goto(`${base}/${query}`);
  await page.waitForSelector('body[data-ready="true"]', { state: 'attached' });
  await page.fill('#user', user);
  await page.click('#login-dev');
  await page.waitForSelector('#status[data-state="connected"]');
  await page.waitForFunction(() => window.chatDebug.channel('room:lobby')?.subscribed);
  return page;
}

const texts = (page) =>
  page.$$eval('#messages li[data-offset]', (lis) =>
    lis.map((li) => ({ offset: Number(li.dataset.offset), from: li.dataset.from, text: li.querySelector('.text').textContent })));

const stats = (page) => page.evaluate(() => ({ ...window.chatDebug.stats }));

async function send(page, text) {
  await page.fill('#text', text);
  await page.click('#send');
}

/** Waits until the page shows `text` in the open conversation. */
const sees = (page, text) => page.waitForSelector(`#messages li[data-offset] .text >> text="${text}"`);

/** The open conversation holds each of `want` exactly once, in order; offsets have no gap and no duplicate. */
async function exactlyOnce(page, who, want) {
  const seen = await texts(page);
  const got = seen.filter((m) => want.includes(m.text)).map((m) => m.text);
  if (JSON.stringify(got) !== JSON.stringify(want)) throw new Error(`${who} has ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  const offs = seen.map((m) => m.offset);
  if (new Set(offs).size !== offs.length) throw new Error(`${who}: duplicate offsets ${offs}`);
  for (let i = 1; i < offs.length; i++) if (offs[i] !== offs[i - 1] + 1) throw new Error(`${who}: gap in offsets ${offs}`);
  return offs;
}

try {
  const tag = Math.random().toString(36).slice(2, 8);
  const aliceNet = await proxy(routerAddr);
  const bobNet = await proxy(routerAddr);
  proxies.push(aliceNet, bobNet);
  let alice, bob;

  await step('alice (10 s tokens) and bob sign in and join room:lobby', async () => {
    alice = await signIn('alice', aliceNet.url, `?ttl=${SHORT_TTL}`);
    bob = await signIn('bob', bobNet.url);
  });

  await step('bob sees the message alice sends, from alice', async () => {
    await send(alice, `hello from alice ${tag}`);
    await bob.waitForSelector(`#messages li[data-from="alice"] >> text=hello from alice ${tag}`);
  });

  await step('carol joins later and sees it in the history', async () => {
    const carol = await signIn('carol', `http://${routerAddr}`);
    await carol.waitForSelector(`#messages li[data-from="alice"] >> text=hello from alice ${tag}`);
    await exactlyOnce(carol, 'carol', [`hello from alice ${tag}`]);
    await carol.context().close();
  });

  await step("alice's network drops: after it is back nothing is lost or repeated", async () => {
    const before = await stats(alice);
    aliceNet.cut();
    await alice.waitForSelector('#status[data-state="reconnecting"]');
    await send(alice, `sent offline ${tag}`); // queued by the SDK until the socket is back
    const away = [1, 2, 3].map((i) => `while you were away ${i} ${tag}`);
    for (const t of away) await send(bob, t);
    await sees(bob, away[2]);
    aliceNet.restore();
    await alice.waitForSelector('#status[data-state="connected"]');
    await sees(alice, away[2]);
    await sees(alice, `sent offline ${tag}`);
    await sees(bob, `sent offline ${tag}`);
    const offs = await exactlyOnce(alice, 'alice', [...away, `sent offline ${tag}`]);
    await exactlyOnce(bob, 'bob', [...away, `sent offline ${tag}`]);
    const after = await stats(alice);
    if (after.connects !== before.connects + 1) throw new Error(`alice connected ${after.connects - before.connects} times`);
    if (after.recoveryFailed !== 0) throw new Error('recovery failed after the network drop');
    if (after.recovered <= before.recovered) throw new Error('no subscription reported recovered: true');
    const pos = await alice.evaluate(() => window.chatDebug.channel('room:lobby').position.offset);
    if (pos !== offs[offs.length - 1]) throw new Error(`recovery position ${pos} vs ${offs}`);
  });

  await step('the router restarts on the same data: both pages recover', async () => {
    const [a0, b0] = [await stats(alice), await stats(bob)];
    console.log('@@restart-router');
    const line = await until('the restarted router\'s address', () => fromRust.find((l) => l.startsWith('@@router ')), 60_000);
    fromRust.splice(fromRust.indexOf(line), 1);
    const addr = line.slice('@@router '.length).trim();
    aliceNet.retarget(addr);
    bobNet.retarget(addr);
    await send(alice, `during the restart ${tag}`); // sent or queued, whichever the socket allows
    await until('both pages reconnected', async () => (await stats(alice)).connects > a0.connects && (await stats(bob)).connects > b0.connects);
    await alice.waitForSelector('#status[data-state="connected"]');
    await bob.waitForSelector('#status[data-state="connected"]');
    await sees(bob, `during the restart ${tag}`);
    await send(bob, `after the restart ${tag}`);
    await sees(alice, `after the restart ${tag}`);
    for (const [page, who, s0] of [[alice, 'alice', a0], [bob, 'bob', b0]]) {
      await exactlyOnce(page, who, [`during the restart ${tag}`, `after the restart ${tag}`]);
      const s1 = await stats(page);
      if (s1.recoveryFailed !== 0) throw new Error(`${who}: recovery failed after the restart`);
      if (s1.recovered <= s0.recovered) throw new Error(`${who}: no subscription reported recovered: true`);
    }
  });

  await step("alice's token is refreshed twice mid-conversation, with no disconnect", async () => {
    const s0 = await stats(alice);
    const exp0 = await alice.evaluate(() => window.chatDebug.state.tokenExp ?? 0);
    await send(alice, `before the refresh ${tag}`);
    await sees(bob, `before the refresh ${tag}`);
    await until('a token refresh', async () => (await stats(alice)).refreshes >= s0.refreshes + 1);
    await send(bob, `between refreshes ${tag}`);
    await sees(alice, `between refreshes ${tag}`);
    await until('a second token refresh', async () => (await stats(alice)).refreshes >= s0.refreshes + 2);
    await send(alice, `after two refreshes ${tag}`);
    await sees(bob, `after two refreshes ${tag}`);
    const s1 = await stats(alice);
    const exp1 = await alice.evaluate(() => window.chatDebug.state.tokenExp ?? 0);
    if (s1.connects !== s0.connects || s1.disconnects !== s0.disconnects) {
      throw new Error(`the refreshes cost a reconnect: ${JSON.stringify(s0)} -> ${JSON.stringify(s1)}`);
    }
    if (!(exp1 > exp0)) throw new Error(`token expiry did not move: ${exp0} -> ${exp1}`);
    await exactlyOnce(alice, 'alice', [`before the refresh ${tag}`, `between refreshes ${tag}`, `after two refreshes ${tag}`]);
    console.log(`     alice: ${s1.refreshes} refreshes in all, ${s1.connects} connects`);
  });

  await step('a direct message opens the dialog on the other side', async () => {
    await alice.fill('#dm-input', 'bob');
    await alice.click('#dm-open');
    await alice.waitForFunction(() => window.chatDebug.channel('dialog:alice:bob')?.subscribed);
    await send(alice, `psst ${tag}`);
    await bob.waitForSelector('#dms li[data-channel="dialog:alice:bob"]');
    await bob.click('#dms li[data-channel="dialog:alice:bob"]');
    await bob.waitForSelector(`#messages li[data-from="alice"] >> text=psst ${tag}`);
    await send(bob, `hi alice ${tag}`);
    await alice.waitForSelector(`#messages li[data-from="bob"] >> text=hi alice ${tag}`);
  });

  await step('the cluster picture of a standalone node shows one node', async () => {
    await alice.waitForSelector('#cluster-mode >> text=standalone');
    const c = await checkCells(alice);
    if (c.partitions < 1 || c.coloured !== c.partitions || c.nodes.length !== 1) {
      throw new Error(`standalone picture: ${JSON.stringify(c)}`);
    }
  });

  for (const [page, who] of [[alice, 'alice'], [bob, 'bob']]) {
    if ((await stats(page)).recoveryFailed !== 0) throw new Error(`${who}: a recovery failed`);
    if (await page.isVisible('#recovery')) throw new Error(`${who}: the recovery notice is shown`);
  }

  await step('a recovery that cannot succeed (history trimmed meanwhile) is announced', async () => {
    // tiny:* keeps 3 messages (the Rust test's config), trimmed every 100 ms.
    for (const page of [alice, bob]) {
      await page.fill('#room-input', 'tiny:x');
      await page.click('#join');
      await page.waitForFunction(() => window.chatDebug.channel('tiny:x')?.subscribed);
    }
    await send(bob, `tiny 0 ${tag}`);
    await sees(alice, `tiny 0 ${tag}`);
    aliceNet.cut();
    await alice.waitForSelector('#status[data-state="reconnecting"]');
    const sent = [1, 2, 3, 4, 5, 6, 7, 8].map((i) => `tiny ${i} ${tag}`);
    for (const t of sent) await send(bob, t);
    await sees(bob, sent[sent.length - 1]);
    // Until retention has removed what alice would need to recover.
    await until('tiny:x trimmed', () => bob.evaluate(async () => {
      const page = await window.chatDebug.state.client.history('tiny:x', { limit: 1 });
      return page.messages.length > 0 && page.messages[0].offset > 2;
    }));
    aliceNet.restore();
    await alice.waitForSelector('#recovery[data-channel="tiny:x"]');
    const notice = await alice.textContent('#recovery-text');
    if (!notice.includes('Recovery failed for tiny:x')) throw new Error(`notice: ${notice}`);
    await sees(alice, sent[sent.length - 1]);
    const shown = (await texts(alice)).map((m) => m.text);
    if (shown.includes(`tiny 0 ${tag}`) || shown.length > 3) throw new Error(`after the reload alice shows ${shown}`);
    await send(bob, `tiny live ${tag}`);
    await sees(alice, `tiny live ${tag}`);
    if ((await stats(alice)).recoveryFailed !== 1) throw new Error(`recoveryFailed: ${(await stats(alice)).recoveryFailed}`);
    console.log(`     alice's notice: ${notice}`);
  });

  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
  console.log(`browser: ${steps.passed} passed, 0 failed`);
} catch (e) {
  console.log(`FAIL after ${steps.passed} steps: ${e.stack || e}`);
  console.log(`pages:\n${await describePages()}`);
  if (errors.length) console.log(`page errors: ${errors.join('; ')}`);
  console.log(`browser: ${steps.passed} passed, 1 failed`);
  process.exitCode = 1;
} finally {
  for (const p of proxies) p.close();
  await browser.close();
  process.exit(process.exitCode ?? 0);
}

function step(name, fn) {
  return steps.step(name, fn);
}
