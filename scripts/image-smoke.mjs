// The chat part of scripts/image-smoke: one user talks to a gateway (running in a container) with
// the stock socket.io-client of tests/js, exactly as a browser would.
//
//   SMOKE_URL=http://127.0.0.1:3002 AUTH_DEV_SECRET=... node scripts/image-smoke.mjs
//
// Creates a channel over REST, connects (connection:success must list the channel), sends one
// message:send and waits for message:delivered DELIVERED and message:created, then reads the message
// back from the history endpoint (so it went through a worker into PostgreSQL). Tokens are HS256
// development tokens with the claims of `switchboard-gateway dev-token`. Exits non-zero with the
// reason on the first failed step; the whole run is bounded by 60 s.

import crypto from 'node:crypto';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(ROOT, 'tests/js/package.json'));
const { io } = require('socket.io-client');

const URL_ = process.env.SMOKE_URL;
const SECRET = process.env.AUTH_DEV_SECRET;
if (!URL_ || !SECRET) {
  console.error('image-smoke.mjs: SMOKE_URL and AUTH_DEV_SECRET are required');
  process.exit(2);
}

const overall = setTimeout(() => fail('the smoke test did not finish within 60 s'), 60_000);
overall.unref();

function fail(message) {
  console.error(`image-smoke.mjs: FAILED: ${message}`);
  process.exit(1);
}

const b64url = (data) => Buffer.from(data).toString('base64url');

/** The token `switchboard-gateway dev-token --user <userId>` prints. */
function devToken(userId) {
  const now = Math.floor(Date.now() / 1000);
  const header = { typ: 'JWT', alg: 'HS256' };
  const claims = { sub: userId, name: userId, iat: now, nbf: now - 1, exp: now + 300 };
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
  return `${input}.${b64url(crypto.createHmac('sha256', SECRET).update(input).digest())}`;
}

async function api(method, pathname, token, body) {
  const headers = { authorization: `Bearer ${token}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(URL_ + pathname, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(15_000),
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  return { status: res.status, json, text };
}

/** Resolves with the first `event` payload matching `predicate`, rejects after `ms`. */
function waitFor(socket, event, predicate, ms, seen) {
  const hit = seen.find((e) => e.event === event && predicate(e.payload));
  if (hit) return Promise.resolve(hit.payload);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.off(event, on);
      const got = seen.map((e) => `${e.event} ${JSON.stringify(e.payload)?.slice(0, 200)}`).join('\n    ');
      reject(new Error(`no "${event}" within ${ms} ms; received:\n    ${got || '(nothing)'}`));
    }, ms);
    const on = (payload) => {
      if (predicate(payload)) {
        clearTimeout(timer);
        socket.off(event, on);
        resolve(payload);
      }
    };
    socket.on(event, on);
  });
}

const step = (text) => console.log(`image-smoke.mjs: ${text}`);

async function main() {
  const userId = `user_smoke_${crypto.randomBytes(4).toString('hex')}`;
  const token = devToken(userId);

  const created = await api('POST', '/api/channels', token, { name: `smoke-${crypto.randomBytes(3).toString('hex')}`, isPrivate: false });
  if (created.status !== 201 || !created.json?.id) fail(`POST /api/channels: ${created.status} ${created.text}`);
  const channelId = created.json.id;
  step(`REST: channel ${channelId} created (201)`);

  const seen = [];
  const socket = io(`${URL_}/api/socket.io`, {
    auth: { token: `Bearer ${token}`, userId },
    transports: ['polling', 'websocket'],
    reconnection: false,
    forceNew: true,
    timeout: 10_000,
  });
  socket.onAny((event, payload) => seen.push({ event, payload }));
  const errored = new Promise((_, reject) => {
    socket.on('connect_error', (err) => reject(new Error(`connect_error: ${err.message}`)));
    socket.on('connection:error', (p) => reject(new Error(`connection:error ${JSON.stringify(p)}`)));
  });
  const race = (p) => Promise.race([p, errored]);

  const success = await race(waitFor(socket, 'connection:success', () => true, 10_000, seen));
  const listed = JSON.stringify(success).includes(channelId);
  if (!listed) fail(`connection:success does not list channel ${channelId}: ${JSON.stringify(success).slice(0, 500)}`);
  step(`socket.io: connection:success as ${userId} (transport ${socket.io.engine.transport.name}), channel listed`);

  const tempId = `smoke-${crypto.randomBytes(4).toString('hex')}`;
  const content = `hello from the image ${tempId}`;
  const delivered = waitFor(socket, 'message:delivered', (p) => p?.tempId === tempId && p.status === 'DELIVERED', 15_000, seen);
  const createdEvt = waitFor(socket, 'message:created', (p) => p?.tempId === tempId || p?.message?.content === content, 15_000, seen);
  const failed = waitFor(socket, 'message:failed', (p) => p?.tempId === tempId, 15_000, seen).then(
    (p) => Promise.reject(new Error(`message:failed ${JSON.stringify(p)}`)),
    () => new Promise(() => {}),
  );
  socket.emit('message:send', { content, channelId, tempId });
  const [d, c] = await race(Promise.race([Promise.all([delivered, createdEvt]), failed]));
  if (c.message?.content !== content) fail(`message:created carries ${JSON.stringify(c).slice(0, 300)}`);
  if (d.messageId && c.message?.id && d.messageId !== c.message.id) fail(`message:delivered ${d.messageId} vs message:created ${c.message.id}`);
  step(`socket.io: message:send -> message:delivered DELIVERED (${d.messageId}) and message:created`);

  const hist = await api('GET', `/api/channels/${encodeURIComponent(channelId)}/messages`, token);
  const list = Array.isArray(hist.json) ? hist.json : hist.json?.messages;
  if (hist.status !== 200 || !Array.isArray(list)) fail(`GET history: ${hist.status} ${hist.text.slice(0, 300)}`);
  if (!list.some((m) => m.content === content)) fail(`the message is not in the history: ${hist.text.slice(0, 500)}`);
  step('REST: the message is in the channel history (stored by the worker container)');

  socket.close();
}

main().then(
  () => process.exit(0),
  (e) => fail(e?.message || String(e)),
);
