// Gap-free delivery with the stock socket.io-client (CONTRACT §9, issue 10):
// catch-up with `auth.since` and `channel:sync` (both modes), and clients
// behind a load balancer that keep `since` up to date (the reference helper
// in lib/recovering-client.mjs) and, after their gateway is killed with
// SIGKILL or drained with SIGTERM under load, hold every persisted message
// of their channel exactly once, in seq order (cluster only).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { io } from 'socket.io-client';
import {
  auth, connectUser, createChannel, addMember, emitAck, fullHistory, needsCluster, sendAndWait, sleep, uid, useCluster,
  waitFor, waitForCount, waitUntil, SIO_PATH,
} from '../lib/harness.mjs';
import { balancer } from '../lib/balancer.mjs';
import { recoveringClient } from '../lib/recovering-client.mjs';

const sb = useCluster({ gateways: 2, workers: 2 });

async function survivesGatewayLoss(t, signal) {
  if (needsCluster(t)) return;
  const cluster = await sb.ready;
  if (!cluster.gateways[0] || !cluster.gateways[0].alive) await cluster.startGateway(0);
  const ports = () => cluster.gateways.filter((g) => g && g.alive).map((g) => g.port);
  const lb = await balancer(ports);
  const lbUrl = `http://127.0.0.1:${lb.address().port}`;
  try {
    const sender = uid('sender');
    const channel = await createChannel(cluster.url(1), sender);
    const readers = Array.from({ length: 12 }, () => uid('reader'));
    for (const r of readers) await addMember(cluster.url(1), sender, channel.id, r);

    const clients = readers.map((userId) => recoveringClient(io, lbUrl, {
      userId,
      getToken: () => auth.token(userId),
      ioOptions: { path: SIO_PATH, transports: ['websocket'], reconnectionDelay: 100, reconnectionDelayMax: 500, forceNew: true },
    }));
    await waitUntil(() => clients.every((c) => c.socket.connected), 10_000, () => 'readers connected');
    // The sender talks to the gateway that survives.
    const out = await connectUser(cluster.url(1), sender);
    const total = 200;
    const sending = (async () => {
      for (let i = 0; i < total; i++) {
        out.emit('message:send', { content: `m ${i}`, channelId: channel.id, tempId: `m-${i}` });
        await sleep(10);
      }
    })();
    await sleep(600);
    await cluster.killGateway(0, signal);
    await sending;

    const stored = await waitUntil(async () => {
      const h = await fullHistory(cluster.url(1), sender, channel.id);
      return h.length === total ? h : null;
    }, 20_000, () => 'all persisted');
    const want = stored.map((m) => m.id);
    await waitUntil(() => clients.every((c) => c.messages.length >= total), 20_000,
      () => `readers hold ${clients.map((c) => c.messages.length).join(',')} of ${total}`);
    for (const c of clients) {
      assert.deepEqual(c.messages.map((m) => m.id), want, 'every message once, in seq order');
      assert.deepEqual(c.messages.map((m) => m.seq), stored.map((m) => m.seq));
    }
    const reconnected = clients.filter((c) => c.recoveries.length > 0).length;
    assert.ok(reconnected > 0, 'some readers were on the lost gateway and recovered');
    for (const c of clients) c.socket.disconnect();
  } finally {
    lb.close();
  }
}

test('readers of a gateway killed with SIGKILL under load hold every message once, in order', (t) => survivesGatewayLoss(t, 'SIGKILL'));

test('readers of a gateway drained with SIGTERM under load hold every message once, in order', (t) => survivesGatewayLoss(t, 'SIGTERM'));

test('a reconnect with auth.since replays what was missed, then channel:sync on demand', async () => {
  const cluster = await sb.ready;
  // The tests above stop gateway 0.
  if (cluster.mode === 'cluster' && !cluster.gateways[0]?.alive) await cluster.startGateway(0);
  const [ann, ben] = [uid('ann'), uid('ben')];
  const channel = await createChannel(cluster.url(0), ann);
  await addMember(cluster.url(0), ann, channel.id, ben);
  const a = await connectUser(cluster.url(0), ann);
  let b = await connectUser(cluster.url(1), ben);
  assert.deepEqual(b.success.positions, { [channel.id]: 0 });
  assert.equal((await sendAndWait(a, { content: 'one', channelId: channel.id, tempId: 't1' })).status, 'DELIVERED');
  const first = await waitFor(b, 'message:created');
  assert.equal(first.message.seq, 1);
  b.disconnect();
  for (const t of ['t2', 't3', 't4']) {
    assert.equal((await sendAndWait(a, { content: t, channelId: channel.id, tempId: t })).status, 'DELIVERED');
  }
  // The stock client passes `since` in its handshake auth.
  b = await connectUser(cluster.url(1), ben, { auth: { token: `Bearer ${auth.token(ben)}`, userId: ben, since: { [channel.id]: 1 } } });
  const replayed = await waitForCount(b, 'message:created', 3);
  assert.deepEqual(replayed.map((e) => [e.message.seq, e.message.content, e.recovered]), [[2, 't2', true], [3, 't3', true], [4, 't4', true]]);
  assert.deepEqual(replayed[0].message.reactions, []);
  const recovered = await waitFor(b, 'channel:recovered');
  assert.deepEqual(recovered, { channelId: channel.id, recovered: true, fromSeq: 2, toSeq: 4 });
  // On demand, with an acknowledgement.
  const ack = await emitAck(b, 'channel:sync', { channelId: channel.id, afterSeq: 3 });
  assert.deepEqual(ack, { ok: true, channelId: channel.id, recovered: true, fromSeq: 4, toSeq: 4 });
  const bad = await emitAck(b, 'channel:sync', { channelId: channel.id, afterSeq: 'x' });
  assert.deepEqual(bad, { ok: false, error: 'afterSeq must be a non-negative integer' });
  // Live again, once.
  assert.equal((await sendAndWait(a, { content: 't5', channelId: channel.id, tempId: 't5' })).status, 'DELIVERED');
  await waitUntil(() => b.recorder.events.some((e) => e.event === 'message:created' && e.payload.message.seq === 5), 5000);
  await sleep(200);
  const seqs = b.recorder.events.filter((e) => e.event === 'message:created').map((e) => e.payload.message.seq);
  assert.deepEqual(seqs, [2, 3, 4, 4, 5], 'replayed, synced (seq 4 again, on request), then live');
});
