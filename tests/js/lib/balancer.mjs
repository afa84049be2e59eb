// A TCP load balancer over a cluster's gateways, as a proxy in front of a real deployment:
// round robin over the ports `getPorts()` returns at each connection, skipping dead ones.
// Used by the recovery tests and the rolling-restart benchmark.

import net from 'node:net';

/** Resolves with the listening `net.Server` (its port: `server.address().port`). */
export function balancer(getPorts) {
  let next = 0;
  const server = net.createServer((client) => {
    const ports = getPorts();
    const tryPort = (left) => {
      if (left === 0) return client.destroy();
      const port = ports[next++ % ports.length];
      const upstream = net.connect(port, '127.0.0.1');
      upstream.once('connect', () => {
        client.pipe(upstream).pipe(client);
      });
      upstream.once('error', () => {
        if (!upstream.connecting && upstream.bytesRead > 0) return client.destroy();
        tryPort(left - 1);
      });
      client.once('error', () => upstream.destroy());
      client.once('close', () => upstream.destroy());
      upstream.once('close', () => client.destroy());
    };
    tryPort(ports.length);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}
