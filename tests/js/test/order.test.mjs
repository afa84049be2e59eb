// Ordering (CONTRACT §4): one sender's messages to one channel are persisted
// in the order sent, and every member, on any gateway, sees the channel's
// messages in that one persisted order.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  addMember, connectUser, createChannel, fullHistory, received, uid, useCluster, waitForCount, waitUntil,
} from '../lib/harness.mjs';

const sb = useCluster({ gateways: 2, workers: 2 });

const COUNT = 500;

/** A channel owned by `owner` with `receivers` more members, half of them connected to each gateway. */
async function channelWithReceivers(owner, receivers) {
  const channel = await createChannel(sb.url(0), owner, 'ordered', true);
  const ids = Array.from({ length: receivers }, (_, i) => uid(`rcv${i}`));
  for (const id of ids) {
    const res = await addMember(sb.url(0), owner, channel.id, id);
    assert.equal(res.status, 201, res.text);
  }
  const sockets = await Promise.all(ids.map((id, i) => connectUser(sb.url(i % 2), id)));
  for (const s of sockets) assert.deepEqual(s.success.channels, [channel.id]);
  return { channel, sockets };
}

/** The message:failed errors a socket got, counted by error text ({} when none). */
function failureSummary(socket) {
  const summary = {};
  for (const p of received(socket, 'message:failed')) summary[p.error] = (summary[p.error] || 0) + 1;
  return summary;
}

/** Rethrows `error` with where every party stands: what was sent, delivered, received and persisted. */
async function progress(error, channel, owner, sender, receivers) {
  const count = (s, ev, pred) => received(s, ev, pred).length;
  let persisted;
  try {
    persisted = (await fullHistory(sb.url(0), owner, channel.id)).length;
  } catch (e) {
    persisted = `unknown (${e.message})`;
  }
  const lines = [
    `sender: SENT ${count(sender, 'message:delivered', (p) => p.status === 'SENT')}, `
      + `DELIVERED ${count(sender, 'message:delivered', (p) => p.status === 'DELIVERED')}, `
      + `FAILED ${count(sender, 'message:failed')} ${JSON.stringify(failureSummary(sender))}, created ${count(sender, 'message:created')}`,
    ...receivers.map((s, n) => `receiver ${n} (gateway ${n % 2}): created ${count(s, 'message:created')}`),
    `rows in history: ${persisted}`,
  ];
  throw new Error(`${error.message}\n  ${lines.join('\n  ')}`);
}

test(`one sender, ${COUNT} messages as fast as possible: every receiver gets all, in order, once`, { timeout: 120_000 }, async () => {
  const owner = uid('sender');
  const { channel, sockets: receivers } = await channelWithReceivers(owner, 4);
  const sender = await connectUser(sb.url(0), owner);

  for (let i = 0; i < COUNT; i++) {
    sender.emit('message:send', { content: `msg ${i}`, channelId: channel.id, tempId: String(i) });
  }

  const expected = Array.from({ length: COUNT }, (_, i) => String(i));
  const inChannel = (p) => p.message?.channelId === channel.id;
  const explain = (e) => progress(e, channel, owner, sender, receivers);

  // First every send's outcome at the sender: all must be delivered.
  const outcomes = () => received(sender, 'message:delivered', (p) => p.status === 'DELIVERED').length + received(sender, 'message:failed').length;
  await waitUntil(() => outcomes() >= COUNT, 60_000, () => `(the sender has ${outcomes()} outcomes of ${COUNT})`).catch(explain);
  assert.deepEqual(failureSummary(sender), {}, 'no message failed');
  for (const [n, socket] of receivers.entries()) {
    const got = await waitForCount(socket, 'message:created', COUNT, inChannel, 60_000).catch(explain);
    const tempIds = got.map((p) => p.tempId);
    assert.equal(new Set(tempIds).size, tempIds.length, `receiver ${n} (gateway ${n % 2}): duplicates`);
    assert.deepEqual(tempIds, expected, `receiver ${n} (gateway ${n % 2}) sees the send order`);
  }

  const rows = await fullHistory(sb.url(1), owner, channel.id);
  assert.equal(rows.length, COUNT, 'history has every message once');
  assert.deepEqual(rows.map((m) => m.content), expected.map((i) => `msg ${i}`), 'history is in the send order');
  const broadcastIds = received(receivers[0], 'message:created', inChannel).map((p) => p.message.id);
  assert.deepEqual(rows.map((m) => m.id), broadcastIds, 'history order = broadcast order');
  if (rows[0].seq !== undefined) {
    assert.deepEqual(rows.map((m) => Number(m.seq)), Array.from({ length: COUNT }, (_, i) => i + 1), 'seq 1..N');
  }
});

test('two senders on different gateways: all members see one and the same order, the persisted one', { timeout: 120_000 }, async () => {
  const PER_SENDER = 150;
  const owner = uid('senderA');
  const { channel, sockets: receivers } = await channelWithReceivers(owner, 4);
  const otherId = uid('senderB');
  assert.equal((await addMember(sb.url(0), owner, channel.id, otherId)).status, 201);
  const [a, b] = await Promise.all([connectUser(sb.url(0), owner), connectUser(sb.url(1), otherId)]);

  for (let i = 0; i < PER_SENDER; i++) {
    a.emit('message:send', { content: `a ${i}`, channelId: channel.id, tempId: `a${i}` });
    b.emit('message:send', { content: `b ${i}`, channelId: channel.id, tempId: `b${i}` });
  }

  const inChannel = (p) => p.message?.channelId === channel.id;
  for (const s of [a, b]) {
    const outcomes = () => received(s, 'message:delivered', (p) => p.status === 'DELIVERED').length + received(s, 'message:failed').length;
    await waitUntil(() => outcomes() >= PER_SENDER, 60_000, () => `(sender ${s.userId} has ${outcomes()} outcomes of ${PER_SENDER})`);
    assert.deepEqual(failureSummary(s), {}, `no message of ${s.userId} failed`);
  }
  const orders = [];
  for (const socket of [...receivers, a, b]) {
    const got = await waitForCount(socket, 'message:created', 2 * PER_SENDER, inChannel, 60_000)
      .catch((e) => progress(e, channel, owner, a, [...receivers, b]));
    orders.push(got.map((p) => p.message.id));
  }
  for (const [n, order] of orders.entries()) assert.deepEqual(order, orders[0], `socket ${n} sees the same order as socket 0`);

  const rows = await fullHistory(sb.url(0), owner, channel.id);
  assert.deepEqual(rows.map((m) => m.id), orders[0], 'the order seen is the persisted order');
  // Each sender's own messages keep their send order within the interleaving.
  for (const prefix of ['a', 'b']) {
    const mine = rows.filter((m) => m.content.startsWith(`${prefix} `)).map((m) => m.content);
    assert.deepEqual(mine, Array.from({ length: PER_SENDER }, (_, i) => `${prefix} ${i}`), `sender ${prefix} in send order`);
  }
});
