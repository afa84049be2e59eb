// Channels and membership (CONTRACT §3, §6) on two gateways and two workers,
// with the users spread over both nodes: channel:join (ack, user_joined,
// rooms of every socket of the joiner, idempotency, every error), message:send
// before and after joining, and REST invitations / channel creation putting
// live sockets in the room.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import {
  ISO_RE, addMember, api, auth, connectUser, createChannel, emitAck, listOf, mark, randomHex, received, sendAndWait,
  sleep, uid, useCluster, waitFor,
} from '../lib/harness.mjs';

const sb = useCluster({ gateways: 2, workers: 2 });

/** How long to keep listening before concluding that an event did not come. */
const QUIET_MS = 700;

const listChannels = async (url, userId) => {
  const res = await api(url, 'GET', '/api/channels', { token: auth.token(userId) });
  assert.equal(res.status, 200, res.text);
  return listOf(res.body, 'channels');
};

/** channel:user_joined events of `userId` for `channelId` a socket recorded (from index `from` on). */
const joinedEvents = (socket, channelId, userId, from = 0) =>
  received(socket, 'channel:user_joined', (p, e) => e.index >= from && p.channelId === channelId && p.userId === userId);

/** Sends `content` as `socket`, expects DELIVERED, and waits until every socket of `receivers` got it. */
async function sendSeenBy(socket, channelId, receivers, label = 'm') {
  const tempId = `${label}-${randomHex(4)}`;
  const out = await sendAndWait(socket, { content: `hello ${tempId}`, channelId, tempId });
  assert.equal(out.status, 'DELIVERED', JSON.stringify(out.payload));
  await Promise.all(receivers.map((r) => waitFor(r, 'message:created', (p) => p.tempId === tempId, 10_000)));
  return { tempId, messageId: out.payload.messageId };
}

test('channel:join of a public channel: ack, user_joined to the room (joiner included), every socket of the joiner enters the room', async () => {
  const ownerId = uid('owner');
  const joinerId = uid('joiner');
  const outsiderId = uid('outsider');
  const channel = await createChannel(sb.url(0), ownerId, `pub-${randomHex(3)}`, false);
  const [owner, joinerA, joinerB, outsider] = await Promise.all([
    connectUser(sb.url(0), ownerId),
    connectUser(sb.url(1), joinerId),
    connectUser(sb.url(0), joinerId), // the joiner's other device, on the other node
    connectUser(sb.url(1), outsiderId),
  ]);
  assert.deepEqual(owner.success.channels, [channel.id]);
  assert.deepEqual(joinerA.success.channels, []);

  const ack = await emitAck(joinerA, 'channel:join', { channelId: channel.id }, 10_000);
  assert.deepEqual(ack, { ok: true, channelId: channel.id, userId: joinerId });

  // The room, the joiner included, hears of it, on both nodes.
  for (const s of [owner, joinerA]) {
    const joined = await waitFor(s, 'channel:user_joined', (p) => p.userId === joinerId, 10_000);
    assert.equal(joined.channelId, channel.id);
    assert.match(joined.timestamp, ISO_RE);
    assert.ok(!Number.isNaN(Date.parse(joined.timestamp)));
  }

  // Both sockets of the joiner (one per node) now receive the channel's messages.
  const m = await sendSeenBy(owner, channel.id, [owner, joinerA, joinerB], 'after-join');

  await sleep(QUIET_MS);
  assert.equal(joinedEvents(owner, channel.id, joinerId).length, 1, 'exactly one user_joined for the owner');
  assert.equal(joinedEvents(joinerA, channel.id, joinerId).length, 1, 'exactly one user_joined for the joining socket');
  assert.deepEqual(received(joinerA, 'channel:error'), []);
  assert.deepEqual(received(outsider, 'channel:user_joined'), [], 'a non-member hears nothing of the join');
  assert.deepEqual(received(outsider, 'message:created'), []);
  for (const s of [joinerA, joinerB]) {
    assert.equal(received(s, 'message:created', (p) => p.tempId === m.tempId).length, 1, 'one message:created per socket');
  }

  // Persisted: listed as a member, and in the next connection:success.
  const listed = (await listChannels(sb.url(0), joinerId)).filter((c) => c.id === channel.id);
  assert.equal(listed.length, 1);
  assert.equal(listed[0].isMember, true);
  const again = await connectUser(sb.url(0), joinerId);
  assert.deepEqual(again.success.channels, [channel.id]);
});

test('channel:join without an acknowledgement callback works the same', async () => {
  const ownerId = uid('owner');
  const joinerId = uid('joiner');
  const channel = await createChannel(sb.url(1), ownerId, `pub-${randomHex(3)}`, false);
  const [owner, joiner] = await Promise.all([connectUser(sb.url(1), ownerId), connectUser(sb.url(0), joinerId)]);
  joiner.emit('channel:join', { channelId: channel.id });
  await waitFor(owner, 'channel:user_joined', (p) => p.userId === joinerId && p.channelId === channel.id, 10_000);
  await waitFor(joiner, 'channel:user_joined', (p) => p.userId === joinerId && p.channelId === channel.id, 10_000);
  await sendSeenBy(joiner, channel.id, [owner, joiner], 'no-ack');
});

test('joining again is no error: ack ok, user_joined on the caller only, no broadcast, no second membership', async () => {
  const ownerId = uid('owner');
  const joinerId = uid('joiner');
  const channel = await createChannel(sb.url(0), ownerId, `pub-${randomHex(3)}`, false);
  const [owner, joinerA, joinerB] = await Promise.all([
    connectUser(sb.url(0), ownerId),
    connectUser(sb.url(1), joinerId),
    connectUser(sb.url(0), joinerId),
  ]);
  assert.deepEqual(await emitAck(joinerA, 'channel:join', { channelId: channel.id }, 10_000), { ok: true, channelId: channel.id, userId: joinerId });
  await waitFor(owner, 'channel:user_joined', (p) => p.userId === joinerId, 10_000);
  await waitFor(joinerA, 'channel:user_joined', (p) => p.userId === joinerId, 10_000);
  // Let joinerB enter the room too, and every first-join event settle.
  await sendSeenBy(owner, channel.id, [joinerA, joinerB], 'settle');
  await sleep(QUIET_MS);

  // Again, from the same socket and from the other device on the other node.
  const fromOwner = mark(owner);
  const fromA = mark(joinerA);
  const fromB = mark(joinerB);
  const ackA = await emitAck(joinerA, 'channel:join', { channelId: channel.id }, 10_000);
  assert.deepEqual(ackA, { ok: true, channelId: channel.id, userId: joinerId });
  const own = await waitFor(joinerA, 'channel:user_joined', (p, e) => e.index >= fromA && p.userId === joinerId, 10_000);
  assert.equal(own.channelId, channel.id);
  assert.match(own.timestamp, ISO_RE);
  await sleep(QUIET_MS);
  assert.equal(joinedEvents(joinerA, channel.id, joinerId, fromA).length, 1, 'the caller gets exactly one user_joined');
  assert.deepEqual(joinedEvents(owner, channel.id, joinerId, fromOwner), [], 'nothing is broadcast to the others');
  assert.deepEqual(joinedEvents(joinerB, channel.id, joinerId, fromB), [], "not even to the joiner's other socket");

  const fromA2 = mark(joinerA);
  const ackB = await emitAck(joinerB, 'channel:join', { channelId: channel.id }, 10_000);
  assert.deepEqual(ackB, { ok: true, channelId: channel.id, userId: joinerId });
  await waitFor(joinerB, 'channel:user_joined', (p, e) => e.index >= fromB && p.userId === joinerId, 10_000);
  await sleep(QUIET_MS);
  assert.equal(joinedEvents(joinerB, channel.id, joinerId, fromB).length, 1);
  assert.deepEqual(joinedEvents(owner, channel.id, joinerId, fromOwner), [], 'still nothing broadcast');
  assert.deepEqual(joinedEvents(joinerA, channel.id, joinerId, fromA2), []);
  assert.deepEqual(received(joinerA, 'channel:error'), []);
  assert.deepEqual(received(joinerB, 'channel:error'), []);

  // Still one membership: one message:created per socket, one list entry, one id in connection:success, 409 on invite.
  const m = await sendSeenBy(owner, channel.id, [joinerA, joinerB], 'once');
  await sleep(QUIET_MS);
  for (const s of [joinerA, joinerB]) assert.equal(received(s, 'message:created', (p) => p.tempId === m.tempId).length, 1);
  assert.equal((await listChannels(sb.url(1), joinerId)).filter((c) => c.id === channel.id).length, 1);
  const next = await connectUser(sb.url(1), joinerId);
  assert.deepEqual(next.success.channels, [channel.id]);
  const invite = await addMember(sb.url(0), ownerId, channel.id, joinerId);
  assert.equal(invite.status, 409, `already a member: ${invite.status} ${invite.text}`);
});

test('joining a public channel created by oneself (already a member) is the idempotent case too', async () => {
  const ownerId = uid('owner');
  const memberId = uid('member');
  const channel = await createChannel(sb.url(0), ownerId, `pub-${randomHex(3)}`, false);
  assert.equal((await addMember(sb.url(0), ownerId, channel.id, memberId)).status, 201);
  const [owner, member] = await Promise.all([connectUser(sb.url(1), ownerId), connectUser(sb.url(0), memberId)]);
  const ack = await emitAck(owner, 'channel:join', { channelId: channel.id }, 10_000);
  assert.deepEqual(ack, { ok: true, channelId: channel.id, userId: ownerId });
  await waitFor(owner, 'channel:user_joined', (p) => p.userId === ownerId && p.channelId === channel.id, 10_000);
  await sleep(QUIET_MS);
  assert.equal(joinedEvents(owner, channel.id, ownerId).length, 1);
  assert.deepEqual(received(member, 'channel:user_joined'), [], 'no broadcast');
});

test('channel:join of a private channel: refused without membership, idempotent for an invited member', async () => {
  const ownerId = uid('owner');
  const memberId = uid('member');
  const strangerId = uid('stranger');
  const channel = await createChannel(sb.url(0), ownerId, `priv-${randomHex(3)}`, true);
  assert.equal((await addMember(sb.url(0), ownerId, channel.id, memberId)).status, 201);
  const [owner, member, stranger] = await Promise.all([
    connectUser(sb.url(0), ownerId),
    connectUser(sb.url(1), memberId),
    connectUser(sb.url(1), strangerId),
  ]);

  // A stranger is refused, by event and by ack.
  const ack = await emitAck(stranger, 'channel:join', { channelId: channel.id }, 10_000);
  assert.deepEqual(ack, { ok: false, error: 'This channel is private' });
  const err = await waitFor(stranger, 'channel:error', null, 10_000);
  assert.deepEqual(err, { channelId: channel.id, error: 'This channel is private' });
  // And without an ack callback, the event alone.
  const from = mark(stranger);
  stranger.emit('channel:join', { channelId: channel.id });
  const err2 = await waitFor(stranger, 'channel:error', (p, e) => e.index >= from, 10_000);
  assert.deepEqual(err2, { channelId: channel.id, error: 'This channel is private' });

  // The invited member may "join": ack ok, user_joined to itself only (already a member).
  const memberAck = await emitAck(member, 'channel:join', { channelId: channel.id }, 10_000);
  assert.deepEqual(memberAck, { ok: true, channelId: channel.id, userId: memberId });
  await waitFor(member, 'channel:user_joined', (p) => p.userId === memberId && p.channelId === channel.id, 10_000);

  // The stranger is still outside: receives nothing, cannot post.
  const m = await sendSeenBy(owner, channel.id, [owner, member], 'private');
  const failed = await sendAndWait(stranger, { content: 'let me in', channelId: channel.id, tempId: 'intruder' });
  assert.equal(failed.status, 'FAILED');
  assert.equal(failed.payload.error, 'You are not a member of this channel');
  await sleep(QUIET_MS);
  assert.deepEqual(received(stranger, 'message:created'), [], 'the refused user is not in the room');
  assert.deepEqual(received(stranger, 'channel:user_joined'), []);
  assert.deepEqual(received(owner, 'channel:user_joined'), [], 'neither the refusal nor the repeat join is broadcast');
  assert.equal(received(member, 'message:created', (p) => p.tempId === m.tempId).length, 1);
  assert.ok(!(await listChannels(sb.url(1), strangerId)).some((c) => c.id === channel.id), 'no membership was created');
  assert.deepEqual((await connectUser(sb.url(0), strangerId)).success.channels, []);
});

test('channel:join errors: unknown or malformed id, missing channelId, payload not an object', async () => {
  const userId = uid('lost');
  const socket = await connectUser(sb.url(1), userId);
  const unknown = randomUUID();
  // [name, payload, expected channel:error payload]
  const cases = [
    ['unknown id', { channelId: unknown }, { channelId: unknown, error: 'Channel not found' }],
    ['not a UUID', { channelId: 'general' }, { channelId: 'general', error: 'Channel not found' }],
    ['empty string', { channelId: '' }, { channelId: '', error: 'Channel not found' }],
    ['missing channelId', {}, { channelId: null, error: 'channelId is required' }],
    ['channelId null', { channelId: null }, { channelId: null, error: 'channelId is required' }],
    ['payload a string', 'general', { channelId: null, error: 'channelId is required' }],
    ['payload a number', 42, { channelId: null, error: 'channelId is required' }],
    ['payload null', null, { channelId: null, error: 'channelId is required' }],
  ];
  for (const [name, payload, expected] of cases) {
    let from = mark(socket);
    const ack = await emitAck(socket, 'channel:join', payload, 10_000).catch((e) => assert.fail(`${name}: no ack: ${e.message}`));
    assert.deepEqual(ack, { ok: false, error: expected.error }, `${name}: ack`);
    const err = await waitFor(socket, 'channel:error', (p, e) => e.index >= from, 10_000).catch((e) => assert.fail(`${name}: ${e.message}`));
    assert.deepEqual(err, expected, `${name}: channel:error`);

    from = mark(socket);
    socket.emit('channel:join', payload);
    const err2 = await waitFor(socket, 'channel:error', (p, e) => e.index >= from, 10_000).catch((e) => assert.fail(`${name} (no ack): ${e.message}`));
    assert.deepEqual(err2, expected, `${name} (no ack): channel:error`);
  }
  await sleep(QUIET_MS);
  assert.equal(received(socket, 'channel:error').length, cases.length * 2, 'one channel:error per attempt');
  assert.deepEqual(received(socket, 'channel:user_joined'), []);
  assert.ok(socket.connected, 'the socket stays connected');
  // The socket still works.
  const channel = await createChannel(sb.url(0), uid('owner'), `pub-${randomHex(3)}`, false);
  assert.deepEqual(await emitAck(socket, 'channel:join', { channelId: channel.id }, 10_000), { ok: true, channelId: channel.id, userId });
});

test('message:send before joining fails with "You are not a member of this channel"; after joining it is delivered', async () => {
  const ownerId = uid('owner');
  const userId = uid('newcomer');
  const channel = await createChannel(sb.url(0), ownerId, `pub-${randomHex(3)}`, false);
  const [owner, user] = await Promise.all([connectUser(sb.url(0), ownerId), connectUser(sb.url(1), userId)]);

  const before = await sendAndWait(user, { content: 'too early', channelId: channel.id, tempId: 'early' });
  assert.equal(before.status, 'FAILED');
  assert.equal(before.payload.error, 'You are not a member of this channel');
  assert.equal(before.payload.tempId, 'early');

  assert.deepEqual(await emitAck(user, 'channel:join', { channelId: channel.id }, 10_000), { ok: true, channelId: channel.id, userId });
  const created = await sendSeenBy(user, channel.id, [owner, user], 'late');
  await sleep(QUIET_MS);
  assert.deepEqual(received(owner, 'message:created').map((p) => p.tempId), [created.tempId], 'only the message sent after joining');
  const hist = await api(sb.url(1), 'GET', `/api/channels/${channel.id}/messages`, { token: auth.token(ownerId) });
  assert.deepEqual(listOf(hist.body, 'messages').map((m) => m.id), [created.messageId]);
});

test('a REST invitation puts every connected socket of the invitee (both nodes) in the room at once', async () => {
  const ownerId = uid('owner');
  const inviteeId = uid('invitee');
  const channel = await createChannel(sb.url(0), ownerId, `priv-${randomHex(3)}`, true);
  const [owner, inviteeA, inviteeB] = await Promise.all([
    connectUser(sb.url(0), ownerId),
    connectUser(sb.url(0), inviteeId),
    connectUser(sb.url(1), inviteeId),
  ]);
  await sendSeenBy(owner, channel.id, [owner], 'before');

  const res = await addMember(sb.url(1), ownerId, channel.id, inviteeId);
  assert.equal(res.status, 201, res.text);

  const m = await sendSeenBy(owner, channel.id, [inviteeA, inviteeB], 'after');
  await sleep(QUIET_MS);
  for (const s of [inviteeA, inviteeB]) {
    assert.deepEqual(received(s, 'message:created').map((p) => p.tempId), [m.tempId], 'only messages after the invitation, once');
  }
  // Either socket may post at once.
  await sendSeenBy(inviteeB, channel.id, [owner, inviteeA], 'reply');
  const next = await connectUser(sb.url(1), inviteeId);
  assert.deepEqual(next.success.channels, [channel.id]);
});

test("creating a channel by REST puts the creator's connected sockets (both nodes) in its room", async () => {
  const creatorId = uid('creator');
  const joinerId = uid('joiner');
  const [creatorA, creatorB, joiner] = await Promise.all([
    connectUser(sb.url(0), creatorId),
    connectUser(sb.url(1), creatorId),
    connectUser(sb.url(0), joinerId),
  ]);
  const channel = await createChannel(sb.url(1), creatorId, `fresh-${randomHex(3)}`, false);

  // Someone joins: both sockets of the creator are in the room and hear it.
  assert.deepEqual(await emitAck(joiner, 'channel:join', { channelId: channel.id }, 10_000), { ok: true, channelId: channel.id, userId: joinerId });
  for (const s of [creatorA, creatorB]) {
    const joined = await waitFor(s, 'channel:user_joined', (p) => p.userId === joinerId, 10_000);
    assert.equal(joined.channelId, channel.id);
  }
  // The creator posts from either socket without reconnecting, and both receive it.
  await sendSeenBy(creatorA, channel.id, [creatorA, creatorB, joiner], 'from-a');
  await sendSeenBy(creatorB, channel.id, [creatorA, creatorB, joiner], 'from-b');
});
