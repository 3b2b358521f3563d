// centrifuge's browser bundle (dist/centrifuge.js) in headless Chromium, through
// tests/browser's playwright-core: connect to /connection/websocket with a JWT, subscribe,
// publish, receive, read history.
// Usage: node browser.mjs URL SECRET
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { run, token, check, same, describe } from './lib.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '../browser/package.json'));
const { chromium } = require('playwright-core');
const [url, secret] = process.argv.slice(2);

run(async (step) => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update'],
  });
  try {
    const page = await browser.newPage();
    const console_ = [];
    page.on('console', (m) => console_.push(m.text()));
    page.on('pageerror', (e) => console_.push(`pageerror: ${e.message}`));
    describe.set('page console', () => console_.slice(-20));

    await step('load the bundle into a blank page', async () => {
      await page.addScriptTag({ path: path.join(here, 'node_modules/centrifuge/dist/centrifuge.js') });
      const t = await page.evaluate(() => typeof window.Centrifuge);
      check(t === 'function', `window.Centrifuge is ${t}`);
    });

    await step('connect, subscribe, publish, receive, history', async () => {
      const result = await page.evaluate(
        async ({ url, tok }) => {
          const log = [];
          const c = new window.Centrifuge(url, { token: tok, minReconnectDelay: 100, maxReconnectDelay: 1000 });
          const sub = c.newSubscription('room:browser', { recoverable: true });
          const pubs = [];
          sub.on('publication', (ctx) => pubs.push({ offset: ctx.offset, data: ctx.data }));
          c.on('state', (ctx) => log.push(`client ${ctx.newState}`));
          c.on('error', (ctx) => log.push(`error ${JSON.stringify(ctx.error)}`));
          sub.on('error', (ctx) => log.push(`sub error ${JSON.stringify(ctx.error)}`));
          const deadline = Date.now() + 15000;
          const wait = async (what, f) => {
            while (!f()) {
              if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; log ${JSON.stringify(log)}`);
              await new Promise((r) => setTimeout(r, 25));
            }
          };
          const fail = (what) => (e) => {
            throw new Error(`${what}: ${e && e.message ? e.message : JSON.stringify(e)}; log ${JSON.stringify(log)}`);
          };
          c.connect();
          sub.subscribe();
          await sub.ready(10000).catch(fail('subscribe'));
          for (let i = 1; i <= 3; i++) await sub.publish({ i, from: 'chromium' }).catch(fail(`publish ${i}`));
          await wait('3 publications', () => pubs.length >= 3);
          const h = await sub.history({ limit: 10 }).catch(fail('history'));
          const r = await sub.history({ limit: 10, reverse: true }).catch(fail('reverse history'));
          c.disconnect();
          return {
            client: c.state,
            pubs,
            history: h.publications.map((p) => p.data.i),
            reverse: r.publications.map((p) => p.data.i),
            epoch: h.epoch,
            log,
          };
        },
        { url, tok: token(secret, 'chromium-user') },
      );
      same(result.pubs.map((p) => p.data.i), [1, 2, 3], 'publications in the page');
      check(result.pubs[1].offset === result.pubs[0].offset + 1, `offsets ${JSON.stringify(result.pubs)}`);
      same(result.history, [1, 2, 3], 'history in the page');
      same(result.reverse, [3, 2, 1], 'reverse history in the page');
    });
  } finally {
    await browser.close();
  }
});
