// The chat page's cluster picture in headless Chromium, against real clusters.
//   For each NAME=ADDR given (a node of a converged cluster, started by the Rust test):
//   open http://ADDR/#cluster (the picture alone), wait until it shows the map with every
//   partition owned, take a screenshot (OUTDIR/cluster-NAME.png, path printed), and read
//   the canvas pixels: every partition cell is its owner's legend colour, the leader is
//   marked, the epoch is shown, under-replicated cells carry their mark. Then the same
//   picture in the chat page's sidebar (narrow), screenshot and pixels again.
// Usage: node cluster.mjs OUTDIR NAME=127.0.0.1:PORT...
// Prints one line per step and "browser: N passed, 0 failed"; exits non-zero on failure.
import path from 'node:path';
import { checkCells, describePages, pages, launch, stepper, STEP_TIMEOUT } from './lib.mjs';

const [outDir, ...targets] = process.argv.slice(2);
if (!outDir || targets.length === 0) {
  console.error('usage: node cluster.mjs OUTDIR NAME=ADDR...');
  process.exit(2);
}
const browser = await launch();
const steps = stepper();
const errors = [];

async function openPicture(addr, hash, viewport) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  pages.set(`${addr}/${hash}`, page);
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.on('pageerror', (e) => errors.push(`${e}`));
  await page.goto(`http://${addr}/${hash}`);
  await page.waitForSelector('body[data-ready="true"]', { state: 'attached' });
  return page;
}

/** Waits until the picture shows three live nodes, a leader, and an owner for every partition. */
async function settled(page) {
  await page.waitForFunction(() => {
    const v = window.chatDebug.cluster.data;
    if (!v || v.mode !== 'cluster' || !v.leader || (v.nodes || []).length !== 3 || !v.owners.length) return false;
    const live = new Set(v.nodes.map((n) => n.id));
    return v.owners.every((o) => live.has(o));
  }, null, { timeout: 60_000 });
}

function verify(c, name) {
  if (c.partitions === 0 || c.coloured !== c.partitions || c.unowned !== 0) {
    throw new Error(`${name}: ${c.coloured}/${c.partitions} cells in their owner's colour: ${JSON.stringify(c)}`);
  }
  if (c.nodes.length !== 3) throw new Error(`${name}: legend has ${c.nodes}`);
  if (c.cell >= 6 && c.marked !== c.under) throw new Error(`${name}: ${c.marked} of ${c.under} under-replicated cells marked`);
}

try {
  for (const target of targets) {
    const [name, addr] = target.split('=');
    await steps.step(`cluster ${name}: every partition cell has its owner's colour`, async () => {
      const page = await openPicture(addr, '#cluster', { width: 1200, height: 1100 });
      await settled(page);
      const c = await checkCells(page);
      verify(c, name);
      const leader = await page.textContent('#cluster-leader');
      if (leader !== c.leader) throw new Error(`${name}: leader shown as ${leader}, map says ${c.leader}`);
      if (!(await page.isVisible(`#cluster-legend li[data-node="${c.leader}"] .leader-mark`))) throw new Error(`${name}: leader not marked`);
      if ((await page.textContent('#cluster-epoch')) !== String(c.epoch)) throw new Error(`${name}: epoch not shown`);
      const bars = await page.$$eval('#cluster-bars .bar-row[data-node]', (rows) => rows.length);
      if (bars !== 3) throw new Error(`${name}: ${bars} node bars`);
      const shot = path.join(outDir, `cluster-${name}.png`);
      await page.screenshot({ path: shot, fullPage: true });
      console.log(`     ${name}: ${c.partitions} partitions in ${c.cols} columns of ${c.cell}px cells, nodes ${c.nodes}, leader ${c.leader}, epoch ${c.epoch}, ${c.under} under-replicated`);
      console.log(`     screenshot: ${shot}`);
      await page.context().close();
    });

    await steps.step(`cluster ${name}: the picture in the chat page's sidebar`, async () => {
      const page = await openPicture(addr, '', { width: 1280, height: 800 });
      await page.fill('#user', 'viewer');
      await page.click('#login-dev');
      await page.waitForSelector('#status[data-state="connected"]');
      await settled(page);
      const c = await checkCells(page);
      verify(c, `${name} (sidebar)`);
      const shot = path.join(outDir, `cluster-${name}-sidebar.png`);
      await page.screenshot({ path: shot });
      console.log(`     sidebar: ${c.cols} columns of ${c.cell}px cells; screenshot: ${shot}`);
      await page.context().close();
    });
  }
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
  console.log(`browser: ${steps.passed} passed, 0 failed`);
} catch (e) {
  console.log(`FAIL after ${steps.passed} steps: ${e.stack || e}`);
  console.log(`pages:\n${await describePages()}`);
  console.log(`browser: ${steps.passed} passed, 1 failed`);
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit(process.exitCode ?? 0);
}
