// Presence and typing (CONTRACT §11, §6 /presence), with the stock socket.io-client across two
// gateways (one in embedded mode): who is online as sockets come and go on both nodes, the
// offline grace that keeps a flapping connection quiet, a gateway killed with kill -9 taking its
// users offline, the PRESENCE_MAX_MEMBERS cut, and typing indicators (to the other members only,
// throttled, stopped by the server when not renewed).
//
// Timings are shortened for the suite (grace 1.5 s, TTL 3 s, typing timeout 1.5 s); the defaults
// (5 s, 25 s, 6 s) are the same code with other numbers.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  MODE, addMember, api, auth, connectUser, createChannel, mark, needsCluster, received, sleep, startCluster,
  uid, useCluster, waitFor,
} from '../lib/harness.mjs';

const GRACE_MS = 1500;
const TYPING_TIMEOUT_MS = 1500;
const env = {
  PRESENCE_OFFLINE_GRACE_MS: GRACE_MS,
  PRESENCE_SWEEP_MS: 250,
  PRESENCE_MAX_MEMBERS: 3,
  TYPING_TIMEOUT_MS,
  CONNECTION_HEARTBEAT_MS: 1000,
  CONNECTION_TTL_MS: 3000,
};
const sb = useCluster({ gateways: 2, workers: 1, env });

/** A channel of `owner` with `members` added. */
async function channelWith(owner, ...members) {
  const channel = await createChannel(sb.url(0), owner);
  for (const m of members) assert.equal((await addMember(sb.url(0), owner, channel.id, m)).status, 201);
  return channel;
}

const presenceOf = (socket, channelId, userId, from = 0) => received(socket, 'presence:changed', (p, e) => e.index >= from && p.channelId === channelId && p.userId === userId);

test('online and offline follow the sockets of a user on both gateways; connection:success lists who is online', async () => {
  await sb.ready;
  const alice = uid('alice');
  const bob = uid('bob');
  const channel = await channelWith(alice, bob);

  const bobSocket = await connectUser(sb.url(1), bob);
  assert.deepEqual(bobSocket.success.online[channel.id], [bob], 'only bob is online');

  const a1 = await connectUser(sb.url(0), alice);
  const online = await waitFor(bobSocket, 'presence:changed', (p) => p.userId === alice);
  assert.deepEqual({ ...online, timestamp: 'x' }, { channelId: channel.id, userId: alice, online: true, timestamp: 'x' });
  assert.ok(!Number.isNaN(Date.parse(online.timestamp)));
  assert.deepEqual(a1.success.online[channel.id], [alice, bob].sort());

  // A second socket on the other node, then the first closes: still online, no event.
  const from = mark(bobSocket);
  const a2 = await connectUser(sb.url(1), alice);
  a1.disconnect();
  await sleep(GRACE_MS + 1000);
  assert.deepEqual(presenceOf(bobSocket, channel.id, alice, from), [], 'no change while a socket remains');
  const rest = await api(sb.url(0), 'GET', `/api/channels/${channel.id}/presence`, { token: auth.token(bob) });
  assert.equal(rest.status, 200);
  assert.deepEqual(rest.body, { channelId: channel.id, online: [alice, bob].sort(), count: 2 });

  // The last closes: offline after the grace.
  const closedAt = Date.now();
  a2.disconnect();
  const offline = await waitFor(bobSocket, 'presence:changed', (p, e) => e.index >= from && p.userId === alice, 10_000);
  assert.equal(offline.online, false);
  const took = Date.now() - closedAt;
  assert.ok(took >= GRACE_MS - 100, `offline after the grace, not before (${took} ms)`);
  const after = await api(sb.url(1), 'GET', `/api/channels/${channel.id}/presence`, { token: auth.token(bob) });
  assert.deepEqual(after.body, { channelId: channel.id, online: [bob], count: 1 });
});

test('a disconnect and reconnect within the grace sends no presence:changed at all', async () => {
  await sb.ready;
  const alice = uid('flap');
  const bob = uid('watch');
  const channel = await channelWith(alice, bob);
  const bobSocket = await connectUser(sb.url(1), bob);
  let a = await connectUser(sb.url(0), alice);
  await waitFor(bobSocket, 'presence:changed', (p) => p.userId === alice && p.online);
  const from = mark(bobSocket);
  for (let i = 0; i < 3; i++) {
    a.disconnect();
    await sleep(200);
    a = await connectUser(sb.url(i % 2), alice);
  }
  await sleep(GRACE_MS + 1000);
  assert.deepEqual(presenceOf(bobSocket, channel.id, alice, from), [], 'flapping is invisible');
});

test('channels above PRESENCE_MAX_MEMBERS get no presence events and no online list; REST still answers', async () => {
  await sb.ready;
  const owner = uid('big');
  const members = [uid('m1'), uid('m2'), uid('m3')];
  const big = await channelWith(owner, ...members); // 4 members > 3
  const small = await channelWith(owner, members[0]); // 2 members
  const watcher = await connectUser(sb.url(1), members[0]);
  assert.ok(!(big.id in watcher.success.online), 'no online list for the big channel');
  assert.deepEqual(watcher.success.online[small.id], [members[0]]);
  const from = mark(watcher);
  await connectUser(sb.url(0), owner);
  await waitFor(watcher, 'presence:changed', (p, e) => e.index >= from && p.userId === owner && p.channelId === small.id);
  await sleep(500);
  assert.deepEqual(presenceOf(watcher, big.id, owner, from), [], 'nothing for the big channel');
  const rest = await api(sb.url(0), 'GET', `/api/channels/${big.id}/presence`, { token: auth.token(members[1]) });
  assert.deepEqual(rest.body, { channelId: big.id, online: [members[0], owner].sort(), count: 2 });
});

test('GET /presence: members only (403), unknown channel 404, no token 401', async () => {
  await sb.ready;
  const owner = uid('own');
  const channel = await createChannel(sb.url(0), owner);
  const stranger = await api(sb.url(0), 'GET', `/api/channels/${channel.id}/presence`, { token: auth.token(uid('x')) });
  assert.equal(stranger.status, 403);
  const unknown = await api(sb.url(0), 'GET', `/api/channels/0190c3a0-0000-7000-8000-000000000000/presence`, { token: auth.token(owner) });
  assert.equal(unknown.status, 404);
  const anonymous = await api(sb.url(0), 'GET', `/api/channels/${channel.id}/presence`, {});
  assert.equal(anonymous.status, 401);
});

test('typing reaches the other members on both gateways, not the typist nor non-members; non-members cannot type', async () => {
  await sb.ready;
  const alice = uid('typist');
  const bob = uid('reader');
  const carol = uid('outsider');
  const channel = await channelWith(alice, bob);
  const other = await createChannel(sb.url(0), carol);
  const bobSocket = await connectUser(sb.url(1), bob);
  const carolSocket = await connectUser(sb.url(0), carol);
  const a1 = await connectUser(sb.url(0), alice);
  const a2 = await connectUser(sb.url(1), alice);

  a1.emit('typing:start', { channelId: channel.id });
  const typing = await waitFor(bobSocket, 'typing', (p) => p.userId === alice);
  assert.deepEqual(typing, { channelId: channel.id, userId: alice, typing: true });
  // A non-member's typing into the channel is dropped; so is garbage.
  carolSocket.emit('typing:start', { channelId: channel.id });
  carolSocket.emit('typing:start', { nope: 1 });
  carolSocket.emit('typing:start', 'garbage');
  carolSocket.emit('typing:start', { channelId: other.id }); // her own channel: fine, nobody else there
  a1.emit('typing:stop', { channelId: channel.id });
  await waitFor(bobSocket, 'typing', (p) => p.userId === alice && p.typing === false, 5000);
  await sleep(300);
  assert.deepEqual(received(bobSocket, 'typing', (p) => p.userId === carol), [], 'no typing from a non-member');
  assert.deepEqual(received(carolSocket, 'typing'), [], 'a non-member sees nothing');
  assert.deepEqual(received(a1, 'typing'), [], 'the typist sees nothing of their own');
  assert.deepEqual(received(a2, 'typing'), [], 'nor do their other sockets');
  // The connection keeps serving.
  const res = await new Promise((resolve) => carolSocket.emit('channel:join', { channelId: channel.id }, resolve));
  assert.equal(res.ok, true);
});

test('typing is throttled to one event per second per user and channel, and stopped by the server when not renewed', async () => {
  await sb.ready;
  const alice = uid('fast');
  const bob = uid('slow');
  const channel = await channelWith(alice, bob);
  const bobSocket = await connectUser(sb.url(1), bob);
  const a = await connectUser(sb.url(0), alice);
  const from = mark(bobSocket);
  const started = Date.now();
  for (let i = 0; i < 10; i++) {
    a.emit('typing:start', { channelId: channel.id });
    await sleep(50);
  }
  // No more renewals: the server says typing: false after TYPING_TIMEOUT_MS.
  const stop = await waitFor(bobSocket, 'typing', (p, e) => e.index >= from && p.typing === false, 10_000);
  const took = Date.now() - started;
  assert.equal(stop.userId, alice);
  assert.ok(took >= TYPING_TIMEOUT_MS, `auto-stop after the timeout (${took} ms)`);
  const events = received(bobSocket, 'typing', (p, e) => e.index >= from && p.userId === alice);
  assert.deepEqual(events.map((p) => p.typing), [true, false], 'one start for ten, then the automatic stop');
});

test('closing the typist\'s socket stops their typing at once, not at the timeout', async () => {
  await sb.ready;
  const alice = uid('closer');
  const bob = uid('watcher');
  const channel = await channelWith(alice, bob);
  const bobSocket = await connectUser(sb.url(1), bob);
  const a = await connectUser(sb.url(0), alice);
  a.emit('typing:start', { channelId: channel.id });
  await waitFor(bobSocket, 'typing', (p) => p.userId === alice && p.typing);
  await sleep(1100); // past the throttle interval
  a.emit('typing:start', { channelId: channel.id }); // renewed: would last TYPING_TIMEOUT_MS more
  await sleep(100);
  const closedAt = Date.now();
  a.disconnect();
  await waitFor(bobSocket, 'typing', (p) => p.userId === alice && !p.typing, 5000);
  const took = Date.now() - closedAt;
  assert.ok(took < TYPING_TIMEOUT_MS - 300, `typing: false ${took} ms after the close`);
});

test('a gateway killed with kill -9 takes its users offline within the connection TTL', async (t) => {
  if (needsCluster(t)) return;
  const cluster = await startCluster({ gateways: 2, workers: 1, env });
  try {
    const alice = uid('doomed');
    const bob = uid('survivor');
    const channel = await createChannel(cluster.url(0), alice);
    assert.equal((await addMember(cluster.url(0), alice, channel.id, bob)).status, 201);
    const bobSocket = await connectUser(cluster.url(1), bob);
    await connectUser(cluster.url(0), alice);
    await waitFor(bobSocket, 'presence:changed', (p) => p.userId === alice && p.online);
    const killedAt = Date.now();
    cluster.gateways[0].expectedExit = true;
    await cluster.killGateway(0, 'SIGKILL');
    const offline = await waitFor(bobSocket, 'presence:changed', (p) => p.userId === alice && !p.online, 15_000);
    const took = Date.now() - killedAt;
    assert.equal(offline.channelId, channel.id);
    // TTL 3 s here (25 s by default): the heartbeat stops, the entry expires, a sweep on the
    // surviving node reports it.
    assert.ok(took <= Number(env.CONNECTION_TTL_MS) + 3000, `offline ${took} ms after the kill`);
    t.diagnostic(`offline ${took} ms after kill -9 (CONNECTION_TTL_MS ${env.CONNECTION_TTL_MS})`);
  } catch (e) {
    cluster.printLogs();
    throw e;
  } finally {
    await cluster.stop({ quiet: true });
  }
});

if (MODE === 'embedded') {
  test('embedded mode keeps presence in memory', async () => {
    await sb.ready;
    const a = uid('emb');
    const socket = await connectUser(sb.url(0), a);
    const channel = await createChannel(sb.url(0), a);
    const rest = await api(sb.url(0), 'GET', `/api/channels/${channel.id}/presence`, { token: auth.token(a) });
    assert.deepEqual(rest.body, { channelId: channel.id, online: [a], count: 1 });
    socket.disconnect();
  });
}
