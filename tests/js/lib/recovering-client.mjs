// A reference client: how a stock socket.io-client app gets every message of
// its channels exactly once, in order, across reconnects (CONTRACT §9).
//
// 1. Keep, per channel, the highest `message.seq` you hold.
// 2. Pass it as `auth.since` on every (re)connection. socket.io-client calls an
//    `auth` *function* before each attempt, so the map is always current (and
//    a fresh Clerk token can be fetched there too).
// 3. Dedupe `message:created` by message id: a replayed message you already
//    had is dropped, and `seq` only moves forward.
// 4. `channel:recovered {recovered: false, lastSeq}` means more was missed
//    than the server replays: reload that channel through the history API.
//
//   const chat = recoveringClient(io, url, { userId, getToken, ioOptions });
//   chat.onMessage = (message) => render(message);

/**
 * `io` is socket.io-client's `io`; `getToken()` returns a (fresh) JWT.
 * Returns {socket, since, messages, recoveries}: `messages` lists every
 * distinct message in arrival order; `recoveries` every `channel:recovered`.
 */
export function recoveringClient(io, url, { userId, getToken, ioOptions = {} }) {
  const since = {};
  const seen = new Set();
  const chat = { since, messages: [], recoveries: [], onMessage: null };
  const socket = io(url, {
    ...ioOptions,
    auth: (cb) => cb({ token: `Bearer ${getToken()}`, userId, since: { ...since } }),
  });
  socket.on('connection:success', ({ positions = {} }) => {
    // First time a channel is seen: start from where it stands (an app would
    // load its recent history through REST here).
    for (const [channelId, seq] of Object.entries(positions)) {
      if (!(channelId in since)) since[channelId] = seq;
    }
  });
  socket.on('message:created', ({ message }) => {
    if (seen.has(message.id)) return;
    seen.add(message.id);
    since[message.channelId] = Math.max(since[message.channelId] ?? 0, message.seq);
    chat.messages.push(message);
    chat.onMessage?.(message);
  });
  socket.on('channel:recovered', (r) => chat.recoveries.push(r));
  chat.socket = socket;
  return chat;
}
