// OpenTelemetry export (CONTRACT §8): with OTEL_EXPORTER_OTLP_ENDPOINT set, gateways and workers
// export spans over OTLP/HTTP, and one message:send is one trace across both processes. A tiny
// OTLP/HTTP receiver (JSON encoding, OTEL_EXPORTER_OTLP_PROTOCOL=http/json) collects them.

import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, test } from 'node:test';
import {
  MODE, connectUser, createChannel, randomHex, sendAndWait, uid, useCluster, waitUntil,
} from '../lib/harness.mjs';

/** Every span received: {service, traceId, spanId, parentSpanId, name, attributes}. */
const spans = [];
let requests = 0;
const receiver = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    requests++;
    try {
      const body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      for (const rs of body.resourceSpans || []) {
        const service = (rs.resource?.attributes || []).find((a) => a.key === 'service.name')?.value?.stringValue;
        for (const ss of rs.scopeSpans || []) {
          for (const s of ss.spans || []) {
            const attributes = Object.fromEntries((s.attributes || []).map((a) => [a.key, Object.values(a.value || {})[0]]));
            spans.push({ service, traceId: s.traceId, spanId: s.spanId, parentSpanId: s.parentSpanId, name: s.name, attributes });
          }
        }
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    } catch (e) {
      res.writeHead(400).end(String(e));
    }
  });
});
await new Promise((resolve) => receiver.listen(0, '127.0.0.1', resolve));
const endpoint = `http://127.0.0.1:${receiver.address().port}`;

const sb = useCluster({
  gateways: 2,
  workers: 2,
  env: {
    OTEL_EXPORTER_OTLP_ENDPOINT: endpoint,
    OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
    OTEL_BSP_SCHEDULE_DELAY: '100',
  },
});

before(async () => { await sb.ready; });
after(() => new Promise((resolve) => receiver.close(resolve)));

test('one message:send is one trace: gateway append, worker dedupe/insert/publish, gateway deliver', { timeout: 60_000 }, async () => {
  const user = uid('otel');
  const channel = await createChannel(sb.url(0), user, `otel-${randomHex(3)}`, false);
  const socket = await connectUser(sb.url(0), user);
  const ack = await sendAndWait(socket, { channelId: channel.id, content: 'traced', tempId: `otel-${randomHex(4)}` });
  assert.equal(ack.status, 'DELIVERED', JSON.stringify(ack));
  const messageId = ack.payload.messageId;

  const root = () => spans.find((s) => s.name === 'message:send' && s.attributes.message_id === messageId);
  await waitUntil(() => root(), 15_000, () => `no message:send span for ${messageId} (${requests} OTLP requests, ${spans.length} spans: ${[...new Set(spans.map((s) => s.name))]})`);
  const traceId = root().traceId;
  assert.match(traceId, /^[0-9a-f]{32}$/);
  const want = MODE === 'cluster'
    ? ['message:send@switchboard-gateway', 'stream.append@switchboard-gateway', 'process_batch@switchboard-worker',
      'dedupe@switchboard-worker', 'insert@switchboard-worker', 'publish_settle_ack@switchboard-worker',
      'deliver@switchboard-gateway']
    : ['message:send@switchboard-gateway', 'stream.append@switchboard-gateway', 'process_batch@switchboard-gateway',
      'insert@switchboard-gateway', 'deliver@switchboard-gateway'];
  const have = () => new Set(spans.filter((s) => s.traceId === traceId).map((s) => `${s.name}@${s.service}`));
  await waitUntil(() => want.every((w) => have().has(w)), 15_000,
    () => `trace ${traceId} has ${[...have()]}; want ${want}`);
  // The worker's batch span is a child of the gateway's message span (the context came in the entry).
  const batch = spans.find((s) => s.traceId === traceId && s.name === 'process_batch');
  assert.equal(batch.parentSpanId, root().spanId);
});
