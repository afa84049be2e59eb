// Rolling restart under load, for BENCHMARKS.md (issue 12; not part of the test suite):
//   cd tests/js && SWITCHBOARD_BIN_DIR=../../target/release node bench/rolling-restart.mjs [rate_per_s=100]
// 2 gateways + 2 workers behind a TCP load balancer (lib/balancer.mjs). 8 channels, each with a
// sender and 4 readers, all stock socket.io-client behind the balancer with reconnection on. While
// `rate` messages/s are sent, every process is restarted in turn with SIGTERM: gateway 0, gateway 1,
// worker 0, worker 1 (each replaced and ready before the next).
//
// The senders do what a client app does: a send not answered DELIVERED is sent again with the same
// tempId after a reconnect or a message:failed (dedupe makes that safe). Readers keep `since`
// current (lib/recovering-client.mjs). Checked at the end: every message is stored exactly once,
// and every reader holds every message of its channel exactly once, in seq order. Reported:
// send -> message:created (first attempt to the first reader that got it) p50/p99/max, over the
// whole run and for the messages sent during the restarts, and how many sends were repeated.
import { io } from 'socket.io-client';
import {
  SIO_PATH, addMember, auth, createChannel, fullHistory, sleep, startCluster, uid, waitUntil,
} from '../lib/harness.mjs';
import { balancer } from '../lib/balancer.mjs';
import { recoveringClient } from '../lib/recovering-client.mjs';

const RATE = Number(process.argv[2] || 100);
const CHANNELS = 8;
const READERS = 4;

const pct = (s, p) => s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
const summary = (lat) => {
  const s = [...lat].sort((a, b) => a - b);
  return `n=${s.length} p50=${pct(s, 50)} ms p99=${pct(s, 99)} ms max=${s[s.length - 1]} ms`;
};

/** A sender that resends (same tempId) whatever is not DELIVERED after a reconnect or a failure. */
function resendingSender(url, userId, channelId) {
  const pending = new Map(); // tempId -> {content, firstAt}
  let resent = 0;
  const socket = io(url, {
    path: SIO_PATH,
    transports: ['websocket'],
    reconnectionDelay: 100,
    reconnectionDelayMax: 500,
    forceNew: true,
    auth: (cb) => cb({ token: `Bearer ${auth.token(userId)}`, userId }),
  });
  const emit = (tempId) => socket.emit('message:send', { channelId, content: pending.get(tempId).content, tempId });
  socket.on('connection:success', () => {
    for (const tempId of pending.keys()) {
      resent++;
      emit(tempId);
    }
  });
  socket.on('message:delivered', (p) => {
    if (p.status === 'DELIVERED') pending.delete(p.tempId);
  });
  socket.on('message:failed', (p) => {
    if (!pending.has(p.tempId)) return;
    // Refused by a draining gateway, or outcome unknown: try again shortly (on this connection
    // if it still works, else the reconnect resends it).
    setTimeout(() => {
      if (pending.has(p.tempId) && socket.connected) {
        resent++;
        emit(p.tempId);
      }
    }, 200);
  });
  return {
    socket,
    pending,
    get resent() { return resent; },
    send(tempId, content) {
      pending.set(tempId, { content, firstAt: Date.now() });
      if (socket.connected) emit(tempId);
    },
  };
}

const cluster = await startCluster({
  gateways: 2,
  workers: 2,
  env: { STREAM_PARTITIONS: '8', RATE_MESSAGES_PER_S: '0', RUST_LOG: process.env.BENCH_LOG || 'warn' },
});
const ports = () => cluster.gateways.filter((g) => g && g.alive).map((g) => g.port);
const lb = await balancer(ports);
const lbUrl = `http://127.0.0.1:${lb.address().port}`;
try {
  const lanes = [];
  for (let c = 0; c < CHANNELS; c++) {
    const owner = uid(`rr${c}`);
    const channel = await createChannel(cluster.url(0), owner);
    const readers = [];
    for (let r = 0; r < READERS; r++) {
      const reader = uid(`rd${c}`);
      await addMember(cluster.url(0), owner, channel.id, reader);
      readers.push(recoveringClient(io, lbUrl, {
        userId: reader,
        getToken: () => auth.token(reader),
        ioOptions: { path: SIO_PATH, transports: ['websocket'], reconnectionDelay: 100, reconnectionDelayMax: 500, forceNew: true },
      }));
    }
    lanes.push({ ownerId: owner, channel, readers, sender: resendingSender(lbUrl, owner, channel.id), sent: [] });
  }
  await waitUntil(() => lanes.every((l) => l.sender.socket.connected && l.readers.every((r) => r.socket.connected)), 15_000, () => 'all connected');

  const firstSeen = new Map(); // tempId -> ms of the first message:created at any reader
  const sentAt = new Map();
  for (const l of lanes) {
    for (const r of l.readers) {
      r.socket.on('message:created', ({ tempId }) => {
        if (tempId && !firstSeen.has(tempId)) firstSeen.set(tempId, Date.now());
      });
    }
  }

  let sending = true;
  let i = 0;
  const sender = (async () => {
    while (sending) {
      const lane = lanes[i % CHANNELS];
      const tempId = `rr-${i}`;
      sentAt.set(tempId, Date.now());
      lane.sent.push(tempId);
      lane.sender.send(tempId, `m ${i}`);
      i++;
      await sleep(1000 / RATE);
    }
  })();

  await sleep(2000);
  const rollStart = Date.now();
  const steps = [];
  for (const g of [0, 1]) {
    const t0 = Date.now();
    await cluster.killGateway(g, 'SIGTERM');
    await cluster.startGateway(g);
    steps.push(`gateway ${g}: ${Date.now() - t0} ms`);
    await sleep(1000);
  }
  for (const w of [0, 1]) {
    const t0 = Date.now();
    await cluster.killWorker(w, 'SIGTERM');
    const fresh = cluster.addWorker();
    await waitUntil(() => fresh.alive, 10_000, () => 'worker started');
    steps.push(`worker ${w}: ${Date.now() - t0} ms`);
    await sleep(1000);
  }
  const rollEnd = Date.now();
  await sleep(2000);
  sending = false;
  await sender;

  const total = i;
  await waitUntil(() => lanes.every((l) => l.sender.pending.size === 0), 30_000,
    () => `unanswered sends: ${lanes.map((l) => l.sender.pending.size).join(',')}`);
  let stored = 0;
  const problems = [];
  for (const l of lanes) {
    const history = await waitUntil(async () => {
      const h = await fullHistory(cluster.url(0), l.ownerId, l.channel.id);
      return h.length >= l.sent.length ? h : null;
    }, 20_000, () => `channel ${l.channel.id} persisted`).catch((e) => { problems.push(e.message); return []; });
    stored += history.length;
    const contents = history.map((m) => m.content); // unique per send: `m <i>`
    if (history.length !== l.sent.length) problems.push(`channel ${l.channel.id}: ${history.length} stored for ${l.sent.length} sent`);
    if (new Set(contents).size !== contents.length) problems.push(`channel ${l.channel.id}: a message stored twice`);
    const want = history.map((m) => m.id);
    await waitUntil(() => l.readers.every((r) => r.messages.length >= want.length), 20_000, () => 'readers caught up').catch(() => {});
    for (const r of l.readers) {
      const got = r.messages.map((m) => m.id);
      if (JSON.stringify(got) !== JSON.stringify(want)) problems.push(`a reader of ${l.channel.id} holds ${got.length}/${want.length} (or out of order / duplicated)`);
    }
  }
  const all = [];
  const during = [];
  for (const [tempId, at] of sentAt) {
    const seen = firstSeen.get(tempId);
    if (seen === undefined) continue;
    all.push(seen - at);
    if (at >= rollStart && at <= rollEnd) during.push(seen - at);
  }
  const resent = lanes.reduce((n, l) => n + l.sender.resent, 0);
  console.log(`rolling restart at ${RATE} msgs/s: ${total} sent, ${stored} stored, ${resent} sends repeated by the clients`);
  console.log(`restarts: ${steps.join(', ')} (roll took ${((rollEnd - rollStart) / 1000).toFixed(1)} s)`);
  console.log(`send -> created, whole run:      ${summary(all)}`);
  console.log(`send -> created, during the roll: ${summary(during)}`);
  console.log(problems.length ? `PROBLEMS:\n  ${problems.join('\n  ')}` : 'nothing lost, nothing duplicated, every reader in seq order');
  process.exitCode = problems.length ? 1 : 0;
  for (const l of lanes) {
    l.sender.socket.disconnect();
    for (const r of l.readers) r.socket.disconnect();
  }
} finally {
  lb.close();
  await cluster.stop({ quiet: true });
}
