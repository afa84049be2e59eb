// Every refused handshake gets its connection:error before the server closes
// it (CONTRACT §2, issue 11 finding 1): 300 refusals of mixed causes, over both
// transports and both URL readings, 20 at a time.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { auth, createSocket, uid, useCluster, waitFor } from '../lib/harness.mjs';

const sb = useCluster({ gateways: 2, workers: 1, env: { AUTH_FAIL_THRESHOLD: '20' } });

test('300 refused handshakes all get their connection:error, then a server disconnect', async () => {
  const cluster = await sb.ready;
  const victim = uid('victim');
  const causes = [
    () => ({ token: 'Bearer abc', userId: victim }),
    () => ({ token: `Bearer ${auth.token(victim, { exp: auth.now() - 60, iat: auth.now() - 120, nbf: auth.now() - 120 })}`, userId: victim }),
    () => ({ token: `Bearer ${auth.token(uid('other'))}`, userId: victim }),
    () => null,
  ];
  const lost = [];
  const one = async (i) => {
    const s = createSocket(cluster.url(i % 2), {
      auth: causes[i % causes.length](),
      transports: i % 3 === 0 ? ['polling'] : ['websocket'],
      way: i % 2 ? 'path' : 'namespace',
    });
    s.connect();
    try {
      const error = await waitFor(s, 'connection:error', null, 8000);
      assert.equal(error.reason, 'auth_error');
      assert.equal(await waitFor(s, 'disconnect', null, 5000), 'io server disconnect');
    } catch (e) {
      lost.push(`${i}: ${e.message}`);
    }
    s.disconnect();
  };
  for (let b = 0; b < 300; b += 20) {
    await Promise.all(Array.from({ length: 20 }, (_, k) => one(b + k)));
  }
  assert.deepEqual(lost, []);
});
