// Browser test of `countersign dev`: the approver page in the system's
// headless Chromium (Debian `chromium`; playwright-core never downloads a
// browser). It starts the built binary on free ports, makes purchases through
// the gateway as an agent would, and answers them by clicking the page.
//
//   cargo build && npm ci --prefix tests/browser && node --test tests/browser/
//
// Environment: COUNTERSIGN_BIN (default target/debug/countersign),
// CHROMIUM_PATH (default /usr/bin/chromium). Screenshots go to tests/output/.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BINARY = process.env.COUNTERSIGN_BIN || path.join(ROOT, 'target/debug/countersign');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const OUTPUT = path.join(ROOT, 'tests/output');
const PHONE = { width: 390, height: 844 };

let dev;
let devOutput = '';
let devExit;
let context;
let page;
let userDataDir;
let ports;

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function waitFor(what, check, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (devExit) throw new Error(`countersign dev exited (${devExit}) while waiting for ${what}:\n${devOutput}`);
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}:\n${devOutput}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function connects(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => { socket.destroy(); resolve(true); });
    socket.once('error', () => resolve(false));
  });
}

const approverUrl = (user) => `http://127.0.0.1:${ports.authz}/approve?user=${user}`;

/** What an agent's shop tool does: POST /shop through the gateway. */
function buy(user, order) {
  return fetch(`http://127.0.0.1:${ports.gateway}/shop`, {
    method: 'POST',
    headers: { 'x-countersign-user': user, 'content-type': 'application/json' },
    body: JSON.stringify(order),
  });
}

/** A transfer through the gateway (four eyes from 10000 on). */
function transfer(user, body) {
  return fetch(`http://127.0.0.1:${ports.gateway}/transfers`, {
    method: 'POST',
    headers: { 'x-countersign-user': user, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
}

/** The pending card showing `message` on the current page. */
async function pendingCard(message) {
  const card = page.locator('article.card[data-state="pending"]', { hasText: message });
  await card.waitFor({ state: 'visible', timeout: 15_000 });
  return card;
}

before(async () => {
  assert.ok(fs.existsSync(BINARY), `${BINARY} is missing: run \`cargo build\` first`);
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium chromium-driver`);
  ports = { gateway: await freePort(), authz: await freePort(), shop: await freePort() };
  dev = spawn(BINARY, [
    'dev',
    '--port', String(ports.gateway),
    '--authz-port', String(ports.authz),
    '--shop-port', String(ports.shop),
    '--users', 'alice,bob',
  ], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
  dev.stdout.on('data', (chunk) => { devOutput += chunk; });
  dev.stderr.on('data', (chunk) => { devOutput += chunk; });
  dev.on('exit', (code, signal) => { devExit = signal || `code ${code}`; });
  await waitFor('the printed instructions', () => devOutput.includes('Press Ctrl-C to stop.'));
  await waitFor('the gateway', () => connects(ports.gateway));

  userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'countersign-chromium-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    viewport: PHONE,
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
  });
  page = context.pages()[0] ?? (await context.newPage());
  fs.mkdirSync(OUTPUT, { recursive: true });
});

after(async () => {
  await context?.close();
  if (userDataDir) fs.rmSync(userDataDir, { recursive: true, force: true });
  if (dev && !devExit) {
    dev.kill('SIGINT');
    const stopped = await Promise.race([
      new Promise((r) => dev.once('exit', () => r(true))),
      new Promise((r) => setTimeout(() => r(false), 10_000)),
    ]);
    if (!stopped) {
      dev.kill('SIGKILL');
      assert.fail('countersign dev did not stop on Ctrl-C (SIGINT) within 10 s');
    }
  }
});

test('countersign dev prints the approver page and a curl that buys 2 XYZ phones', () => {
  assert.match(devOutput, /DEVELOPMENT ONLY/);
  assert.ok(devOutput.includes(approverUrl('alice')), devOutput);
  assert.ok(devOutput.includes(`curl -i -X POST http://127.0.0.1:${ports.gateway}/shop`), devOutput);
  assert.ok(devOutput.includes(`-H 'x-countersign-user: alice'`), devOutput);
  assert.ok(devOutput.includes(`-d '{"product":"XYZ phone","qty":2,"priceLimit":900}'`), devOutput);
});

test('the page says when nothing is pending', async () => {
  await page.goto(approverUrl('alice'));
  const empty = page.locator('#empty');
  await empty.waitFor({ state: 'visible' });
  assert.match(await empty.innerText(), /No pending requests/);
  assert.match(await page.locator('.banner').innerText(), /Development only/i);
  assert.equal(await page.locator('nav a[aria-current="page"]').innerText(), 'alice');
});

test('a held purchase appears with its message, and Approve completes the call with 200', async () => {
  await page.goto(approverUrl('alice'));
  const purchase = buy('alice', { product: 'XYZ phone', qty: 2, priceLimit: 900 });
  const card = await pendingCard('Do you want to buy 2 XYZ phone');
  assert.ok(await page.locator('#empty').isHidden(), 'the empty state is gone');

  // authorization_details as key/value pairs, not raw JSON.
  assert.equal(await card.locator('dd[data-key="product"]').innerText(), 'XYZ phone');
  assert.equal(await card.locator('dd[data-key="quantity"]').innerText(), '2');
  assert.equal(await card.locator('dd[data-key="price_limit"]').innerText(), '900');
  assert.match(await card.locator('.detail:not(.binding) h2').innerText(), /Product purchase/);
  // The call binding: the one request the token will be good for.
  const binding = card.locator('.detail.binding');
  assert.match(await binding.locator('h2').innerText(), /Only this exact request/);
  assert.equal(await binding.locator('dd[data-key="request"]').innerText(), 'POST /shop');
  assert.match(await card.locator('.scopes').innerText(), /product:buy/);
  assert.match(await card.locator('.countdown').innerText(), /Expires in \d+:\d\d/);

  await page.screenshot({ path: path.join(OUTPUT, 'approver-pending-phone.png'), fullPage: true });
  await page.setViewportSize({ width: 1024, height: 700 });
  await page.screenshot({ path: path.join(OUTPUT, 'approver-pending-desktop.png') });
  await page.setViewportSize(PHONE);

  const id = await card.getAttribute('data-id');
  await card.getByRole('button', { name: 'Approve' }).click();
  const response = await purchase;
  assert.equal(response.status, 200);
  const order = await response.json();
  assert.equal(order.status, 'confirmed');
  assert.equal(order.buyer, 'alice');
  assert.equal(order.qty, 2);
  assert.equal(order.product, 'XYZ phone');
  await page.locator(`article.card[data-id="${id}"][data-state="approved"]`).waitFor();
  await page.locator('#empty').waitFor({ state: 'visible' });
});

test('a click on Deny ends the call with 403 access_denied', async () => {
  await page.goto(approverUrl('alice'));
  const purchase = buy('alice', { product: 'ABC tablet', qty: 1, priceLimit: 700 });
  const card = await pendingCard('Do you want to buy 1 ABC tablet');
  const id = await card.getAttribute('data-id');
  await card.getByRole('button', { name: 'Deny' }).click();
  const response = await purchase;
  assert.equal(response.status, 403);
  assert.equal(response.headers.get('content-type'), 'application/problem+json');
  const problem = await response.json();
  assert.equal(problem.code, 'access_denied');
  assert.equal(problem.detail, 'The user has denied the request.');
  const denied = page.locator(`article.card[data-id="${id}"][data-state="denied"]`);
  await denied.waitFor();
  assert.match(await denied.locator('.outcome').innerText(), /Denied/);
});

test("each user sees only their own requests; the switcher shows another user's", async () => {
  await page.goto(approverUrl('alice'));
  const purchase = buy('bob', { product: 'XYZ phone', qty: 3, priceLimit: 900 });
  await waitFor('bob\'s request at the server', async () => {
    const r = await fetch(`http://127.0.0.1:${ports.authz}/api/requests?user=bob`);
    return (await r.json()).requests.some((q) => q.state === 'pending');
  });
  await page.waitForTimeout(1500); // one refresh of alice's page
  assert.equal(await page.locator('article.card', { hasText: 'buy 3 XYZ phone' }).count(), 0);
  await page.locator('nav a', { hasText: 'bob' }).click();
  const card = await pendingCard('Do you want to buy 3 XYZ phone');
  assert.equal(await page.locator('nav a[aria-current="page"]').innerText(), 'bob');
  await card.getByRole('button', { name: 'Deny' }).click();
  assert.equal((await purchase).status, 403);
});

test('four eyes: a large transfer shows a countersign request under bob, and both approvals complete it', async () => {
  assert.ok(devOutput.includes(`curl -i -X POST http://127.0.0.1:${ports.gateway}/transfers`), devOutput);
  assert.ok(devOutput.includes(`-d '{"amount":20000,"to":"carol"}'`), devOutput);
  assert.ok(devOutput.includes(approverUrl('bob')), devOutput);

  await page.goto(approverUrl('bob'));
  const call = transfer('alice', { amount: 20000, to: 'carol' });
  const countersign = await pendingCard('Countersign: alice sends 20000 to carol');
  assert.equal(await page.locator('nav a[aria-current="page"]').innerText(), 'bob');
  // alice is asked right after bob (countersigners first).
  await countersign.locator('.others', { hasText: 'alice (waiting)' }).waitFor({ timeout: 5_000 });
  assert.ok(await countersign.locator('.four-eyes').isVisible(), 'marked four eyes');
  const binding = countersign.locator('.detail.binding');
  assert.equal(await binding.locator('dd[data-key="request"]').innerText(), 'POST /transfers');
  assert.match(await countersign.locator('.scopes').innerText(), /payments:transfer/);
  await page.screenshot({ path: path.join(OUTPUT, 'approver-countersign-phone.png'), fullPage: true });
  const countersignId = await countersign.getAttribute('data-id');

  // Alice approves her own request on her page: not enough on its own.
  await page.locator('nav a', { hasText: 'alice' }).click();
  const own = await pendingCard('LARGE transfer of 20000 to carol');
  assert.ok(await own.locator('.four-eyes').isVisible());
  assert.match(await own.locator('.others').innerText(), /bob \(waiting\)/);
  await own.getByRole('button', { name: 'Approve' }).click();
  const approved = page.locator('article.card[data-state="approved"]', { hasText: 'LARGE transfer of 20000 to carol' });
  await approved.waitFor();
  assert.match(await approved.locator('.outcome').innerText(), /once the others asked have approved too/);
  const early = await Promise.race([call.then(() => 'answered'), new Promise((r) => setTimeout(() => r('waiting'), 2500))]);
  assert.equal(early, 'waiting', 'the call waits for bob');

  // Bob countersigns: the shop takes the transfer, countersigned by bob.
  await page.locator('nav a', { hasText: 'bob' }).click();
  const bobs = page.locator(`article.card[data-id="${countersignId}"]`);
  await bobs.locator('.others', { hasText: 'alice (approved)' }).waitFor({ timeout: 5_000 });
  await bobs.getByRole('button', { name: 'Approve' }).click();
  const response = await call;
  assert.equal(response.status, 201);
  const body = await response.json();
  assert.equal(body.from, 'alice');
  assert.deepEqual(body.countersigned_by, ['bob']);
  await page.locator(`article.card[data-id="${countersignId}"][data-state="approved"]`).waitFor();
});
