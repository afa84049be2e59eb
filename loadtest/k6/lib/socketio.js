// Shared helpers of the Switchboard k6 scripts:
// - env parsing and the target list,
// - Engine.IO v4 / Socket.IO v5 framing over `k6/ws` (k6 has no Socket.IO
//   module; the handful of frames we need is easy to speak by hand),
// - user ids and their tokens (HS256 minted here, or read from a file),
// - the two REST calls the chat scenario needs.

import { check } from 'k6';
import crypto from 'k6/crypto';
import { SharedArray } from 'k6/data';
import encoding from 'k6/encoding';
import http from 'k6/http';

// ---------------------------------------------------------------- settings

/** `__ENV[name]`, as a number when the default is one. */
export function env(name, def) {
  const v = __ENV[name];
  if (v === undefined || v === '') return def;
  if (typeof def !== 'number') return v;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name} must be a number, got "${v}"`);
  return n;
}

/** Gateway base URLs (`TARGETS`, comma list of http(s)://host:port). */
export const TARGETS = env('TARGETS', 'http://127.0.0.1:3002')
  .split(',')
  .map((t) => t.trim().replace(/\/+$/, ''))
  .filter((t) => t !== '');

/** A run id, so that the users and channels of two runs never collide. */
export function runId() {
  return env('RUN_ID', Date.now().toString(36));
}

// ------------------------------------------------------------------ framing

/** websocket URL of namespace `/` on the Engine.IO path `/api/socket.io/`. */
export function socketUrl(base) {
  return `${base.replace(/^http/, 'ws')}/api/socket.io/?EIO=4&transport=websocket`;
}

/** Socket.IO CONNECT to namespace `/`, carrying the handshake `auth`. */
export function encodeConnect(auth) {
  return `40${JSON.stringify(auth)}`;
}

/** Socket.IO EVENT: `42["name",data]`. */
export function encodeEvent(name, data) {
  return `42${JSON.stringify([name, data])}`;
}

/**
 * Parses one text frame into `{type, ...}`:
 * `open` (EIO `0{...}`), `ping` (EIO `2`), `close` (EIO `1`),
 * `connect` (SIO `40{"sid"}`), `disconnect` (`41`), `event` (`42[...]`,
 * with `name` and `data`), `connect_error` (`44{...}`), else `other`.
 */
export function parseFrame(text) {
  switch (text.charAt(0)) {
    case '0': return { type: 'open', data: JSON.parse(text.slice(1)) };
    case '1': return { type: 'close' };
    case '2': return { type: 'ping' };
    case '4': break; // a Socket.IO packet, below
    default: return { type: 'other' };
  }
  const body = text.slice(2);
  switch (text.charAt(1)) {
    case '0': return { type: 'connect', data: body ? JSON.parse(body) : {} };
    case '1': return { type: 'disconnect' };
    case '2': {
      // `42[...]`, or `42<ackId>[...]` when the server wants an ack.
      const [name, data] = JSON.parse(body.slice(body.indexOf('[')));
      return { type: 'event', name, data };
    }
    case '4': return { type: 'connect_error', data: body ? JSON.parse(body) : {} };
    default: return { type: 'other' };
  }
}

/**
 * Speaks Socket.IO on a `k6/ws` socket (call it inside `ws.connect`'s
 * callback): answers the Engine.IO open with the auth CONNECT and every ping
 * with a pong, and hands the rest to `on`:
 *   on.open()              websocket open (before the Engine.IO handshake)
 *   on.event(name, data)   a server event (`connection:success`, ...)
 *   on.fail(reason)        connect_error, a server disconnect, a ws error
 * Returns `emit(name, data)`.
 */
export function socketIO(socket, user, on) {
  socket.on('open', () => on.open && on.open());
  socket.on('message', (text) => {
    const f = parseFrame(text);
    switch (f.type) {
      case 'open': socket.send(encodeConnect(authOf(user))); break;
      case 'ping': socket.send('3'); break;
      case 'event': on.event(f.name, f.data); break;
      case 'connect_error': on.fail && on.fail(`connect_error ${JSON.stringify(f.data)}`); break;
      case 'disconnect':
      case 'close': on.fail && on.fail(`server ${f.type}`); break;
      default: break; // `40{"sid"}` (connection:success follows), noop, acks
    }
  });
  socket.on('error', (e) => on.fail && on.fail(`ws error ${e.error()}`));
  return (name, data) => socket.send(encodeEvent(name, data));
}

/** The handshake payload of the contract (§2). */
export function authOf(user) {
  return { token: `Bearer ${user.token}`, userId: user.id };
}

// ------------------------------------------------------------------- tokens

const SECRET = __ENV.DEV_SECRET || '';
const TOKEN_TTL = env('TOKEN_TTL', 3600);

// TOKENS_FILE: `{"<userId>": "<jwt>", ...}`, parsed once and shared by all
// VUs as [[id, jwt], ...] (a SharedArray parses only the entry it is asked for).
const TOKENS = __ENV.TOKENS_FILE
  ? new SharedArray('tokens', () => Object.entries(JSON.parse(open(__ENV.TOKENS_FILE))))
  : null;

if (!TOKENS && !SECRET) {
  throw new Error('set DEV_SECRET (the servers\' AUTH_DEV_SECRET) or TOKENS_FILE (a {"userId": "jwt"} file)');
}

const b64url = (obj) => encoding.b64encode(JSON.stringify(obj), 'rawurl');

/** An HS256 JWT for `sub`, as `switchboard-gateway dev-token` mints it. */
export function mintToken(secret, sub, ttl = TOKEN_TTL) {
  const now = Math.floor(Date.now() / 1000);
  const signed = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url({ sub, name: sub, iat: now, nbf: now, exp: now + ttl })}`;
  return `${signed}.${crypto.hmac('sha256', secret, signed, 'base64rawurl')}`;
}

/** How many distinct users there are (the file's size, or unlimited). */
export function userCount() {
  return TOKENS ? TOKENS.length : Infinity;
}

/**
 * User number `i` as `{id, token}`: `<prefix><i>` with a minted token, or,
 * with TOKENS_FILE, the file's i-th entry (wrapping around).
 */
export function user(i, prefix) {
  if (TOKENS) {
    const [id, token] = TOKENS[i % TOKENS.length];
    return { id, token };
  }
  const id = `${prefix}${i}`;
  return { id, token: mintToken(SECRET, id) };
}

// --------------------------------------------------------------------- REST

function params(token, name) {
  return {
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
    tags: { name }, // one URL name per route, not one per channel id
  };
}

/** POST /api/channels {name} as `owner` (its first member); returns the id. */
export function createChannel(base, owner, name) {
  const res = http.post(`${base}/api/channels`, JSON.stringify({ name }), params(owner.token, 'POST /api/channels'));
  if (!check(res, { 'channel created (201)': (r) => r.status === 201 })) {
    throw new Error(`POST /api/channels: ${res.status} ${res.body}`);
  }
  return res.json('id');
}

/** POST /api/channels/{id}/members {userId} for every id, in one batch. */
export function addMembers(base, owner, channelId, userIds) {
  const url = `${base}/api/channels/${channelId}/members`;
  const p = params(owner.token, 'POST /api/channels/{id}/members');
  const responses = http.batch(userIds.map((userId) => ({ method: 'POST', url, body: JSON.stringify({ userId }), params: p })));
  responses.forEach((res, k) => {
    if (!check(res, { 'member added (201)': (r) => r.status === 201 })) {
      throw new Error(`add ${userIds[k]} to ${channelId}: ${res.status} ${res.body}`);
    }
  });
}
