// message:send end to end (CONTRACT §4) on two gateways and two workers, with
// sender and receivers on different nodes: status flow, message shape,
// fan-out, validation, deduplication and history.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import {
  ISO_RE, UUID_RE, UUID_V7_RE, addMember, api, auth, connectUser, createChannel, emitAck, history, listOf, mark, randomHex,
  received, sendAndWait, sleep, uid, useCluster, waitFor, waitForCount,
} from '../lib/harness.mjs';

const sb = useCluster({ gateways: 2, workers: 2 });

const SENDER_NAME = 'Sender Example';
const SENDER_IMAGE = 'https://img.clerk.test/sender.png';

/** How long to keep listening before concluding that an event did not come. */
const QUIET_MS = 600;

/**
 * A fresh channel with its sender (owner, on gateway 0), a member on gateway 1
 * and an outsider (not a member) on gateway 1, all connected.
 */
async function room() {
  const senderId = uid('sender');
  const memberId = uid('member');
  const outsiderId = uid('outsider');
  const channel = await createChannel(sb.url(0), senderId, `room-${randomHex(3)}`, true);
  const invited = await addMember(sb.url(0), senderId, channel.id, memberId);
  assert.equal(invited.status, 201, invited.text);
  const [sender, member, outsider] = await Promise.all([
    connectUser(sb.url(0), senderId, { tokenOptions: { name: SENDER_NAME, image_url: SENDER_IMAGE } }),
    connectUser(sb.url(1), memberId),
    connectUser(sb.url(1), outsiderId),
  ]);
  assert.deepEqual(member.success.channels, [channel.id]);
  return { channel, sender, member, outsider, senderId, memberId, outsiderId };
}

/** Asserts the `message` object of message:created / history (the seed's shape). */
function assertMessageShape(message, { id, content, channelId, userId, name, imageUrl }) {
  assert.match(message.id, UUID_RE);
  if (id !== undefined) assert.equal(message.id, id);
  assert.equal(message.content, content);
  assert.equal(message.channelId, channelId);
  assert.equal(message.userId, userId);
  assert.equal(message.replyToId, null);
  assert.equal(message.deliveryStatus, 'DELIVERED');
  assert.match(message.createdAt, ISO_RE);
  assert.match(message.updatedAt, ISO_RE);
  assert.ok(!Number.isNaN(Date.parse(message.createdAt)));
  assert.deepEqual(message.user, { id: userId, name, imageUrl });
}

test('status flow SENT then DELIVERED, ack answered once, fan-out to members on the other node only', async () => {
  const r = await room();
  const tempId = `t-${randomHex(4)}`;
  const content = 'Hello world';
  const acks = [];
  r.sender.emit('message:send', { content, channelId: r.channel.id, tempId }, (answer) => acks.push(answer));

  const delivered = await waitFor(r.sender, 'message:delivered', (p) => p.tempId === tempId && p.status === 'DELIVERED', 10_000);
  const sent = await waitFor(r.sender, 'message:delivered', (p) => p.tempId === tempId && p.status === 'SENT');
  assert.match(sent.messageId, UUID_V7_RE, 'the gateway assigns a UUID v7');
  assert.equal(delivered.messageId, sent.messageId, 'SENT and DELIVERED carry the same id');
  assert.equal(delivered.processed, true);
  assert.match(sent.timestamp, ISO_RE);
  assert.match(delivered.timestamp, ISO_RE);
  const statuses = received(r.sender, 'message:delivered', (p) => p.tempId === tempId).map((p) => p.status);
  assert.deepEqual(statuses, ['SENT', 'DELIVERED']);

  // The member on the other gateway gets the seed's message:created.
  const created = await waitFor(r.member, 'message:created', (p) => p.tempId === tempId, 10_000);
  assert.equal(created.tempId, tempId);
  assert.equal(created.processed, true);
  assertMessageShape(created.message, {
    id: sent.messageId, content, channelId: r.channel.id, userId: r.senderId, name: SENDER_NAME, imageUrl: SENDER_IMAGE,
  });
  // So does the sender (a member of the room too).
  await waitFor(r.sender, 'message:created', (p) => p.tempId === tempId);

  await sleep(QUIET_MS);
  assert.deepEqual(acks, [{ status: 'DELIVERED', messageId: sent.messageId }], 'ack answered exactly once with the outcome');
  assert.deepEqual(received(r.outsider, 'message:created'), [], 'a non-member receives nothing');
  assert.equal(received(r.member, 'message:created').length, 1, 'exactly one message:created');
});

test('a user without name/image claims is shown by id with imageUrl null', async () => {
  const r = await room();
  const tempId = 'plain';
  r.member.emit('message:send', { content: 'from a plain user', channelId: r.channel.id, tempId });
  const created = await waitFor(r.sender, 'message:created', (p) => p.tempId === tempId, 10_000);
  assertMessageShape(created.message, {
    content: 'from a plain user', channelId: r.channel.id, userId: r.memberId, name: r.memberId, imageUrl: null,
  });
});

test('validation failures are answered with message:failed', async () => {
  const r = await room();
  const foreign = await createChannel(sb.url(1), r.outsiderId, 'not-yours', false);
  const channelId = r.channel.id;
  // [name, payload, tempId the failure must echo (undefined: not checked)]
  const cases = [
    ['content not a string', { content: 42, channelId, tempId: 'v-number' }, 'v-number'],
    ['content missing', { channelId, tempId: 'v-missing' }, 'v-missing'],
    ['blank content', { content: '  \n\t ', channelId, tempId: 'v-blank' }, 'v-blank'],
    ['content over 4000 chars', { content: 'x'.repeat(4001), channelId, tempId: 'v-long' }, 'v-long'],
    ['unknown channel', { content: 'hi', channelId: randomUUID(), tempId: 'v-unknown' }, 'v-unknown'],
    ['channel not a member of (public, not joined)', { content: 'hi', channelId: foreign.id, tempId: 'v-foreign' }, 'v-foreign'],
    ['channelId not a string', { content: 'hi', channelId: 7, tempId: 'v-chan' }, 'v-chan'],
    ['tempId over 128 chars', { content: 'hi', channelId, tempId: 't'.repeat(129) }, undefined],
    ['payload not an object (string)', 'just a string', undefined],
    ['payload not an object (null)', null, undefined],
  ];
  for (const [name, payload, echo] of cases) {
    const from = mark(r.sender);
    r.sender.emit('message:send', payload);
    const failed = await waitFor(r.sender, 'message:failed', (p, e) => e.index >= from, 10_000)
      .catch((e) => assert.fail(`${name}: ${e.message}`));
    assert.equal(failed.status, 'FAILED', name);
    assert.equal(failed.processed, true, name);
    assert.equal(typeof failed.error, 'string', name);
    assert.ok(failed.error.length > 0, `${name}: error must say why`);
    if (echo !== undefined) assert.equal(failed.tempId, echo, `${name}: tempId echoed`);
  }

  // The acknowledgement carries the failure too.
  const answer = await emitAck(r.sender, 'message:send', { content: ' ', channelId, tempId: 'v-ack' }, 10_000);
  assert.equal(answer.status, 'FAILED');
  assert.equal(typeof answer.error, 'string');

  await sleep(QUIET_MS);
  assert.deepEqual(received(r.member, 'message:created'), [], 'nothing invalid was broadcast');
  assert.deepEqual(received(r.sender, 'message:delivered', (p) => p.status === 'DELIVERED'), [], 'nothing invalid was delivered');
  const hist = await history(sb.url(0), r.senderId, channelId);
  assert.deepEqual(hist.list, [], 'nothing invalid was persisted');
});

test('content limits count characters: exactly 4000 (even astral code points) is accepted', async () => {
  const r = await room();
  const ascii = await sendAndWait(r.sender, { content: 'y'.repeat(4000), channelId: r.channel.id, tempId: 'max-ascii' });
  assert.equal(ascii.status, 'DELIVERED', JSON.stringify(ascii.payload));
  const emoji = await sendAndWait(r.sender, { content: '😀'.repeat(4000), channelId: r.channel.id, tempId: 'max-emoji' });
  assert.equal(emoji.status, 'DELIVERED', `4000 emoji are 4000 characters: ${JSON.stringify(emoji.payload)}`);
  const created = await waitFor(r.member, 'message:created', (p) => p.tempId === 'max-emoji', 10_000);
  assert.equal(created.message.content, '😀'.repeat(4000), 'content arrives intact');
});

test('dedupe: the same tempId twice in a row yields one message', async () => {
  const r = await room();
  const payload = { content: `twice ${randomHex(3)}`, channelId: r.channel.id, tempId: `dup-${randomHex(4)}` };
  const outcomes = await Promise.all([
    emitAck(r.sender, 'message:send', payload, 10_000),
    emitAck(r.sender, 'message:send', payload, 10_000),
  ]);
  const delivered = outcomes.filter((o) => o.status === 'DELIVERED');
  const failed = outcomes.filter((o) => o.status === 'FAILED');
  assert.ok(delivered.length >= 1, `one of them is delivered: ${JSON.stringify(outcomes)}`);
  assert.equal(new Set(delivered.map((o) => o.messageId)).size, 1, `a duplicate resolves to the original id: ${JSON.stringify(outcomes)}`);
  for (const f of failed) assert.equal(f.error, 'Message already being processed');

  await sleep(QUIET_MS);
  const created = received(r.member, 'message:created', (p) => p.tempId === payload.tempId);
  assert.equal(created.length, 1, 'exactly one message:created');
  assert.equal(created[0].message.id, delivered[0].messageId);
  const rows = (await history(sb.url(1), r.memberId, r.channel.id)).list.filter((m) => m.content === payload.content);
  assert.equal(rows.length, 1, 'exactly one row');
});

test('dedupe: resending a delivered tempId later answers the original messageId, no second message', async () => {
  const r = await room();
  const payload = { content: 'once only', channelId: r.channel.id, tempId: `again-${randomHex(4)}` };
  const first = await sendAndWait(r.sender, payload);
  assert.equal(first.status, 'DELIVERED', JSON.stringify(first.payload));
  const originalId = first.payload.messageId;
  await waitFor(r.member, 'message:created', (p) => p.tempId === payload.tempId, 10_000);
  await sleep(300);

  const second = await sendAndWait(r.sender, payload);
  assert.equal(second.status, 'DELIVERED', JSON.stringify(second.payload));
  assert.equal(second.payload.messageId, originalId, 'the original messageId');
  const ack = await emitAck(r.sender, 'message:send', payload, 10_000);
  assert.deepEqual(ack, { status: 'DELIVERED', messageId: originalId });

  await sleep(QUIET_MS);
  assert.equal(received(r.member, 'message:created', (p) => p.tempId === payload.tempId).length, 1, 'no second message:created');
  const rows = (await history(sb.url(0), r.senderId, r.channel.id)).list;
  assert.deepEqual(rows.map((m) => m.id), [originalId], 'no second row');
});

test('dedupe: the same content without tempId, sent twice one after the other, makes two messages', async () => {
  const r = await room();
  const payload = { content: 'ok', channelId: r.channel.id };
  const a = await emitAck(r.sender, 'message:send', payload, 10_000);
  const b = await emitAck(r.sender, 'message:send', payload, 10_000);
  assert.equal(a.status, 'DELIVERED', JSON.stringify(a));
  assert.equal(b.status, 'DELIVERED', JSON.stringify(b));
  assert.notEqual(a.messageId, b.messageId);
  const created = await waitForCount(r.member, 'message:created', 2, (p) => p.message.content === 'ok', 10_000);
  assert.deepEqual(created.map((p) => p.message.id), [a.messageId, b.messageId]);
  const rows = (await history(sb.url(1), r.memberId, r.channel.id)).list;
  assert.equal(rows.length, 2);
});

test('history: newest first, limit and before, members only, with reactions', async () => {
  const r = await room();
  const ids = [];
  for (const n of [1, 2, 3]) {
    const out = await sendAndWait(r.sender, { content: `m${n}`, channelId: r.channel.id, tempId: `h${n}` });
    assert.equal(out.status, 'DELIVERED', JSON.stringify(out.payload));
    ids.push(out.payload.messageId);
  }
  const created = await waitFor(r.member, 'message:created', (p) => p.tempId === 'h3', 10_000);

  const all = await history(sb.url(1), r.memberId, r.channel.id);
  assert.equal(all.status, 200, all.text);
  assert.deepEqual(all.list.map((m) => m.id), [...ids].reverse(), 'newest first');
  for (const [i, m] of all.list.entries()) {
    assertMessageShape(m, {
      id: ids[2 - i], content: `m${3 - i}`, channelId: r.channel.id, userId: r.senderId, name: SENDER_NAME, imageUrl: SENDER_IMAGE,
    });
    assert.deepEqual(m.reactions, []);
  }
  // The same message as broadcast (timestamps equal to the millisecond).
  assert.equal(Date.parse(all.list[0].createdAt), Date.parse(created.message.createdAt));

  const page1 = await history(sb.url(0), r.senderId, r.channel.id, { limit: 2 });
  assert.deepEqual(page1.list.map((m) => m.content), ['m3', 'm2']);
  const page2 = await history(sb.url(0), r.senderId, r.channel.id, { limit: 2, before: page1.list[1].id });
  assert.deepEqual(page2.list.map((m) => m.content), ['m1']);

  const denied = await history(sb.url(1), r.outsiderId, r.channel.id);
  assert.equal(denied.status, 403, denied.text);
  assert.equal(typeof denied.body?.error, 'string');

  const anonymous = await api(sb.url(1), 'GET', `/api/channels/${r.channel.id}/messages`);
  assert.equal(anonymous.status, 401);
  const tooMany = await api(sb.url(1), 'GET', `/api/channels/${r.channel.id}/messages?limit=1000`, { token: auth.token(r.memberId) });
  assert.ok(tooMany.status === 400 || (tooMany.status === 200 && listOf(tooMany.body, 'messages').length <= 100), `limit above 100: ${tooMany.status}`);
});
