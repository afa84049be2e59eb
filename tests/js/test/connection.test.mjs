// Connecting: both readings of the seed's URL, both transports, the channel
// list of connection:success, a send right after connect, and the ops endpoints.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  UUID_RE, addMember, api, connect, connectUser, createChannel, randomHex, uid, useCluster, waitFor,
} from '../lib/harness.mjs';

const sb = useCluster({ gateways: 1, workers: 1 });

/** Asserts the connection:success payload of `userId`. */
function assertSuccess(payload, userId) {
  assert.equal(payload.userId, userId);
  assert.ok(Array.isArray(payload.channels), `channels must be an array, got ${JSON.stringify(payload.channels)}`);
}

for (const way of ['namespace', 'path']) {
  test(`way "${way}" receives connection:success`, async () => {
    const user = uid('conn');
    const socket = await connectUser(sb.url(0), user, { way });
    assertSuccess(socket.success, user);
    assert.deepEqual(socket.success.channels, [], 'a new user is a member of no channel');
  });
}

for (const transport of ['websocket', 'polling']) {
  test(`${transport}-only transport connects and carries messages`, async () => {
    const user = uid(transport);
    const channel = await createChannel(sb.url(0), user);
    const socket = await connectUser(sb.url(0), user, { transports: [transport] });
    assertSuccess(socket.success, user);
    assert.equal(socket.io.engine.transport.name, transport);
    assert.deepEqual(socket.success.channels, [channel.id]);

    const tempId = `t-${randomHex(4)}`;
    socket.emit('message:send', { content: `over ${transport}`, channelId: channel.id, tempId });
    const delivered = await waitFor(socket, 'message:delivered', (p) => p.tempId === tempId && p.status === 'DELIVERED', 10_000);
    const created = await waitFor(socket, 'message:created', (p) => p.tempId === tempId);
    assert.equal(created.message.id, delivered.messageId);
    assert.equal(created.message.content, `over ${transport}`);
  });
}

test('connection:success lists exactly the channels the user is a member of', async () => {
  const alice = uid('alice');
  const bob = uid('bob');
  const url = sb.url(0);
  const a1 = await createChannel(url, alice, 'alice-public', false);
  const a2 = await createChannel(url, alice, 'alice-private', true);
  // Public, but alice never joined it: not hers.
  await createChannel(url, bob, 'bob-public', false);
  const socket = await connectUser(url, alice);
  assert.deepEqual([...socket.success.channels].sort(), [a1.id, a2.id].sort());
});

test('both ways share rooms and handlers', async () => {
  const alice = uid('alice');
  const bob = uid('bob');
  const url = sb.url(0);
  const channel = await createChannel(url, alice);
  assert.equal((await addMember(url, alice, channel.id, bob)).status, 201);
  const viaNamespace = await connectUser(url, alice, { way: 'namespace' });
  const viaPath = await connectUser(url, bob, { way: 'path' });
  assert.deepEqual(viaPath.success.channels, [channel.id]);

  viaNamespace.emit('message:send', { content: 'ns to path', channelId: channel.id, tempId: 'a' });
  const got = await waitFor(viaPath, 'message:created', (p) => p.tempId === 'a', 10_000);
  assert.equal(got.message.userId, alice);

  viaPath.emit('message:send', { content: 'path to ns', channelId: channel.id, tempId: 'b' });
  const back = await waitFor(viaNamespace, 'message:created', (p) => p.tempId === 'b', 10_000);
  assert.equal(back.message.userId, bob);
});

test('message:send emitted synchronously in the connect handler is processed (SENT then DELIVERED)', async () => {
  const user = uid('eager');
  const url = sb.url(0);
  const channel = await createChannel(url, user);
  const tempId = `eager-${randomHex(4)}`;
  const socket = await connect(url, {
    userId: user,
    onConnect: (s) => s.emit('message:send', { content: 'first thing', channelId: channel.id, tempId }),
  });
  const delivered = await waitFor(socket, 'message:delivered', (p) => p.tempId === tempId && p.status === 'DELIVERED', 10_000);
  const sent = await waitFor(socket, 'message:delivered', (p) => p.tempId === tempId && p.status === 'SENT');
  assert.match(sent.messageId, UUID_RE);
  assert.equal(delivered.messageId, sent.messageId, 'SENT and DELIVERED carry the same messageId');
  const events = socket.recorder.events.filter((e) => e.event === 'message:delivered' && e.payload.tempId === tempId);
  assert.deepEqual(events.map((e) => e.payload.status), ['SENT', 'DELIVERED'], 'SENT comes before DELIVERED, once each');
  // connection:success still arrives (before or after the status events).
  await waitFor(socket, 'connection:success');
});

test('/healthz, /readyz and /metrics answer 200', async () => {
  const url = sb.url(0);
  const health = await api(url, 'GET', '/healthz');
  assert.equal(health.status, 200);
  const ready = await api(url, 'GET', '/readyz');
  assert.equal(ready.status, 200);
  const metrics = await api(url, 'GET', '/metrics');
  assert.equal(metrics.status, 200);
  assert.match(metrics.headers.get('content-type') || '', /^text\/plain/);
  assert.ok(metrics.text.includes('# TYPE'), 'Prometheus text format has # TYPE lines');
});
