// Connection scenario: new sockets arrive at RATE/s until CONNECTIONS are
// opened; each authenticates and stays connected for HOLD seconds.
// Measures connect+auth time (websocket open -> `connection:success`).
//
//   k6 run -e TARGETS=http://127.0.0.1:3002 -e DEV_SECRET=... connect.js

import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import ws from 'k6/ws';
import { env, runId, socketIO, socketUrl, TARGETS, user } from './lib/socketio.js';

const CONNECTIONS = env('CONNECTIONS', 1000);
const RATE = env('RATE', 100); // new connections per second
const HOLD = env('HOLD', 30); // seconds each connection stays open once authenticated
const CONNECT_TIMEOUT = env('CONNECT_TIMEOUT', 10); // seconds to reach connection:success

const connectAuthMs = new Trend('connect_auth_ms', true);
const connectFailures = new Counter('connect_failures');

export const options = {
  scenarios: {
    connect: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: `${Math.ceil((CONNECTIONS * 1000) / RATE)}ms`,
      // Every iteration holds its VU for ~HOLD s, so about RATE*HOLD run at once.
      preAllocatedVUs: Math.min(CONNECTIONS, Math.ceil(RATE * (HOLD + 2))),
      maxVUs: CONNECTIONS,
      gracefulStop: `${HOLD + CONNECT_TIMEOUT + 5}s`, // let the last ones finish holding
    },
  },
  thresholds: {
    connect_auth_ms: ['p(99)<100'],
    connect_failures: ['count==0'],
    checks: ['rate==1'],
  },
};

export function setup() {
  return { run: runId() };
}

export default function (data) {
  const i = exec.scenario.iterationInTest; // one connection per iteration
  if (i >= CONNECTIONS) return;
  const me = user(i, `k6-${data.run}-c`);

  let openedAt = 0;
  let authed = false;
  let held = false;
  let closing = false;

  const res = ws.connect(socketUrl(TARGETS[i % TARGETS.length]), null, (socket) => {
    const close = () => {
      closing = true;
      socket.close();
    };
    socketIO(socket, me, {
      open() {
        openedAt = Date.now();
      },
      event(name, payload) {
        if (name === 'connection:success' && !authed) {
          authed = true;
          connectAuthMs.add(Date.now() - openedAt);
          socket.setTimeout(() => {
            held = true;
            close();
          }, HOLD * 1000);
        } else if (name === 'connection:error') {
          console.warn(`${me.id}: connection:error ${JSON.stringify(payload)}`);
          close();
        }
      },
      fail(reason) {
        if (closing) return; // our own close
        console.warn(`${me.id}: ${reason}`);
        close();
      },
    });
    socket.setTimeout(() => authed || close(), CONNECT_TIMEOUT * 1000);
  });

  check(res, { 'websocket upgraded (101)': (r) => r && r.status === 101 });
  check(authed, { 'authenticated (connection:success)': (ok) => ok });
  check(held, { 'held for HOLD s': (ok) => ok });
  if (!authed) connectFailures.add(1);
}
