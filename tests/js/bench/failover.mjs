// Failover figures for BENCHMARKS.md (not part of the test suite):
//   cd tests/js && node bench/failover.mjs [rate_per_s=300] [seconds=12]
// Starts 2 gateways + 2 workers with the default lease settings (LEASE_TTL_MS 2000,
// STREAM_PARTITIONS 16), sends `rate` messages/s spread over 16 channels, and in the middle of
// the run stops worker 0: once with SIGTERM, once (on a fresh cluster) with SIGKILL. Reports
// send -> DELIVERED latency (p50/p99/max) of the messages sent in the 3 s after the stop, and of
// the whole run, and checks that every message was DELIVERED exactly once.
import {
  addMember, connectUser, createChannel, randomHex, sleep, startCluster, uid,
} from '../lib/harness.mjs';

const RATE = Number(process.argv[2] || 300);
const SECONDS = Number(process.argv[3] || 12);
const CHANNELS = 16;

function pct(sorted, p) {
  if (!sorted.length) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}
function summary(lat) {
  const s = [...lat].sort((a, b) => a - b);
  return `n=${s.length} p50=${pct(s, 50)} ms p99=${pct(s, 99)} ms max=${s[s.length - 1]} ms`;
}

async function run(signal) {
  const cluster = await startCluster({
    gateways: 2,
    workers: 2,
    env: { LEASE_TTL_MS: '2000', STREAM_PARTITIONS: '16', RATE_MESSAGES_PER_S: '0', RUST_LOG: process.env.BENCH_LOG || 'warn' },
  });
  try {
    const senders = [];
    for (let c = 0; c < CHANNELS; c++) {
      const owner = uid(`fo${c}`);
      const channel = await createChannel(cluster.url(c % 2), owner, `fo-${randomHex(3)}`, true);
      const reader = uid(`rd${c}`);
      await addMember(cluster.url(0), owner, channel.id, reader);
      const socket = await connectUser(cluster.url(c % 2), owner);
      senders.push({ socket, channel });
    }
    const sent = new Map(); // tempId -> {at, done}
    const delivered = [];
    let duplicates = 0;
    let failed = 0;
    for (const { socket } of senders) {
      socket.on('message:delivered', (p) => {
        if (p.status !== 'DELIVERED') return;
        const s = sent.get(p.tempId);
        if (!s) return;
        if (s.done) { duplicates++; return; }
        s.done = Date.now();
        delivered.push({ at: s.at, ms: s.done - s.at });
      });
      socket.on('message:failed', () => { failed++; });
    }
    const start = Date.now();
    const stopAt = start + (SECONDS * 1000) / 2;
    let stoppedAt = null;
    let i = 0;
    const interval = 1000 / RATE;
    while (Date.now() - start < SECONDS * 1000) {
      if (!stoppedAt && Date.now() >= stopAt) {
        stoppedAt = Date.now();
        cluster.workers[0].expectedExit = true;
        cluster.workers[0].child.kill(signal);
      }
      const { socket, channel } = senders[i % CHANNELS];
      const tempId = `fo-${i}-${randomHex(3)}`;
      sent.set(tempId, { at: Date.now(), done: null });
      socket.emit('message:send', { channelId: channel.id, content: `m${i}`, tempId });
      i++;
      const next = start + i * interval;
      const wait = next - Date.now();
      if (wait > 0) await sleep(wait);
    }
    const deadline = Date.now() + 15_000;
    while (delivered.length + failed < sent.size && Date.now() < deadline) await sleep(100);
    const after = delivered.filter((d) => d.at >= stoppedAt && d.at < stoppedAt + 3000).map((d) => d.ms);
    const missing = sent.size - delivered.length - failed;
    console.log(`${signal}: sent ${sent.size} at ${RATE}/s over ${SECONDS} s; delivered ${delivered.length}, failed ${failed}, missing ${missing}, duplicate DELIVERED ${duplicates}`);
    console.log(`  whole run:               ${summary(delivered.map((d) => d.ms))}`);
    console.log(`  sent within 3 s of stop: ${summary(after)}`);
    return { missing, failed, duplicates };
  } finally {
    await cluster.stop({ quiet: true });
  }
}

const results = [];
for (const signal of ['SIGTERM', 'SIGKILL']) results.push(await run(signal));
process.exit(results.every((r) => r.missing === 0 && r.failed === 0 && r.duplicates === 0) ? 0 : 1);
