// Hostile and unlucky clients (issue 16, findings 4, 5 and part of 7):
// the brute-force throttle behind a reverse proxy, expired tokens, a
// hanging or failing JWKS endpoint, the history anchor, the channel list's
// pagination and the user upsert that only writes changed claims.
//
// The deployment trusts 127.0.0.1 as a proxy (the harness connects from
// there), so each test picks its client addresses with X-Forwarded-For.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import {
  api, auth, connectUser, createChannel, createSocket, history, randomHex, sendAndWait, sleep, startCluster, uid,
  useCluster, waitFor,
} from '../lib/harness.mjs';

/** Age after which the gateway's JWKS is stale (refreshed in the background). */
const JWKS_CACHE_MS = 1000;

const sb = useCluster({
  gateways: 1,
  workers: 1,
  env: {
    TRUSTED_PROXIES: '127.0.0.1,::1',
    AUTH_FAIL_THRESHOLD: '20',
    AUTH_JWKS_CACHE_MS: String(JWKS_CACHE_MS),
    AUTH_JWKS_COOLDOWN_MS: '100',
  },
});

before(async () => {
  await sb.ready;
});

after(() => auth.setJwksMode('ok'));

const bearer = (jwt) => `Bearer ${jwt}`;
/** A fresh documentation-range address, so each test has its own buckets. */
const address = () => `198.51.${1 + Math.floor(Math.random() * 250)}.${1 + Math.floor(Math.random() * 250)}`;
const xff = (ip) => ({ 'x-forwarded-for': ip });

/** Opens a socket with `handshakeAuth` and resolves with its connection:error. */
async function refused(url, handshakeAuth, headers, transports) {
  const socket = createSocket(url, { auth: handshakeAuth, userId: handshakeAuth?.userId, extraHeaders: headers, transports });
  socket.connect();
  try {
    const error = await waitFor(socket, 'connection:error', null, 10_000);
    assert.equal(error.reason, 'auth_error');
    return error;
  } finally {
    socket.disconnect();
  }
}

/** The sum of the samples of `name` whose labels include `labels`, from /metrics. */
async function metric(url, name, labels = {}) {
  const res = await fetch(`${url}/metrics`);
  const text = await res.text();
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+([0-9.eE+-]+)$/);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries([...(m[3] || '').matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(m[4]);
  }
  return sum;
}

// ---------------------------------------------------------------------------
// Finding 4: the throttle behind a proxy, and expired tokens
// ---------------------------------------------------------------------------

test("behind a trusted proxy, one client's forged tokens never lock out another client", async () => {
  const url = sb.url(0);
  const attacker = address();
  const victim = uid('victim');
  const forged = () => ({
    token: bearer(auth.token(victim, { key: auth.unpublishedKey().privateKey })), // bad signature, known kid
    userId: victim,
  });
  let last;
  for (let i = 0; i < 25; i++) {
    last = await refused(url, i % 2 ? forged() : { token: 'Bearer abc', userId: victim }, xff(attacker), ['websocket']);
  }
  assert.ok(last.reconnectAttempt >= 25, `the attacker's attempts are counted: ${last.reconnectAttempt}`);

  // Another client behind the same proxy: its own count, and it gets in, on both transports.
  const client = address();
  for (const transports of [['websocket'], ['polling']]) {
    const socket = await connectUser(url, victim, { extraHeaders: xff(client), transports });
    assert.equal(socket.success.userId, victim);
    socket.disconnect();
  }
  const own = await refused(url, { token: 'Bearer abc', userId: victim }, xff(client), ['polling']);
  assert.equal(own.reconnectAttempt, 1, 'failures are counted per client address, not per proxy');

  // The attacker's address is past the threshold: cheap failures fail fast...
  const throttledBefore = await metric(url, 'gateway_auth_failures_total', { reason: 'throttled' });
  const fast = await refused(url, { token: 'Bearer abc', userId: victim }, xff(attacker), ['websocket']);
  assert.ok(fast.reconnectAttempt > last.reconnectAttempt);
  assert.equal(await metric(url, 'gateway_auth_failures_total', { reason: 'throttled' }), throttledBefore + 1);
  // ...but a valid token is never refused, even from there.
  const fromAttacker = await connectUser(url, victim, { extraHeaders: xff(attacker), transports: ['websocket'] });
  assert.equal(fromAttacker.success.userId, victim);
});

test('without TRUSTED_PROXIES, X-Forwarded-For is ignored (a client cannot pick its address)', async () => {
  const cluster = await startCluster({ gateways: 1, workers: 0, env: { AUTH_FAIL_THRESHOLD: '1000' } });
  try {
    const url = cluster.url(0);
    const user = uid('spoof');
    let last;
    for (let i = 0; i < 4; i++) last = await refused(url, { token: 'Bearer abc', userId: user }, xff(address()), ['websocket']);
    assert.equal(last.reconnectAttempt, 4, 'every attempt counted against the one peer address');
  } catch (e) {
    cluster.printLogs();
    throw e;
  } finally {
    await cluster.stop();
  }
});

test('expired tokens do not count as abuse: 25 of them do not lock out their address', async () => {
  const url = sb.url(0);
  const ip = address();
  const user = uid('stale');
  const throttledBefore = await metric(url, 'gateway_auth_failures_total', { reason: 'throttled' });
  const expiredBefore = await metric(url, 'gateway_auth_failures_total', { reason: 'expired' });
  let last;
  for (let i = 0; i < 25; i++) {
    const token = auth.token(user, { exp: auth.now() - 60, iat: auth.now() - 120, nbf: auth.now() - 120 });
    last = await refused(url, { token: bearer(token), userId: user }, xff(ip), ['websocket']);
  }
  assert.equal(last.reconnectAttempt, 25, 'reconnectAttempt still counts every failure');
  assert.equal(await metric(url, 'gateway_auth_failures_total', { reason: 'expired' }), expiredBefore + 25);
  // Not over the threshold: a malformed token is verified normally, not fast-failed.
  await refused(url, { token: 'Bearer abc', userId: user }, xff(ip), ['websocket']);
  assert.equal(await metric(url, 'gateway_auth_failures_total', { reason: 'throttled' }), throttledBefore, 'nothing was throttled');
  const socket = await connectUser(url, user, { extraHeaders: xff(ip), transports: ['websocket'] });
  assert.equal(socket.success.userId, user);
});

// ---------------------------------------------------------------------------
// Finding 5: a hanging or failing JWKS endpoint
// ---------------------------------------------------------------------------

test('a hanging JWKS with a warm cache does not slow handshakes or REST calls', async () => {
  const url = sb.url(0);
  auth.setJwksMode('ok');
  (await connectUser(url, uid('warm'))).disconnect(); // the key is cached
  auth.setJwksMode('hang');
  try {
    await sleep(JWKS_CACHE_MS + 200); // the cached set is stale now
    const started = Date.now();
    const timings = await Promise.all(Array.from({ length: 4 }, async () => {
      const t0 = Date.now();
      const socket = await connectUser(url, uid('hang'), { transports: ['websocket'] });
      socket.disconnect();
      return Date.now() - t0;
    }));
    for (const ms of timings) assert.ok(ms < 1000, `handshake took ${ms} ms (${timings.join(', ')})`);
    for (let i = 0; i < 4; i++) {
      const t0 = Date.now();
      const socket = await connectUser(url, uid('hang-seq'), { transports: ['websocket'] });
      socket.disconnect();
      const ms = Date.now() - t0;
      assert.ok(ms < 1000, `sequential handshake took ${ms} ms`);
    }
    const t0 = Date.now();
    const res = await api(url, 'GET', '/api/channels', { token: auth.token(uid('rest')) });
    assert.equal(res.status, 200);
    assert.ok(Date.now() - t0 < 1000, `REST call took ${Date.now() - t0} ms`);
    assert.ok(Date.now() - started < 5000);
  } finally {
    auth.setJwksMode('ok');
  }
});

test('a failing JWKS is not asked once per handshake: back-off, and the last good keys keep working', async () => {
  const url = sb.url(0);
  auth.setJwksMode('ok');
  (await connectUser(url, uid('warm'))).disconnect();
  auth.setJwksMode('fail');
  try {
    await sleep(JWKS_CACHE_MS + 200);
    const fetchesBefore = auth.fetchCount;
    const started = Date.now();
    let calls = 0;
    while (Date.now() - started < 2500) {
      const socket = await connectUser(url, uid('fail'), { transports: ['websocket'] });
      socket.disconnect();
      const res = await api(url, 'GET', '/api/channels', { token: auth.token(uid('fail-rest')) });
      assert.equal(res.status, 200, 'the last good key set keeps verifying tokens');
      calls += 2;
    }
    const fetches = auth.fetchCount - fetchesBefore;
    assert.ok(calls >= 10, `only ${calls} calls in 2.5 s`);
    // Back-off 1 s, 2 s, …: about 2 fetches in 2.5 s, whatever the traffic.
    assert.ok(fetches <= 4, `${fetches} JWKS requests for ${calls} verifications`);
  } finally {
    auth.setJwksMode('ok');
  }
});

// ---------------------------------------------------------------------------
// Finding 7 (REST): the history anchor, the channel list, user upserts
// ---------------------------------------------------------------------------

test('history: before must be a message of the same channel (400 otherwise)', async () => {
  const url = sb.url(0);
  const user = uid('anchor');
  const a = await createChannel(url, user, 'anchor-a');
  const b = await createChannel(url, user, 'anchor-b');
  const socket = await connectUser(url, user);
  const inA = [];
  for (let i = 0; i < 3; i++) inA.push((await sendAndWait(socket, { content: `a${i}`, channelId: a.id, tempId: `a${i}` })).payload.messageId);
  const inB = (await sendAndWait(socket, { content: 'b0', channelId: b.id, tempId: 'b0' })).payload.messageId;

  const ok = await history(url, user, a.id, { before: inA[2] });
  assert.equal(ok.status, 200, ok.text);
  assert.deepEqual(ok.list.map((m) => m.id), [inA[1], inA[0]]);

  for (const [what, before] of [['a message of another channel', inB], ['an id that does not exist', randomUUID()]]) {
    const res = await history(url, user, a.id, { before });
    assert.equal(res.status, 400, `${what}: ${res.status} ${res.text}`);
    assert.equal(typeof res.body?.error, 'string');
  }
  // Both wrong anchors get the same answer: nothing tells them apart.
  const other = await history(url, user, a.id, { before: inB });
  const missing = await history(url, user, a.id, { before: randomUUID() });
  assert.deepEqual(other.body, missing.body);
});

test('GET /api/channels is paginated: limit, after, X-Next-Cursor and Link', async () => {
  const url = sb.url(0);
  const me = uid('pager');
  const someone = uid('other');
  const mine = [];
  for (let i = 0; i < 4; i++) mine.push((await createChannel(url, me, `mine-${i}-${randomHex(2)}`, i % 2 === 1)).id);
  const theirPublic = (await createChannel(url, someone, `theirs-${randomHex(2)}`, false)).id;
  const theirPrivate = (await createChannel(url, someone, `secret-${randomHex(2)}`, true)).id;
  const token = auth.token(me);

  const all = await api(url, 'GET', '/api/channels?limit=500', { token });
  assert.equal(all.status, 200, all.text);
  assert.ok(Array.isArray(all.body), 'the body is still the bare array old clients expect');
  assert.equal(all.headers.get('x-next-cursor'), null, 'everything fits in one page');
  const everything = all.body.map((c) => c.id);
  for (const id of [...mine, theirPublic]) assert.ok(everything.includes(id), `${id} listed`);
  assert.ok(!everything.includes(theirPrivate), "others' private channels are not listed");
  assert.deepEqual([...everything].sort(), everything, 'ordered by id (creation order)');

  const paged = [];
  let after = null;
  let pages = 0;
  for (;;) {
    const res = await api(url, 'GET', `/api/channels?limit=3${after ? `&after=${after}` : ''}`, { token });
    assert.equal(res.status, 200, res.text);
    assert.ok(res.body.length <= 3, `page of ${res.body.length}`);
    paged.push(...res.body.map((c) => c.id));
    pages++;
    const next = res.headers.get('x-next-cursor');
    if (!next) break;
    assert.equal(next, res.body[res.body.length - 1].id);
    assert.match(res.headers.get('link') || '', new RegExp(`after=${next}.*rel="next"`));
    after = next;
    assert.ok(pages < 100, 'pagination terminates');
  }
  assert.deepEqual(paged, everything, 'the pages together are the whole list, no gap, no duplicate');
  assert.ok(pages >= 2);

  const page = (await api(url, 'GET', `/api/channels?limit=2&after=${mine[0]}`, { token })).body;
  assert.ok(page.every((c) => c.id > mine[0]));
  assert.ok(page[0].isMember !== undefined && page[0].unreadCount !== undefined, 'same item shape');

  for (const q of ['limit=0', 'limit=501', 'limit=abc', 'after=not-an-id']) {
    const res = await api(url, 'GET', `/api/channels?${q}`, { token });
    assert.equal(res.status, 400, `${q}: ${res.status}`);
    assert.equal(typeof res.body?.error, 'string');
  }
});

test('users are upserted only when their claims change', async () => {
  const url = sb.url(0);
  const user = uid('claims');
  const channel = await createChannel(url, user, 'claims', false);
  const skippedBefore = await metric(url, 'gateway_user_upserts_total', { result: 'skipped' });
  for (let i = 0; i < 3; i++) {
    assert.equal((await api(url, 'GET', '/api/channels', { token: auth.token(user) })).status, 200);
  }
  assert.ok(await metric(url, 'gateway_user_upserts_total', { result: 'skipped' }) >= skippedBefore + 3, 'unchanged claims are not written again');

  // New claims are written: the next message shows the new name and avatar.
  const claims = { name: 'Renamed', image_url: 'https://img.test/a.png' };
  const socket = await connectUser(url, user, { tokenOptions: claims });
  await sendAndWait(socket, { content: 'hello', channelId: channel.id, tempId: 't1' });
  const res = await api(url, 'GET', `/api/channels/${channel.id}/messages`, { token: auth.token(user, claims) });
  assert.equal(res.status, 200, res.text);
  assert.equal(res.body[0].user.name, 'Renamed');
  assert.equal(res.body[0].user.imageUrl, 'https://img.test/a.png');
  // And the latest token wins again: back to the claims without a name.
  await api(url, 'GET', '/api/channels', { token: auth.token(user) });
  const back = await history(url, user, channel.id);
  assert.equal(back.list[0].user.name, user);
});
