// A real Prometheus (Debian's `prometheus` server, on 127.0.0.1) scrapes a 2-gateway/2-worker
// cluster under a little traffic, loads the alert rules of deploy/prometheus/alerts.yml, and every
// PromQL query of every panel of the Grafana dashboard must return data: the dashboard shows no
// metric that nobody exports. Cluster mode only.
//
// The server must be installed (`apt-get install prometheus`; deploy/check, which .ci/run runs
// before the tests, installs it): without it this test fails, it does not skip.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';
import {
  MODE, addMember, api, connectUser, createChannel, createSocket, emitAck, freePort, randomHex, sendAndWait, sleep, startCluster, uid,
  waitUntil,
} from '../lib/harness.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const DASHBOARD = path.join(ROOT, 'deploy/grafana/dashboards/switchboard.json');
const ALERTS = path.join(ROOT, 'deploy/prometheus/alerts.yml');

function prometheusBinary() {
  for (const p of [process.env.PROMETHEUS_BIN, '/usr/bin/prometheus', '/usr/local/bin/prometheus']) {
    if (p && fs.existsSync(p)) return p;
  }
  const which = spawnSync('sh', ['-c', 'command -v prometheus'], { encoding: 'utf8' });
  return which.status === 0 ? which.stdout.trim() : null;
}

/** Every PromQL query of the dashboard, with its panel title; Grafana's interval macros as 1m. */
function dashboardQueries() {
  const dashboard = JSON.parse(fs.readFileSync(DASHBOARD, 'utf8'));
  const panels = (dashboard.panels || []).flatMap((p) => (p.type === 'row' ? p.panels || [] : [p]));
  return panels.flatMap((p) => (p.targets || [])
    .filter((t) => t.expr)
    .map((t) => ({ panel: p.title, refId: t.refId, expr: t.expr.replaceAll(/\$__(rate_)?interval|\$__range/g, '1m') })));
}

let cluster = null;
let prom = null;
let promUrl = null;
let promLog = '';
let dir = null;

before(async () => {
  if (MODE === 'embedded') return;
  const bin = prometheusBinary();
  assert.ok(bin, 'the prometheus server is required: apt-get install prometheus (deploy/check installs it)');

  cluster = await startCluster({ gateways: 2, workers: 0 });
  const metricsPorts = [await freePort(), await freePort()];
  for (const port of metricsPorts) cluster.addWorker({ METRICS_PORT: port, HOST: '127.0.0.1' });
  for (const port of metricsPorts) {
    await waitUntil(async () => (await fetch(`http://127.0.0.1:${port}/readyz`).catch(() => null))?.status === 200, 20_000,
      () => `worker metrics port ${port} not ready`);
  }

  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sbprom-'));
  const target = (u) => u.replace(/^http:\/\//, '');
  const config = [
    'global:',
    '  scrape_interval: 1s',
    '  evaluation_interval: 1s',
    'rule_files:',
    `  - ${JSON.stringify(ALERTS)}`,
    'scrape_configs:',
    '  - job_name: switchboard-gateway',
    '    static_configs:',
    `      - targets: ${JSON.stringify(cluster.urls.map(target))}`,
    '  - job_name: switchboard-worker',
    '    static_configs:',
    `      - targets: ${JSON.stringify(metricsPorts.map((p) => `127.0.0.1:${p}`))}`,
    '',
  ].join('\n');
  fs.writeFileSync(path.join(dir, 'prometheus.yml'), config);
  const port = await freePort();
  promUrl = `http://127.0.0.1:${port}`;
  prom = spawn(bin, [
    `--config.file=${path.join(dir, 'prometheus.yml')}`,
    `--storage.tsdb.path=${path.join(dir, 'data')}`,
    `--web.listen-address=127.0.0.1:${port}`,
    '--log.level=warn',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  prom.stdout.on('data', (d) => { promLog += d; });
  prom.stderr.on('data', (d) => { promLog += d; });
  await waitUntil(async () => (await fetch(`${promUrl}/-/ready`).catch(() => null))?.status === 200, 20_000,
    () => `prometheus not ready on ${promUrl}:\n${promLog.slice(-2000)}`);
}, { timeout: 120_000 });

after(async () => {
  if (prom && prom.exitCode === null) {
    const exited = new Promise((resolve) => prom.once('exit', resolve));
    prom.kill('SIGTERM');
    await Promise.race([exited, sleep(5000)]);
    if (prom.exitCode === null) prom.kill('SIGKILL');
  }
  if (cluster) await cluster.stop();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
}, { timeout: 60_000 });

async function query(expr) {
  const res = await fetch(`${promUrl}/api/v1/query?${new URLSearchParams({ query: expr })}`);
  const body = await res.json();
  assert.equal(body.status, 'success', `${expr}: ${JSON.stringify(body)}`);
  return body.data.result;
}

test('every Grafana panel query returns data from a real Prometheus scraping the cluster', { timeout: 120_000 }, async (t) => {
  if (MODE === 'embedded') return t.skip('needs a cluster (workers export half of the panels)');

  // Every target is scraped and up.
  await waitUntil(async () => {
    const up = await query('up');
    return up.length === 4 && up.every((s) => s.value[1] === '1');
  }, 20_000, () => 'not all 4 targets up');

  // Traffic: members on both gateways, messages over a few seconds (so rates and the latency
  // histogram have samples in every window), one refused message, one refused handshake.
  const a = uid('prom_a');
  const b = uid('prom_b');
  const channel = await createChannel(cluster.url(0), a, `prom-${randomHex(3)}`, false);
  assert.equal((await addMember(cluster.url(0), a, channel.id, b)).status, 201);
  const [sa, sb] = await Promise.all([connectUser(cluster.url(0), a), connectUser(cluster.url(1), b)]);
  for (let i = 0; i < 12; i++) {
    const ack = await sendAndWait(i % 2 ? sb : sa, { channelId: channel.id, content: `m${i}`, tempId: `p-${randomHex(4)}` });
    assert.equal(ack.status, 'DELIVERED', JSON.stringify(ack));
    await sleep(250);
  }
  await emitAck(sa, 'message:send', { channelId: channel.id, content: '', tempId: `bad-${randomHex(3)}` }).catch(() => {});
  const forged = createSocket(cluster.url(1), { auth: { token: 'Bearer not-a-jwt', userId: a } });
  await new Promise((resolve) => {
    forged.once('connection:error', resolve);
    forged.once('connect_error', resolve);
    forged.once('disconnect', resolve);
    setTimeout(resolve, 3000);
    forged.connect();
  });
  forged.close();
  assert.equal((await api(cluster.url(0), 'GET', '/healthz')).status, 200);

  // Let a few scrapes see the counters move.
  await sleep(4000);

  const queries = dashboardQueries();
  assert.ok(queries.length >= 10, `dashboard has only ${queries.length} queries`);
  const empty = [];
  for (const q of queries) {
    let result = await query(q.expr);
    if (result.length === 0) {
      await sleep(2000); // one more chance for a slow scrape
      result = await query(q.expr);
    }
    if (result.length === 0) empty.push(`"${q.panel}" ${q.refId}: ${q.expr}`);
  }
  assert.deepEqual(empty, [], `panel queries without data (a metric nobody exports?):\n${empty.join('\n')}`);

  // The alert rules loaded on a real server, and none fires on a healthy cluster.
  const rules = await (await fetch(`${promUrl}/api/v1/rules`)).json();
  const loaded = rules.data.groups.flatMap((g) => g.rules.map((r) => r.name));
  assert.ok(loaded.includes('SwitchboardPartitionsUnowned') && loaded.length >= 5, `rules loaded: ${loaded}`);
  const firing = (await query('ALERTS{alertstate="firing"}')).map((s) => s.metric.alertname);
  assert.deepEqual(firing, [], `alerts firing on a healthy cluster: ${firing}`);
});
