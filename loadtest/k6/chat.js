// Chat scenario: CHANNELS channels of MEMBERS members, one socket per member;
// every socket sends RATE_PER_SOCKET messages/s to its channel for DURATION s.
// Measures send -> `message:created` at every receiver (the sender included),
// send -> `message:delivered` (DELIVERED) at the sender, and checks that each
// receiver sees every channel's `seq` increase.
//
//   k6 run -e TARGETS=http://127.0.0.1:3002,http://127.0.0.1:3003 -e DEV_SECRET=... chat.js

import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import ws from 'k6/ws';
import { addMembers, createChannel, env, runId, socketIO, socketUrl, TARGETS, user, userCount } from './lib/socketio.js';

const CHANNELS = env('CHANNELS', 10);
const MEMBERS = env('MEMBERS', 10);
const RATE_PER_SOCKET = env('RATE_PER_SOCKET', 1); // messages/s per socket
const DURATION = env('DURATION', 30); // seconds of sending
const WARMUP = env('WARMUP', 5); // seconds after setup for every socket to connect
const DRAIN = env('DRAIN', 5); // seconds to keep listening after the last send
const CONNECT_TIMEOUT = env('CONNECT_TIMEOUT', 10);
const VUS = CHANNELS * MEMBERS;

// Membership: user i (VU i+1) is in channel i % CHANNELS, so channel c holds
// users c, c+CHANNELS, c+2*CHANNELS, ... and its owner is user c.
const channelOf = (i) => i % CHANNELS;
const prefix = (run) => `k6-${run}-u`;

const sendToCreated = new Trend('send_to_created_ms', true);
const sendToDelivered = new Trend('send_to_delivered_ms', true);
const messagesSent = new Counter('messages_sent');
const messagesDelivered = new Counter('messages_delivered');
const messagesFailed = new Counter('messages_failed');
const deliveries = new Counter('deliveries');
const outOfOrder = new Counter('out_of_order');

export const options = {
  setupTimeout: '5m',
  scenarios: {
    chat: {
      executor: 'per-vu-iterations',
      vus: VUS,
      iterations: 1,
      maxDuration: `${WARMUP + DURATION + DRAIN + 60}s`,
    },
  },
  thresholds: {
    send_to_created_ms: ['p(99)<25'],
    messages_failed: ['count==0'],
    out_of_order: ['count==0'],
    checks: ['rate==1'],
  },
};

export function setup() {
  if (userCount() < VUS) throw new Error(`TOKENS_FILE has ${userCount()} users; CHANNELS*MEMBERS needs ${VUS}`);
  const run = runId();
  const channels = [];
  for (let c = 0; c < CHANNELS; c++) {
    const owner = user(c, prefix(run));
    const id = createChannel(TARGETS[0], owner, `k6-${run}-ch${c}`);
    const others = [];
    for (let m = 1; m < MEMBERS; m++) others.push(user(c + m * CHANNELS, prefix(run)).id);
    if (others.length > 0) addMembers(TARGETS[0], owner, id, others);
    channels.push(id);
  }
  // One start time for every VU, so that all members listen before anyone sends.
  return { run, channels, startAt: Date.now() + WARMUP * 1000 };
}

export default function (data) {
  const i = exec.vu.idInTest - 1;
  const me = user(i, prefix(data.run));
  const channelId = data.channels[channelOf(i)];
  const interval = 1000 / RATE_PER_SOCKET;
  const stopAt = data.startAt + DURATION * 1000;
  const lastSeq = {}; // channelId -> highest seq seen here
  let authed = false;
  let onTime = false;
  let sent = 0;
  let answered = 0; // DELIVERED or FAILED

  const res = ws.connect(socketUrl(TARGETS[i % TARGETS.length]), null, (socket) => {
    const emit = socketIO(socket, me, {
      event(name, d) {
        const now = Date.now();
        switch (name) {
          case 'connection:success': {
            authed = true;
            onTime = now < data.startAt;
            check(d, { 'member of its channel': (p) => p.channels.indexOf(channelId) >= 0 });
            // Spread the sockets' sends over the interval instead of bursting together.
            const phase = (i / VUS) * interval;
            socket.setTimeout(startSending, Math.max(0, data.startAt - now) + phase);
            socket.setTimeout(() => socket.close(), Math.max(0, stopAt + DRAIN * 1000 - now));
            break;
          }
          case 'message:created': {
            const m = d.message;
            deliveries.add(1);
            sendToCreated.add(now - parseInt(m.content, 10)); // content starts with the send time
            const last = lastSeq[m.channelId] || 0;
            if (m.seq <= last) outOfOrder.add(1);
            else lastSeq[m.channelId] = m.seq;
            break;
          }
          case 'message:delivered':
            if (d.status === 'DELIVERED') {
              answered++;
              messagesDelivered.add(1);
              sendToDelivered.add(now - Number(d.tempId.slice(d.tempId.lastIndexOf('-') + 1)));
            }
            break;
          case 'message:failed':
            answered++;
            messagesFailed.add(1);
            console.warn(`${me.id}: message:failed ${JSON.stringify(d)}`);
            break;
          case 'connection:error':
            console.warn(`${me.id}: connection:error ${JSON.stringify(d)}`);
            socket.close();
            break;
          default:
            break;
        }
      },
      fail(reason) {
        console.warn(`${me.id}: ${reason}`);
      },
    });

    function send() {
      const t = Date.now();
      if (t >= stopAt) return; // k6/ws has no clearInterval; the socket closes after DRAIN
      sent++;
      // The send time rides in content (for receivers) and tempId (for the sender).
      emit('message:send', { content: `${t} k6 ${me.id} #${sent}`, channelId, tempId: `${i}-${sent}-${t}` });
      messagesSent.add(1);
    }

    function startSending() {
      send();
      socket.setInterval(send, interval);
    }

    socket.setTimeout(() => authed || socket.close(), CONNECT_TIMEOUT * 1000);
  });

  check(res, { 'websocket upgraded (101)': (r) => r && r.status === 101 });
  check(authed, { 'authenticated (connection:success)': (ok) => ok });
  check(onTime, { 'connected before the start (raise WARMUP if not)': (ok) => ok });
  check(answered, { 'every sent message answered': (n) => n === sent });
}
