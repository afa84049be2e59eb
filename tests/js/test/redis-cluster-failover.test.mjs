// Redis Cluster failover, as users see it (MODE=redis-cluster only): the master that holds
// a channel's stream partition is killed with SIGKILL while two members send, and its
// replica takes over after the node timeout (REDIS_CLUSTER_NODE_TIMEOUT_MS, 2 s). Every send
// gets exactly one final outcome within OUTCOME_TIMEOUT_MS (README, Operations); what was
// DELIVERED is stored once and reaches every member once, in seq order (members reconnect
// with `auth.since` if a gateway drops them, lib/recovering-client.mjs); what FAILED was not
// stored; and once the cluster is ok again, sends are DELIVERED.
//
// The test starts its own Redis Cluster (startRedisCluster): killing a node of the shared
// one would break the files running next to it.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { io } from 'socket.io-client';
import {
  SIO_PATH, addMember, auth, createChannel, fullHistory, needsRedisCluster, randomHex, sleep, startCluster,
  startRedisCluster, uid, waitUntil,
} from '../lib/harness.mjs';
import { recoveringClient } from '../lib/recovering-client.mjs';

const run = promisify(execFile);

const OUTCOME_TIMEOUT_MS = 8000;
// OUTCOME_TIMEOUT_MS bounds a write once it is SENT. Before that, an append in flight to the
// killed master waits for fred's command timeout (10 s, shared/src/bus/redis) and then fails
// or lands on the promoted replica: seen here as slowest acks of 5-11 s. Plus room for a
// loaded 2-core CI machine.
const OUTCOME_MARGIN_MS = 12_000;
const STREAM_PARTITIONS = 4; // the harness's
const SEND_EVERY_MS = 50;
const SEND_FOR_MS = 4000;
const KILL_AFTER_MS = 1000;

/** The stream partition of a channel: FNV-1a over the UUID's bytes, as shared/src/bus/mod.rs. */
function partitionOf(channelId, partitions) {
  let h = 0x811c9dc5;
  for (const b of Buffer.from(channelId.replace(/-/g, ''), 'hex')) {
    h = Math.imul((h ^ b) >>> 0, 0x01000193) >>> 0;
  }
  return h % partitions;
}

/**
 * The Redis key of `partition`'s stream, as it exists on the cluster (found by type, so a
 * hash tag in the key layout does not matter); `<prefix>:stream:<partition>` if not found.
 */
async function streamKey(rc, prefix, partition) {
  const streams = new Set();
  for (const port of rc.ports) {
    try {
      const { stdout } = await run('redis-cli', ['-p', String(port), '--scan', '--type', 'stream', '--pattern', `${prefix}*`], { timeout: 5000 });
      for (const k of stdout.split('\n')) if (k) streams.add(k);
    } catch {
      // a node that does not answer
    }
  }
  const match = [...streams].find((k) => {
    const m = /stream\D*(\d+)\D*$/.exec(k);
    return m && Number(m[1]) === partition;
  });
  return match || `${prefix}:stream:${partition}`;
}

/**
 * A member: a recovering client (reconnects with `auth.since`) whose raw `message:created`
 * events are kept per connection, and whose sends are tracked by tempId.
 */
function member(url, userId) {
  const chat = recoveringClient(io, url, {
    userId,
    getToken: () => auth.token(userId),
    ioOptions: { path: SIO_PATH, transports: ['websocket'], reconnectionDelay: 100, reconnectionDelayMax: 500, forceNew: true },
  });
  const m = { userId, chat, socket: chat.socket, connections: [], disconnects: [], finals: new Map(), ready: false };
  m.socket.on('connect', () => m.connections.push({ at: Date.now(), created: [] }));
  m.socket.on('connection:success', () => { m.ready = true; });
  m.socket.on('disconnect', (reason) => { m.ready = false; m.disconnects.push({ at: Date.now(), reason }); });
  m.socket.on('message:created', (p) => m.connections.at(-1)?.created.push(p.message));
  const final = (status) => (p) => {
    if (!p || p.tempId == null) return;
    if (!m.finals.has(p.tempId)) m.finals.set(p.tempId, []);
    m.finals.get(p.tempId).push({ status, ...p });
  };
  m.socket.on('message:delivered', (p) => { if (p?.status === 'DELIVERED') final('DELIVERED')(p); });
  m.socket.on('message:failed', final('FAILED'));
  return m;
}

/** Sends one message with an ack; the returned record fills in when the ack comes. */
function send(m, channelId, label, sends) {
  const tempId = `${label}-${randomHex(4)}`;
  const s = { tempId, content: `rc ${tempId}`, sender: m, at: Date.now(), acks: [], ackMs: null };
  sends.push(s);
  m.socket.emit('message:send', { channelId, content: s.content, tempId }, (answer) => {
    s.acks.push(answer);
    if (s.ackMs === null) s.ackMs = Date.now() - s.at;
  });
  return s;
}

const outcome = (s) => s.acks[0];

test('a Redis master killed mid-traffic: one outcome per send, DELIVERED stored and seen once in order, sends work after the failover',
  { timeout: 90_000 }, async (t) => {
    if (needsRedisCluster(t)) return;
    const rc = await startRedisCluster();
    let cluster = null;
    let killedPort = null;
    const members = [];
    const errors = [];
    try {
      cluster = await startCluster({
        gateways: 2, workers: 2, redisUrl: rc.url, env: { OUTCOME_TIMEOUT_MS: String(OUTCOME_TIMEOUT_MS) },
      });
      const [ann, ben, cat] = [uid('ann'), uid('ben'), uid('cat')];
      const channel = await createChannel(cluster.url(0), ann, `rc-${randomHex(3)}`, false);
      for (const u of [ben, cat]) {
        const res = await addMember(cluster.url(0), ann, channel.id, u);
        assert.ok(res.status >= 200 && res.status < 300, `add ${u}: ${res.status} ${res.text}`);
      }
      // Across both gateways; ann and ben send, cat only reads.
      members.push(member(cluster.url(0), ann), member(cluster.url(1), ben), member(cluster.url(0), cat));
      await waitUntil(() => members.every((m) => m.ready), 10_000, () => 'members connected');
      const [sa, sb] = members;

      // One message first, so the partition's stream exists and can be found.
      const sends = [];
      const warm = send(sa, channel.id, 'warm', []);
      await waitUntil(() => warm.acks.length > 0, 10_000, () => 'the first send answered');
      assert.equal(outcome(warm).status, 'DELIVERED', `before any failure: ${JSON.stringify(outcome(warm))}`);
      const partition = partitionOf(channel.id, STREAM_PARTITIONS);
      const key = await streamKey(rc, cluster.prefix, partition);

      // Two senders, one message each every 50 ms for 4 s; the stream's master dies at 1 s.
      const started = Date.now();
      let killedAt = null;
      let healedAt = null;
      const killing = (async () => {
        await sleep(KILL_AFTER_MS);
        killedPort = await rc.killMasterOf(key);
        killedAt = Date.now();
      })();
      // When the replica has taken over (for the diagnostic; asserted below).
      const healing = killing.then(async () => {
        const deadline = killedAt + 30_000;
        while (!(await rc.clusterOk()) && Date.now() < deadline) await sleep(100);
        healedAt = Date.now();
      });
      healing.catch(() => {}); // awaited below; not an unhandled rejection meanwhile
      let i = 0;
      while (Date.now() - started < SEND_FOR_MS) {
        send(sa, channel.id, `a${i}`, sends);
        send(sb, channel.id, `b${i}`, sends);
        i++;
        await sleep(SEND_EVERY_MS);
      }
      await killing;
      t.diagnostic(`stream ${key} (partition ${partition}); killed master on port ${killedPort} ${killedAt - started} ms in; ${sends.length} sends`);

      // Every send answered, within the bound.
      const lastAt = Math.max(...sends.map((s) => s.at));
      const bound = OUTCOME_TIMEOUT_MS + OUTCOME_MARGIN_MS;
      await waitUntil(() => sends.every((s) => s.acks.length > 0), lastAt + bound + 1000 - Date.now(), () => {
        const open = sends.filter((s) => s.acks.length === 0);
        return `${open.length} of ${sends.length} sends without an outcome, e.g. ${open.slice(0, 5).map((s) => s.tempId).join(', ')}; ` +
          `sender disconnects: ${members.slice(0, 2).map((m) => JSON.stringify(m.disconnects)).join(' ')}`;
      }).catch((e) => assert.fail(e.message));
      const failedSends = sends.filter((s) => outcome(s).status === 'FAILED');
      const delivered = sends.filter((s) => outcome(s).status === 'DELIVERED');
      t.diagnostic(`outcomes: ${delivered.length} DELIVERED, ${failedSends.length} FAILED (${[...new Set(failedSends.map((s) => outcome(s).error))].join(' | ')}); ` +
        `slowest ack ${Math.max(...sends.map((s) => s.ackMs))} ms`);
      for (const s of sends) {
        const o = outcome(s);
        assert.equal(s.acks.length, 1, `${s.tempId}: one ack`);
        assert.ok(s.ackMs <= bound, `${s.tempId}: answered after ${s.ackMs} ms (bound ${OUTCOME_TIMEOUT_MS} + ${OUTCOME_MARGIN_MS} ms)`);
        assert.ok(o.status === 'DELIVERED' || o.status === 'FAILED', `${s.tempId}: final status, got ${JSON.stringify(o)}`);
        if (o.status === 'FAILED') assert.ok(typeof o.error === 'string' && o.error.length > 0, `${s.tempId}: FAILED says why: ${JSON.stringify(o)}`);
        else assert.ok(typeof o.messageId === 'string', `${s.tempId}: DELIVERED names the message: ${JSON.stringify(o)}`);
        // The events say the same as the ack, once (if the socket stayed up, they must be there).
        const finals = s.sender.finals.get(s.tempId) || [];
        assert.ok(finals.length <= 1, `${s.tempId}: one final event, got ${JSON.stringify(finals)}`);
        if (s.sender.disconnects.length === 0) assert.equal(finals.length, 1, `${s.tempId}: a final message:delivered/failed event`);
        if (finals.length) {
          assert.equal(finals[0].status, o.status, `${s.tempId}: event and ack agree: ${JSON.stringify(finals[0])} vs ${JSON.stringify(o)}`);
          if (o.status === 'DELIVERED') assert.equal(finals[0].messageId, o.messageId, `${s.tempId}: event and ack name one message`);
        }
      }

      // The cluster heals (the replica is promoted), then sends are DELIVERED again.
      await healing;
      assert.ok(await rc.clusterOk(), 'cluster_state:ok with every slot served within 30 s of the kill');
      t.diagnostic(`cluster ok again ${healedAt - killedAt} ms after the kill`);
      const after = [];
      for (let k = 0; k < 3; k++) {
        for (const m of [sa, sb]) {
          const s = send(m, channel.id, `after${k}`, after);
          await waitUntil(() => s.acks.length > 0, bound, () => `${s.tempId} (after the failover) answered`);
          assert.equal(outcome(s).status, 'DELIVERED', `a send after the failover (${Date.now() - healedAt} ms after it): ${JSON.stringify(outcome(s))}`);
        }
      }
      delivered.push(warm, ...after);

      // Stored: every DELIVERED once, nothing that FAILED.
      const stored = await fullHistory(cluster.url(1), cat, channel.id);
      const byId = new Map();
      for (const m of stored) byId.set(m.id, (byId.get(m.id) || 0) + 1);
      for (const s of delivered) {
        assert.equal(byId.get(outcome(s).messageId) || 0, 1, `${s.tempId} (DELIVERED ${outcome(s).messageId}) is in the history once`);
      }
      const storedContents = new Set(stored.map((m) => m.content));
      for (const s of failedSends) {
        assert.ok(!storedContents.has(s.content), `${s.tempId} was answered FAILED (${outcome(s).error}) but is stored`);
      }
      assert.equal(stored.length, delivered.length, 'the history holds exactly the DELIVERED messages');
      const seqs = stored.map((m) => m.seq);
      assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), 'history in seq order');

      // Seen by every member: all of it, once, in seq order.
      const want = stored.map((m) => m.id);
      await waitUntil(() => members.every((m) => want.every((id) => m.chat.messages.some((x) => x.id === id))), 20_000,
        () => `members hold ${members.map((m) => m.chat.messages.length).join(', ')} of ${want.length} messages`)
        .catch((e) => assert.fail(e.message));
      for (const m of members) {
        assert.deepEqual(m.chat.messages.map((x) => x.id), want, `${m.userId}: every stored message once, in seq order`);
        // Within one connection the server sends no duplicate and keeps the order (a reconnect
        // may replay what the client had: recovering-client drops those by id).
        for (const [n, c] of m.connections.entries()) {
          for (let k = 1; k < c.created.length; k++) {
            assert.ok(c.created[k].seq > c.created[k - 1].seq,
              `${m.userId}, connection ${n + 1}: seq ${c.created[k].seq} after ${c.created[k - 1].seq}`);
          }
        }
      }
      t.diagnostic(`member reconnects: ${members.map((m) => m.connections.length - 1).join(', ')}; ` +
        `recoveries: ${members.map((m) => m.chat.recoveries.length).join(', ')}`);
    } catch (e) {
      errors.push(e);
      if (cluster) cluster.printLogs(80);
    } finally {
      for (const m of members) m.socket.disconnect();
      // Restarted before the deployment's key cleanup, so that cleanup finds every master.
      if (killedPort !== null) await rc.restart(killedPort).catch((e) => errors.push(e));
      if (cluster) await cluster.stop().catch((e) => errors.push(e));
      await rc.stop().catch((e) => errors.push(e));
    }
    if (errors.length === 1) throw errors[0];
    if (errors.length > 1) throw new AggregateError(errors, errors.map((e) => e.message).join('\n---\n'));
  });
