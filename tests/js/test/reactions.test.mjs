// Reactions (CONTRACT §5) and read receipts (§4 message:read, §6 unreadCount)
// on two gateways and two workers, with the members spread over both nodes:
// broadcasts, acknowledgements, idempotency, every error, history, unread
// counts, 30 users reacting at once, and a reaction never overtaking its
// message.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import {
  ISO_RE, UUID_RE, addMember, api, auth, connectUser, createChannel, emitAck, history, listOf, mark, randomHex,
  received, sendAndWait, sleep, uid, useCluster, waitFor, waitForCount,
} from '../lib/harness.mjs';

const sb = useCluster({ gateways: 2, workers: 2 });

/** How long to keep listening before concluding that an event did not come. */
const QUIET_MS = 700;

const TYPE_ERROR = 'type must be a non-empty string of at most 64 bytes';
const NOT_MEMBER = 'You are not a member of this channel';

/**
 * A fresh channel: its author (owner, gateway 0), a member on gateway 1, the
 * member's second device on gateway 0, and an outsider (gateway 1, not a
 * member), all connected.
 */
async function room({ isPrivate = true } = {}) {
  const authorId = uid('author');
  const memberId = uid('member');
  const outsiderId = uid('outsider');
  const channel = await createChannel(sb.url(0), authorId, `room-${randomHex(3)}`, isPrivate);
  const invited = await addMember(sb.url(0), authorId, channel.id, memberId);
  assert.equal(invited.status, 201, invited.text);
  const [author, member, member2, outsider] = await Promise.all([
    connectUser(sb.url(0), authorId),
    connectUser(sb.url(1), memberId),
    connectUser(sb.url(0), memberId),
    connectUser(sb.url(1), outsiderId),
  ]);
  return { channel, author, member, member2, outsider, authorId, memberId, outsiderId, members: [author, member, member2] };
}

/** Posts as `socket`; resolves with the message id once every socket of `seenBy` got its message:created. */
async function post(socket, channelId, seenBy, content = `msg ${randomHex(3)}`) {
  const tempId = `t-${randomHex(5)}`;
  const out = await sendAndWait(socket, { content, channelId, tempId });
  assert.equal(out.status, 'DELIVERED', JSON.stringify(out.payload));
  await Promise.all(seenBy.map((s) => waitFor(s, 'message:created', (p) => p.tempId === tempId, 10_000)));
  return out.payload.messageId;
}

/** The reactions of one message in history, as seen by `userId`. */
async function reactionsOf(userId, channelId, messageId, url = sb.url(0)) {
  const res = await history(url, userId, channelId, { limit: 100 });
  assert.equal(res.status, 200, res.text);
  const message = res.list.find((m) => m.id === messageId);
  assert.ok(message, `message ${messageId} in history`);
  assert.ok(Array.isArray(message.reactions), `reactions is an array: ${JSON.stringify(message)}`);
  return message.reactions;
}

const addedOf = (socket, messageId, type, from = 0) =>
  received(socket, 'reaction:added', (p, e) => e.index >= from && p.messageId === messageId && (type === undefined || p.reaction.type === type));
const removedOf = (socket, messageId, type, from = 0) =>
  received(socket, 'reaction:removed', (p, e) => e.index >= from && p.messageId === messageId && (type === undefined || p.type === type));
const readsOf = (socket, from = 0) => received(socket, 'message:read', (p, e) => e.index >= from);

/** The channel as `userId` sees it in GET /api/channels (undefined if not listed). */
async function listed(userId, channelId, url = sb.url(0)) {
  const res = await api(url, 'GET', '/api/channels', { token: auth.token(userId) });
  assert.equal(res.status, 200, res.text);
  return listOf(res.body, 'channels').find((c) => c.id === channelId);
}
const unreadOf = async (userId, channelId, url) => (await listed(userId, channelId, url))?.unreadCount;

// ---------------------------------------------------------------------------
// reaction:add / reaction:remove
// ---------------------------------------------------------------------------

test('reaction:add: ack, reaction:added to every member socket on both nodes, in history', async () => {
  const r = await room();
  const messageId = await post(r.author, r.channel.id, r.members);

  const ack = await emitAck(r.member, 'reaction:add', { messageId, type: '👍' }, 10_000);
  assert.deepEqual(ack, { ok: true, messageId, type: '👍' });
  const seen = await Promise.all(r.members.map((s) => waitFor(s, 'reaction:added', (p) => p.messageId === messageId, 10_000)));
  const added = seen[0];
  assert.deepEqual(Object.keys(added).sort(), ['messageId', 'processed', 'reaction']);
  assert.equal(added.processed, true);
  assert.match(added.reaction.id, UUID_RE);
  assert.equal(added.reaction.type, '👍');
  assert.equal(added.reaction.userId, r.memberId);
  assert.equal(added.reaction.messageId, messageId);
  assert.match(added.reaction.createdAt, ISO_RE);
  for (const other of seen) assert.deepEqual(other, added, 'every socket sees the same event');

  await sleep(QUIET_MS);
  for (const s of r.members) assert.equal(addedOf(s, messageId).length, 1, 'exactly one reaction:added per socket');
  assert.deepEqual(received(r.outsider, 'reaction:added'), [], 'a non-member receives nothing');
  assert.deepEqual(received(r.member, 'reaction:error'), []);

  const reactions = await reactionsOf(r.authorId, r.channel.id, messageId, sb.url(1));
  assert.equal(reactions.length, 1, JSON.stringify(reactions));
  const [h] = reactions;
  assert.deepEqual({ id: h.id, type: h.type, userId: h.userId, messageId: h.messageId },
    { id: added.reaction.id, type: '👍', userId: r.memberId, messageId });
  assert.equal(Date.parse(h.createdAt), Date.parse(added.reaction.createdAt), 'history and broadcast agree on createdAt');
});

test('reaction:add of an existing reaction: ack ok, no broadcast, no second row; other types and users are new', async () => {
  const r = await room();
  const messageId = await post(r.author, r.channel.id, r.members);
  assert.deepEqual(await emitAck(r.member, 'reaction:add', { messageId, type: '👍' }, 10_000), { ok: true, messageId, type: '👍' });
  await Promise.all(r.members.map((s) => waitFor(s, 'reaction:added', (p) => p.messageId === messageId, 10_000)));
  await sleep(QUIET_MS);

  // Again from the same socket, and from the same user's other device on the other node.
  const from = r.members.map(mark);
  assert.deepEqual(await emitAck(r.member, 'reaction:add', { messageId, type: '👍' }, 10_000), { ok: true, messageId, type: '👍' });
  assert.deepEqual(await emitAck(r.member2, 'reaction:add', { messageId, type: '👍' }, 10_000), { ok: true, messageId, type: '👍' });
  r.member.emit('reaction:add', { messageId, type: '👍' }); // and without an ack callback
  await sleep(QUIET_MS);
  r.members.forEach((s, i) => assert.deepEqual(addedOf(s, messageId, undefined, from[i]), [], 'a repeated add broadcasts nothing'));
  assert.deepEqual(received(r.member, 'reaction:error'), []);
  assert.deepEqual(received(r.member2, 'reaction:error'), []);
  assert.equal((await reactionsOf(r.memberId, r.channel.id, messageId)).length, 1, 'still one reaction');

  // Another type by the same user, and the same type by another user, are new reactions.
  assert.deepEqual(await emitAck(r.member, 'reaction:add', { messageId, type: '❤️' }, 10_000), { ok: true, messageId, type: '❤️' });
  assert.deepEqual(await emitAck(r.author, 'reaction:add', { messageId, type: '👍' }, 10_000), { ok: true, messageId, type: '👍' });
  for (const s of r.members) {
    await waitFor(s, 'reaction:added', (p, e) => e.index >= from[r.members.indexOf(s)] && p.reaction.type === '❤️' && p.reaction.userId === r.memberId, 10_000);
    await waitFor(s, 'reaction:added', (p, e) => e.index >= from[r.members.indexOf(s)] && p.reaction.type === '👍' && p.reaction.userId === r.authorId, 10_000);
  }
  await sleep(QUIET_MS);
  r.members.forEach((s, i) => assert.equal(addedOf(s, messageId, undefined, from[i]).length, 2));
  const reactions = await reactionsOf(r.authorId, r.channel.id, messageId, sb.url(1));
  assert.deepEqual(reactions.map((x) => `${x.userId}:${x.type}`).sort(),
    [`${r.authorId}:👍`, `${r.memberId}:❤️`, `${r.memberId}:👍`].sort());
  assert.equal(new Set(reactions.map((x) => x.id)).size, 3, 'distinct reaction ids');
});

test('reaction:remove: ack, reaction:removed to every member socket; removing a missing reaction is silent', async () => {
  const r = await room();
  const messageId = await post(r.author, r.channel.id, r.members);
  assert.deepEqual(await emitAck(r.member, 'reaction:add', { messageId, type: '🎉' }, 10_000), { ok: true, messageId, type: '🎉' });
  assert.deepEqual(await emitAck(r.author, 'reaction:add', { messageId, type: '🎉' }, 10_000), { ok: true, messageId, type: '🎉' });
  await Promise.all(r.members.map((s) => waitForCount(s, 'reaction:added', 2, (p) => p.messageId === messageId, 10_000)));

  // The member removes theirs from the other device (other node than where it was added).
  const ack = await emitAck(r.member2, 'reaction:remove', { messageId, type: '🎉' }, 10_000);
  assert.deepEqual(ack, { ok: true, messageId, type: '🎉' });
  const seen = await Promise.all(r.members.map((s) => waitFor(s, 'reaction:removed', (p) => p.messageId === messageId, 10_000)));
  for (const removed of seen) assert.deepEqual(removed, { messageId, userId: r.memberId, type: '🎉', processed: true });
  await sleep(QUIET_MS);
  for (const s of r.members) assert.equal(removedOf(s, messageId).length, 1);
  assert.deepEqual(received(r.outsider, 'reaction:removed'), []);
  const left = await reactionsOf(r.memberId, r.channel.id, messageId, sb.url(1));
  assert.deepEqual(left.map((x) => `${x.userId}:${x.type}`), [`${r.authorId}:🎉`], "only the author's reaction is left");

  // Removing it again, or a type never added: ack ok, nothing broadcast, nothing changed.
  const from = r.members.map(mark);
  assert.deepEqual(await emitAck(r.member, 'reaction:remove', { messageId, type: '🎉' }, 10_000), { ok: true, messageId, type: '🎉' });
  assert.deepEqual(await emitAck(r.member, 'reaction:remove', { messageId, type: '🚀' }, 10_000), { ok: true, messageId, type: '🚀' });
  r.member2.emit('reaction:remove', { messageId, type: '🎉' });
  await sleep(QUIET_MS);
  r.members.forEach((s, i) => assert.deepEqual(removedOf(s, messageId, undefined, from[i]), [], 'a missing reaction: no broadcast'));
  assert.deepEqual(received(r.member, 'reaction:error'), []);
  assert.deepEqual(received(r.member2, 'reaction:error'), []);
  assert.equal((await reactionsOf(r.authorId, r.channel.id, messageId)).length, 1);

  // Removed, it can be added again (a new broadcast).
  assert.deepEqual(await emitAck(r.member, 'reaction:add', { messageId, type: '🎉' }, 10_000), { ok: true, messageId, type: '🎉' });
  await Promise.all(r.members.map((s, i) => waitFor(s, 'reaction:added', (p, e) => e.index >= from[i] && p.reaction.userId === r.memberId, 10_000)));
  assert.equal((await reactionsOf(r.authorId, r.channel.id, messageId)).length, 2);
});

test('reaction type limit counts bytes: 64 bytes accepted, 65+ bytes refused (also when fewer characters)', async () => {
  const r = await room();
  const messageId = await post(r.author, r.channel.id, r.members);
  for (const type of ['x', 'a'.repeat(64), '👍'.repeat(16), 'é'.repeat(32)]) {
    assert.equal(Buffer.byteLength(type), type === 'x' ? 1 : 64);
    assert.deepEqual(await emitAck(r.member, 'reaction:add', { messageId, type }, 10_000), { ok: true, messageId, type }, `${Buffer.byteLength(type)} bytes`);
    await waitFor(r.author, 'reaction:added', (p) => p.messageId === messageId && p.reaction.type === type, 10_000);
  }
  for (const type of ['a'.repeat(65), '👍'.repeat(17), 'é'.repeat(33), '']) {
    for (const event of ['reaction:add', 'reaction:remove']) {
      const from = mark(r.member);
      const ack = await emitAck(r.member, event, { messageId, type }, 10_000);
      assert.deepEqual(ack, { ok: false, error: TYPE_ERROR }, `${event} ${Buffer.byteLength(type)} bytes (${[...type].length} chars)`);
      const err = await waitFor(r.member, 'reaction:error', (p, e) => e.index >= from, 10_000);
      assert.deepEqual(err, { messageId, type, error: TYPE_ERROR });
    }
  }
  await sleep(QUIET_MS);
  assert.equal(addedOf(r.author, messageId).length, 4, 'only the valid types were broadcast');
  assert.deepEqual(received(r.author, 'reaction:removed'), []);
  assert.equal((await reactionsOf(r.authorId, r.channel.id, messageId)).length, 4);
});

test('reaction errors: unknown or malformed message id, not a member, non-string fields', async () => {
  const r = await room();
  const messageId = await post(r.author, r.channel.id, r.members);
  const unknown = randomUUID();

  /** Emits with and without an ack; checks the ack and the reaction:error event. */
  async function expectError(socket, event, payload, error, expectedEvent) {
    const label = `${event} ${JSON.stringify(payload)}`;
    let from = mark(socket);
    const ack = await emitAck(socket, event, payload, 10_000).catch((e) => assert.fail(`${label}: no ack: ${e.message}`));
    assert.deepEqual(ack, { ok: false, error }, `${label}: ack`);
    const err = await waitFor(socket, 'reaction:error', (p, e) => e.index >= from, 10_000).catch((e) => assert.fail(`${label}: ${e.message}`));
    assert.equal(err.error, error, `${label}: error`);
    if (expectedEvent) assert.deepEqual(err, expectedEvent, `${label}: reaction:error`);
    from = mark(socket);
    socket.emit(event, payload);
    const err2 = await waitFor(socket, 'reaction:error', (p, e) => e.index >= from, 10_000).catch((e) => assert.fail(`${label} (no ack): ${e.message}`));
    assert.equal(err2.error, error, `${label} (no ack)`);
    return err;
  }

  for (const event of ['reaction:add', 'reaction:remove']) {
    await expectError(r.member, event, { messageId: unknown, type: '👍' }, 'Message not found', { messageId: unknown, type: '👍', error: 'Message not found' });
    await expectError(r.member, event, { messageId: 'not-a-uuid', type: '👍' }, 'Message not found', { messageId: 'not-a-uuid', type: '👍', error: 'Message not found' });
    await expectError(r.outsider, event, { messageId, type: '👍' }, NOT_MEMBER, { messageId, type: '👍', error: NOT_MEMBER });
    const badType = await expectError(r.member, event, { messageId, type: 7 }, 'messageId and type must be strings');
    assert.equal(badType.messageId, messageId, 'the string messageId is echoed');
    const badId = await expectError(r.member, event, { messageId: 7, type: '👍' }, 'messageId and type must be strings');
    assert.equal(badId.type, '👍', 'the string type is echoed');
    await expectError(r.member, event, { messageId }, 'messageId and type must be strings');
    await expectError(r.member, event, { type: '👍' }, 'messageId and type must be strings');
    await expectError(r.member, event, null, 'messageId and type must be strings');
    await expectError(r.member, event, 'just a string', 'messageId and type must be strings');
  }
  await sleep(QUIET_MS);
  for (const s of r.members) {
    assert.deepEqual(received(s, 'reaction:added'), [], 'no error was broadcast as a reaction');
    assert.deepEqual(received(s, 'reaction:removed'), []);
  }
  assert.deepEqual(received(r.author, 'reaction:error'), [], 'errors go to the caller only');
  assert.deepEqual(await reactionsOf(r.authorId, r.channel.id, messageId), []);
  assert.ok(r.member.connected && r.outsider.connected, 'sockets stay connected');
});

test('a user who joins a public channel with channel:join may react at once; before, they may not', async () => {
  const r = await room({ isPrivate: false });
  const messageId = await post(r.author, r.channel.id, r.members);
  const before = await emitAck(r.outsider, 'reaction:add', { messageId, type: '👋' }, 10_000);
  assert.deepEqual(before, { ok: false, error: NOT_MEMBER });
  assert.deepEqual(await emitAck(r.outsider, 'channel:join', { channelId: r.channel.id }, 10_000), { ok: true, channelId: r.channel.id, userId: r.outsiderId });
  assert.deepEqual(await emitAck(r.outsider, 'reaction:add', { messageId, type: '👋' }, 10_000), { ok: true, messageId, type: '👋' });
  for (const s of [...r.members, r.outsider]) {
    const added = await waitFor(s, 'reaction:added', (p) => p.messageId === messageId, 10_000);
    assert.equal(added.reaction.userId, r.outsiderId);
  }
});

test('30 users react at once (both nodes): every member socket sees exactly 30 👍 and 15 ❤️, then 30 removals', { timeout: 120_000 }, async () => {
  const N = 30;
  const authorId = uid('author');
  const channel = await createChannel(sb.url(0), authorId, `crowd-${randomHex(3)}`, true);
  const ids = Array.from({ length: N }, (_, i) => uid(`fan${i}`));
  for (const id of ids) {
    const res = await addMember(sb.url(0), authorId, channel.id, id);
    assert.equal(res.status, 201, res.text);
  }
  const author = await connectUser(sb.url(0), authorId);
  const fans = await Promise.all(ids.map((id, i) => connectUser(sb.url(i % 2), id)));
  const everyone = [author, ...fans];
  const messageId = await post(author, channel.id, everyone, 'react to me');
  const hearts = new Set(ids.filter((_, i) => i % 2 === 1));

  // All at once: every fan adds 👍, every other fan also ❤️.
  const acks = await Promise.all(fans.flatMap((s, i) => [
    emitAck(s, 'reaction:add', { messageId, type: '👍' }, 30_000),
    ...(hearts.has(ids[i]) ? [emitAck(s, 'reaction:add', { messageId, type: '❤️' }, 30_000)] : []),
  ]));
  assert.equal(acks.length, N + N / 2);
  for (const a of acks) assert.equal(a.ok, true, JSON.stringify(a));

  const describe = (s) => `${s.userId}: 👍 ${addedOf(s, messageId, '👍').length}, ❤️ ${addedOf(s, messageId, '❤️').length}`;
  await Promise.all(everyone.map((s) => waitForCount(s, 'reaction:added', N + N / 2, (p) => p.messageId === messageId, 30_000)
    .catch((e) => assert.fail(`${e.message.split(';')[0]}; ${describe(s)}`))));
  await sleep(QUIET_MS);
  for (const s of everyone) {
    const thumbs = addedOf(s, messageId, '👍');
    const hs = addedOf(s, messageId, '❤️');
    assert.equal(thumbs.length, N, `exactly ${N} 👍 on ${describe(s)}`);
    assert.equal(hs.length, N / 2, `exactly ${N / 2} ❤️ on ${describe(s)}`);
    assert.deepEqual(thumbs.map((p) => p.reaction.userId).sort(), [...ids].sort(), 'one 👍 per fan');
    assert.deepEqual(hs.map((p) => p.reaction.userId).sort(), [...hearts].sort(), 'one ❤️ per other fan');
    assert.equal(new Set([...thumbs, ...hs].map((p) => p.reaction.id)).size, N + N / 2, 'distinct reaction ids');
    assert.equal(received(s, 'reaction:added').length, N + N / 2, 'nothing else');
  }
  let reactions = await reactionsOf(authorId, channel.id, messageId, sb.url(1));
  assert.equal(reactions.filter((x) => x.type === '👍').length, N);
  assert.equal(reactions.filter((x) => x.type === '❤️').length, N / 2);
  assert.equal(reactions.length, N + N / 2);

  // All remove 👍 at once.
  const removeAcks = await Promise.all(fans.map((s) => emitAck(s, 'reaction:remove', { messageId, type: '👍' }, 30_000)));
  for (const a of removeAcks) assert.deepEqual(a, { ok: true, messageId, type: '👍' });
  await Promise.all(everyone.map((s) => waitForCount(s, 'reaction:removed', N, (p) => p.messageId === messageId, 30_000)));
  await sleep(QUIET_MS);
  for (const s of everyone) {
    const removed = removedOf(s, messageId, '👍');
    assert.equal(removed.length, N, `exactly ${N} reaction:removed on ${s.userId}`);
    assert.deepEqual(removed.map((p) => p.userId).sort(), [...ids].sort());
    assert.equal(received(s, 'reaction:removed').length, N, 'no ❤️ removed');
    assert.equal(received(s, 'reaction:added').length, N + N / 2, 'no new reaction:added');
  }
  reactions = await reactionsOf(fans[1].userId, channel.id, messageId, sb.url(0));
  assert.equal(reactions.filter((x) => x.type === '👍').length, 0);
  assert.equal(reactions.filter((x) => x.type === '❤️').length, N / 2);
});

test('a reaction and a read sent right after DELIVERED (other node) never overtake the message:created', { timeout: 60_000 }, async () => {
  const ROUNDS = 15;
  const r = await room();
  const observer = await connectUser(sb.url(1), r.authorId); // the author's second device, on the reactor's node
  const everyone = [...r.members, observer];
  const ids = [];
  for (let i = 0; i < ROUNDS; i++) {
    const tempId = `o-${i}`;
    r.author.emit('message:send', { content: `round ${i}`, channelId: r.channel.id, tempId });
    const delivered = await waitFor(r.author, 'message:delivered', (p) => p.tempId === tempId && p.status === 'DELIVERED', 10_000);
    const messageId = delivered.messageId;
    ids.push(messageId);
    // The member (gateway 1) learns the id out of band and reacts immediately.
    r.member.emit('reaction:add', { messageId, type: '⚡' });
    r.member.emit('message:read', { messageId });
  }
  await Promise.all(everyone.map((s) => waitForCount(s, 'reaction:added', ROUNDS, null, 15_000)));
  await Promise.all(everyone.map((s) => waitForCount(s, 'message:read', ROUNDS, null, 15_000)));
  assert.deepEqual(received(r.member, 'reaction:error'), []);
  assert.deepEqual(received(r.member, 'message:error'), []);
  for (const s of everyone) {
    const events = s.recorder.events;
    for (const id of ids) {
      const created = events.findIndex((e) => e.event === 'message:created' && e.payload.message.id === id);
      const added = events.findIndex((e) => e.event === 'reaction:added' && e.payload.messageId === id);
      const read = events.findIndex((e) => e.event === 'message:read' && e.payload.messageId === id);
      assert.ok(created >= 0, `${s.userId} got message:created of ${id}`);
      assert.ok(added > created, `${s.userId}: reaction:added of ${id} at ${added}, message:created at ${created}`);
      assert.ok(read > created, `${s.userId}: message:read of ${id} at ${read}, message:created at ${created}`);
    }
  }
});

// ---------------------------------------------------------------------------
// message:read and unread counts
// ---------------------------------------------------------------------------

test('message:read: ack, broadcast to the room, read position only moves forward, unreadCount follows', async () => {
  const r = await room({ isPrivate: false });
  const [m1, m2, m3] = [
    await post(r.author, r.channel.id, r.members, 'one'),
    await post(r.author, r.channel.id, r.members, 'two'),
    await post(r.author, r.channel.id, r.members, 'three'),
  ];
  assert.equal(await unreadOf(r.memberId, r.channel.id, sb.url(1)), 3, 'nothing read yet');
  assert.equal(await unreadOf(r.authorId, r.channel.id), 0, 'own messages do not count');
  const forOutsider = await listed(r.outsiderId, r.channel.id);
  assert.ok(forOutsider, 'a public channel is listed for a non-member');
  assert.equal(forOutsider.isMember, false);
  assert.equal(forOutsider.unreadCount, 0, '0 for non-members');

  // Read up to m2: acked, broadcast to every member socket on both nodes.
  assert.deepEqual(await emitAck(r.member, 'message:read', { messageId: m2 }, 10_000), { ok: true, messageId: m2 });
  const seen = await Promise.all(r.members.map((s) => waitFor(s, 'message:read', (p) => p.messageId === m2, 10_000)));
  for (const p of seen) {
    assert.deepEqual(Object.keys(p).sort(), ['messageId', 'status', 'timestamp', 'userId']);
    assert.equal(p.userId, r.memberId);
    assert.equal(p.status, 'READ');
    assert.match(p.timestamp, ISO_RE);
  }
  assert.equal(await unreadOf(r.memberId, r.channel.id, sb.url(1)), 1, 'm3 is left');

  // Older (m1) and the same (m2) again: acked, silent, no change.
  const from = r.members.map(mark);
  assert.deepEqual(await emitAck(r.member, 'message:read', { messageId: m1 }, 10_000), { ok: true, messageId: m1 });
  assert.deepEqual(await emitAck(r.member2, 'message:read', { messageId: m2 }, 10_000), { ok: true, messageId: m2 });
  r.member.emit('message:read', { messageId: m1 });
  await sleep(QUIET_MS);
  r.members.forEach((s, i) => assert.deepEqual(readsOf(s, from[i]), [], 'the position did not move: no broadcast'));
  assert.equal(await unreadOf(r.memberId, r.channel.id), 1, 'the read position never moves back');

  // Forward to m3 (without an ack callback): broadcast, nothing unread.
  r.member2.emit('message:read', { messageId: m3 });
  await Promise.all(r.members.map((s) => waitFor(s, 'message:read', (p) => p.messageId === m3 && p.userId === r.memberId, 10_000)));
  await sleep(QUIET_MS);
  r.members.forEach((s, i) => assert.equal(readsOf(s, from[i]).length, 1));
  assert.deepEqual(received(r.outsider, 'message:read'), [], 'a non-member hears nothing');
  assert.deepEqual(received(r.member, 'message:error'), []);
  assert.deepEqual(received(r.member2, 'message:error'), []);
  assert.equal(await unreadOf(r.memberId, r.channel.id, sb.url(1)), 0);

  // The member's own message does not count for them, but does for the author, until read.
  const m4 = await post(r.member, r.channel.id, r.members, 'four');
  assert.equal(await unreadOf(r.memberId, r.channel.id), 0, 'own messages do not count');
  assert.equal(await unreadOf(r.authorId, r.channel.id, sb.url(1)), 1, "the author has the member's message unread");
  assert.deepEqual(await emitAck(r.author, 'message:read', { messageId: m4 }, 10_000), { ok: true, messageId: m4 });
  await Promise.all(r.members.map((s) => waitFor(s, 'message:read', (p) => p.messageId === m4 && p.userId === r.authorId, 10_000)));
  assert.equal(await unreadOf(r.authorId, r.channel.id), 0);
  assert.equal(await unreadOf(r.outsiderId, r.channel.id), 0, 'still 0 for the non-member');
});

test('message:read errors: unknown or malformed id, not a member, messageId not a string', async () => {
  const r = await room({ isPrivate: false });
  const messageId = await post(r.author, r.channel.id, r.members);
  const unknown = randomUUID();
  const cases = [
    [r.member, { messageId: unknown }, { messageId: unknown, error: 'Message not found' }],
    [r.member, { messageId: 'not-a-uuid' }, { messageId: 'not-a-uuid', error: 'Message not found' }],
    [r.outsider, { messageId }, { messageId, error: NOT_MEMBER }],
    [r.member, { messageId: 42 }, { messageId: null, error: 'messageId must be a string' }],
    [r.member, {}, { messageId: null, error: 'messageId must be a string' }],
    [r.member, null, { messageId: null, error: 'messageId must be a string' }],
    [r.member, 'just a string', { messageId: null, error: 'messageId must be a string' }],
  ];
  for (const [socket, payload, expected] of cases) {
    const label = `message:read ${JSON.stringify(payload)} as ${socket.userId}`;
    let from = mark(socket);
    const ack = await emitAck(socket, 'message:read', payload, 10_000).catch((e) => assert.fail(`${label}: no ack: ${e.message}`));
    assert.deepEqual(ack, { ok: false, error: expected.error }, `${label}: ack`);
    const err = await waitFor(socket, 'message:error', (p, e) => e.index >= from, 10_000).catch((e) => assert.fail(`${label}: ${e.message}`));
    assert.deepEqual(err, expected, `${label}: message:error`);
    from = mark(socket);
    socket.emit('message:read', payload);
    const err2 = await waitFor(socket, 'message:error', (p, e) => e.index >= from, 10_000).catch((e) => assert.fail(`${label} (no ack): ${e.message}`));
    assert.deepEqual(err2, expected, `${label} (no ack)`);
  }
  await sleep(QUIET_MS);
  for (const s of r.members) assert.deepEqual(received(s, 'message:read'), [], 'nothing was broadcast');
  assert.deepEqual(received(r.author, 'message:error'), [], 'errors go to the caller only');
  assert.equal(await unreadOf(r.memberId, r.channel.id), 1, 'nothing was marked read');
  assert.equal(await unreadOf(r.outsiderId, r.channel.id), 0);
});
