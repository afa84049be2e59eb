// Browser test of the demo page served by an embedded gateway.
//
// It starts its own `switchboard-gateway` (embedded mode: SQLite + in-process
// bus, development tokens), opens the demo page for two users in headless
// Chromium and has them chat: create, join, send, deliver, react, read.
//
//   SWITCHBOARD_BIN_DIR  where switchboard-gateway lives
//                        (default: ../../target/debug relative to this folder)
//   CHROMIUM_PATH        the browser (default: /usr/bin/chromium)
//   SCREENSHOT_DIR       where demo-alice.png / demo-bob.png go (default: /tmp)
//
// Run: cargo build -p switchboard-gateway && cd tests/browser && npm ci && npm test

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BIN_DIR = path.resolve(HERE, process.env.SWITCHBOARD_BIN_DIR || '../../target/debug');
const GATEWAY_BIN = path.join(BIN_DIR, 'switchboard-gateway');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SCREENSHOT_DIR = process.env.SCREENSHOT_DIR || '/tmp';
const READY_TIMEOUT_MS = 30_000;
const UI_TIMEOUT_MS = 10_000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const rand = () => Math.random().toString(36).slice(2, 8);

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

// ---------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------

let gateway = null; // {proc, base, dataDir, output: string[], exited}

async function startGateway() {
  if (!fs.existsSync(GATEWAY_BIN)) {
    throw new Error(`${GATEWAY_BIN} not found: run \`cargo build -p switchboard-gateway\` first (or set SWITCHBOARD_BIN_DIR)`);
  }
  const port = await freePort();
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchboard-browser-'));
  const env = { ...process.env, PORT: String(port), DATA_DIR: dataDir, RUST_LOG: process.env.RUST_LOG || 'warn' };
  // Embedded mode with a generated development secret: no backends, no auth settings.
  for (const k of Object.keys(env)) {
    if (/^(REDIS_URL|DATABASE_URL|AUTH_.*|CORS_ORIGINS)$/.test(k)) delete env[k];
  }
  const proc = spawn(GATEWAY_BIN, [], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const output = [];
  const keep = (chunk) => {
    output.push(...chunk.toString().split('\n').filter(Boolean));
    if (output.length > 200) output.splice(0, output.length - 200);
  };
  proc.stdout.on('data', keep);
  proc.stderr.on('data', keep);
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  gateway = { proc, base: `http://127.0.0.1:${port}`, dataDir, output, exited, dead: false };
  exited.then(() => { gateway.dead = true; });

  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (gateway.dead) throw new Error(`gateway exited before it was ready:\n${output.join('\n')}`);
    try {
      const res = await fetch(`${gateway.base}/readyz`);
      if (res.status === 200) return;
    } catch { /* not listening yet */ }
    await sleep(100);
  }
  throw new Error(`gateway not ready within ${READY_TIMEOUT_MS} ms:\n${output.join('\n')}`);
}

async function stopGateway() {
  if (!gateway) return;
  if (!gateway.dead) {
    gateway.proc.kill('SIGTERM');
    const killed = await Promise.race([gateway.exited.then(() => true), sleep(5000).then(() => false)]);
    if (!killed) {
      gateway.proc.kill('SIGKILL');
      await gateway.exited;
    }
  }
  fs.rmSync(gateway.dataDir, { recursive: true, force: true });
}

// ---------------------------------------------------------------------------
// The browser
// ---------------------------------------------------------------------------

let browser = null;
const users = {}; // name -> {page, context, logs: string[]}

async function openUser(userId, name) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await context.newPage();
  const logs = [];
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') logs.push(`console.${m.type()}: ${m.text()}`); });
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(gateway.base + '/');
  await page.getByTestId('login-user').fill(userId);
  await page.getByTestId('login-name').fill(name);
  await page.getByTestId('login-button').click();
  const u = { userId, name, page, context, logs };
  await waitAttr(u, page.getByTestId('connection-state'), 'data-state', 'connected', 'connection state');
  return u;
}

/** Texts of the toasts on the page (errors such as "Reaction: Not supported yet"). */
async function toasts(u) {
  return u.page.getByTestId('toast').allTextContents().catch(() => []);
}

/** Waits until `locator` (first match) has attribute `attr` equal to `want`; explains a timeout. */
async function waitAttr(u, locator, attr, want, what, timeout = UI_TIMEOUT_MS) {
  const deadline = Date.now() + timeout;
  let last = '(no element)';
  while (Date.now() < deadline) {
    const n = await locator.count();
    if (n > 0) {
      last = await locator.first().getAttribute(attr);
      if (last === want) return;
    }
    await sleep(50);
  }
  assert.fail(`${u.name}: ${what}: expected ${attr}="${want}", last seen ${JSON.stringify(last)}; ` +
    `toasts: ${JSON.stringify(await toasts(u))}; page log: ${JSON.stringify(u.logs.slice(-5))}`);
}

/** Waits until `locator` matches at least one element; explains a timeout. */
async function waitVisible(u, locator, what, timeout = UI_TIMEOUT_MS) {
  try {
    await locator.first().waitFor({ state: 'visible', timeout });
  } catch {
    assert.fail(`${u.name}: ${what} did not appear within ${timeout} ms; ` +
      `toasts: ${JSON.stringify(await toasts(u))}; page log: ${JSON.stringify(u.logs.slice(-5))}`);
  }
}

const messageItem = (u, text) => u.page.getByTestId('message').filter({ hasText: text });
const channelItem = (u, name) => u.page.locator(`[data-testid=channel-item][data-channel-name="${name}"]`);
const reactionButton = (u, text, type) =>
  messageItem(u, text).locator(`[data-testid=reaction-button][data-reaction="${type}"]`);

before(async () => {
  await startGateway();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  for (const [who, u] of Object.entries(users)) {
    await u.page.screenshot({ path: path.join(SCREENSHOT_DIR, `demo-${who}.png`) }).catch(() => {});
  }
  await browser?.close().catch(() => {});
  await stopGateway();
});

// ---------------------------------------------------------------------------
// The scenario: one test, its steps in order (a failed step does not stop
// the later ones, which report on their own).
// ---------------------------------------------------------------------------

test('two users chat through the demo page', async (t) => {
  const channel = `general-${rand()}`;
  const hello = `Hello Bob ${rand()}`;
  const reply = `Hi Alice, nice to see you ${rand()}`;

  await t.test('alice and bob log in and connect', async () => {
    users.alice = await openUser(`alice_${rand()}`, 'Alice');
    users.bob = await openUser(`bob_${rand()}`, 'Bob');
  });
  const { alice, bob } = users;
  assert.ok(alice && bob, 'both users are logged in');

  await t.test('alice creates a public channel', async () => {
    await alice.page.getByTestId('create-channel-name').fill(channel);
    await alice.page.getByTestId('create-channel-button').click();
    await waitAttr(alice, channelItem(alice, channel), 'data-member', 'true', `channel ${channel} in alice's list`);
    await waitAttr(alice, channelItem(alice, channel), 'aria-selected', 'true', 'new channel selected');
    await waitVisible(alice, alice.page.getByTestId('no-messages'), 'empty channel placeholder');
  });

  await t.test('bob sees the public channel and joins it', async () => {
    await bob.page.getByTestId('refresh-channels').click();
    await waitAttr(bob, channelItem(bob, channel), 'data-member', 'false', `channel ${channel} among bob's public channels`);
    await channelItem(bob, channel).getByTestId('join-channel').click();
    await waitAttr(bob, channelItem(bob, channel), 'data-member', 'true', 'channel joined');
    await waitAttr(bob, channelItem(bob, channel), 'aria-selected', 'true', 'joined channel selected');
  });

  await t.test('alice sends a message: bob receives it, alice sees DELIVERED', async () => {
    await alice.page.getByTestId('composer-input').fill(hello);
    await alice.page.getByTestId('send-button').click();
    await waitAttr(alice, messageItem(alice, hello), 'data-own', 'true', 'own message shown');
    await waitAttr(alice, messageItem(alice, hello), 'data-status', 'DELIVERED', 'status of own message');
    await waitAttr(bob, messageItem(bob, hello), 'data-own', 'false', "alice's message on bob's page");
    assert.match(await messageItem(bob, hello).textContent(), /Alice/, "bob's page names the sender");
    const messageId = await messageItem(alice, hello).getAttribute('data-message-id');
    assert.equal(await messageItem(bob, hello).getAttribute('data-message-id'), messageId, 'same message id on both pages');
  });

  // Reactions: real assertions (they need reaction:add/remove in the gateway).
  await t.test('bob reacts 👍: alice sees the count 1; bob toggles it off again', async () => {
    await waitVisible(bob, reactionButton(bob, hello, '👍'), "bob's 👍 button");
    await reactionButton(bob, hello, '👍').click();
    await waitAttr(alice, reactionButton(alice, hello, '👍'), 'data-count', '1', "👍 count on alice's page");
    await waitAttr(bob, reactionButton(bob, hello, '👍'), 'data-mine', 'true', "bob's own 👍 marked");
    assert.equal((await reactionButton(alice, hello, '👍').textContent()).trim(), '👍 1');
    // A second click removes bob's reaction everywhere; then add it back for the screenshot.
    await reactionButton(bob, hello, '👍').click();
    await waitAttr(alice, reactionButton(alice, hello, '👍'), 'data-count', '0', '👍 count after removal');
    await reactionButton(bob, hello, '👍').click();
    await waitAttr(alice, reactionButton(alice, hello, '👍'), 'data-count', '1', '👍 count after adding again');
  });

  await t.test('bob replies: alice receives it, bob sees DELIVERED', async () => {
    await bob.page.getByTestId('composer-input').fill(reply);
    await bob.page.getByTestId('send-button').click();
    await waitAttr(bob, messageItem(bob, reply), 'data-status', 'DELIVERED', 'status of own reply');
    await waitAttr(alice, messageItem(alice, reply), 'data-own', 'false', "bob's reply on alice's page");
  });

  // Read receipts: both have the channel open, so each marks the other's
  // newest message read (message:read), and the other page shows it.
  await t.test('read receipts: "Read by Bob" under hello, "Read by Alice" under the reply', async () => {
    const byBob = messageItem(alice, hello).getByTestId('read-receipt');
    await waitVisible(alice, byBob, 'read receipt under alice\'s message');
    assert.equal((await byBob.textContent()).trim(), 'Read by Bob');
    const byAlice = messageItem(bob, reply).getByTestId('read-receipt');
    await waitVisible(bob, byAlice, 'read receipt under bob\'s reply');
    assert.equal((await byAlice.textContent()).trim(), 'Read by Alice');
  });

  await t.test('an invitation to a second channel shows up with an unread count for bob', async () => {
    const second = `random-${rand()}`;
    const news = `News ${rand()}`;
    await alice.page.getByTestId('create-channel-name').fill(second);
    await alice.page.getByTestId('create-channel-private').check();
    await alice.page.getByTestId('create-channel-button').click();
    await waitAttr(alice, channelItem(alice, second), 'aria-selected', 'true', 'second channel selected');
    await alice.page.getByTestId('invite-user').fill(bob.userId);
    await alice.page.getByTestId('invite-button').click();
    await waitVisible(alice, alice.page.getByTestId('invite-result').filter({ hasText: 'added' }), 'invitation confirmation');
    await alice.page.getByTestId('composer-input').fill(news);
    await alice.page.getByTestId('send-button').click();
    await waitAttr(alice, messageItem(alice, news), 'data-status', 'DELIVERED', 'status in the second channel');
    // Bob is still in the first channel: the new one appears with one unread message.
    await waitAttr(bob, channelItem(bob, second), 'data-member', 'true', 'private channel in bob\'s list');
    await waitAttr(bob, channelItem(bob, second).getByTestId('unread-count'), 'data-count', '1', 'unread count');
    await channelItem(bob, second).click();
    await waitVisible(bob, messageItem(bob, news), 'message in the second channel');
    await waitAttr(bob, channelItem(bob, second).getByTestId('unread-count'), 'data-count', '0', 'unread count after opening');
  });

  await t.test('a rejected message shows FAILED with its error and can be retried', async () => {
    const tooLong = `x${'y'.repeat(4100)}`;
    await alice.page.getByTestId('composer-input').fill(tooLong);
    await alice.page.getByTestId('send-button').click();
    const failed = messageItem(alice, 'xyyyy');
    await waitAttr(alice, failed, 'data-status', 'FAILED', 'status of an oversized message');
    assert.ok((await failed.getByTestId('message-error').textContent()).length > 0, 'the error is shown');
    const firstTemp = await failed.getAttribute('data-temp-id');
    await failed.getByTestId('retry-button').click();
    await waitAttr(alice, failed, 'data-status', 'FAILED', 'status after retry');
    assert.notEqual(await failed.getAttribute('data-temp-id'), firstTemp, 'retry uses a new tempId');
    assert.equal(await messageItem(bob, 'xyyyy').count(), 0, 'bob never sees the rejected message');
  });

  await t.test('both go back to the first channel', async () => {
    await channelItem(bob, channel).click();
    await channelItem(alice, channel).click();
    await waitVisible(alice, messageItem(alice, hello), 'first channel history');
    await waitVisible(bob, messageItem(bob, hello), 'first channel history');
  });

  await t.test('presence and typing: each sees the other online; "Bob is typing…" on alice\'s page until he sends', async () => {
    await waitVisible(alice, alice.page.getByTestId('online-members').filter({ hasText: 'Bob' }), 'bob online on alice\'s page');
    await waitVisible(bob, bob.page.getByTestId('online-members').filter({ hasText: 'Alice' }), 'alice online on bob\'s page');
    await bob.page.getByTestId('composer-input').pressSequentially('typing something', { delay: 20 });
    await waitVisible(alice, alice.page.getByTestId('typing-indicator').filter({ hasText: 'Bob is typing…' }), 'typing indicator');
    assert.equal((await bob.page.getByTestId('typing-indicator').textContent()).trim(), '', 'bob does not see his own typing');
    await bob.page.getByTestId('send-button').click();
    await waitVisible(alice, messageItem(alice, 'typing something'), 'the typed message');
    await waitVisible(alice, alice.page.locator('[data-testid="typing-indicator"]:empty'), 'typing indicator cleared');
  });

  await t.test('no script errors on either page', () => {
    const errors = [...alice.logs, ...bob.logs].filter((l) => l.startsWith('pageerror'));
    assert.deepEqual(errors, []);
  });
});
