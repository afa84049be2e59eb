// REST API (CONTRACT §6): channels, invitations, errors, and an invitation
// reaching the invitee's live socket on another gateway.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import {
  addMember, api, auth, connectUser, createChannel, listOf, randomHex, sleep, uid, useCluster, waitFor,
} from '../lib/harness.mjs';

const sb = useCluster({ gateways: 2, workers: 1 });

/** Asserts an error response: the status and a JSON body {error: string}. */
function assertError(res, status, what) {
  assert.equal(res.status, status, `${what}: expected ${status}, got ${res.status} ${res.text}`);
  assert.ok(res.body && typeof res.body === 'object', `${what}: error body must be JSON, got ${JSON.stringify(res.text)}`);
  assert.equal(typeof res.body.error, 'string', `${what}: {error: string}, got ${res.text}`);
  assert.ok(res.body.error.length > 0, `${what}: error message must not be empty`);
}

const listChannels = async (url, userId) => {
  const res = await api(url, 'GET', '/api/channels', { token: auth.token(userId) });
  assert.equal(res.status, 200, res.text);
  return listOf(res.body, 'channels');
};

test('POST /api/channels creates a channel owned by the caller', async () => {
  const owner = uid('owner');
  const res = await api(sb.url(0), 'POST', '/api/channels', { token: auth.token(owner), body: { name: 'general', isPrivate: true } });
  assert.equal(res.status, 201, res.text);
  assert.equal(typeof res.body.id, 'string');
  assert.ok(res.body.id.length > 0);
  assert.equal(res.body.name, 'general');
  assert.equal(res.body.isPrivate, true);
  assert.equal(res.body.ownerId, owner);

  // isPrivate is optional and defaults to public.
  const pub = await api(sb.url(1), 'POST', '/api/channels', { token: auth.token(owner), body: { name: 'random' } });
  assert.equal(pub.status, 201, pub.text);
  assert.equal(pub.body.isPrivate, false);
});

test("GET /api/channels lists the caller's channels and public ones, not others' private ones", async () => {
  const alice = uid('alice');
  const bob = uid('bob');
  const carol = uid('carol');
  const url = sb.url(0);
  const alicePublic = await createChannel(url, alice, 'a-pub', false);
  const alicePrivate = await createChannel(url, alice, 'a-priv', true);
  const bobPrivate = await createChannel(url, bob, 'b-priv', true);

  const forAlice = (await listChannels(url, alice)).map((c) => c.id);
  assert.ok(forAlice.includes(alicePublic.id), 'own public channel');
  assert.ok(forAlice.includes(alicePrivate.id), 'own private channel');
  assert.ok(!forAlice.includes(bobPrivate.id), "someone else's private channel must not be listed");

  const forCarol = await listChannels(sb.url(1), carol);
  const ids = forCarol.map((c) => c.id);
  assert.ok(ids.includes(alicePublic.id), 'public channels are listed for everyone');
  assert.ok(!ids.includes(alicePrivate.id) && !ids.includes(bobPrivate.id), 'private channels of others are not');
  const listed = forCarol.find((c) => c.id === alicePublic.id);
  assert.equal(listed.name, 'a-pub');
  assert.equal(listed.isPrivate, false);
});

test('POST /api/channels/:id/members: owner of a private channel 201, again 409, non-owner 403', async () => {
  const owner = uid('owner');
  const invitee = uid('invitee');
  const stranger = uid('stranger');
  const url = sb.url(0);
  const channel = await createChannel(url, owner, 'secret', true);

  const first = await addMember(url, owner, channel.id, invitee);
  assert.equal(first.status, 201, first.text);
  assertError(await addMember(sb.url(1), owner, channel.id, invitee), 409, 'inviting a member again');

  // Not a member at all, and a member who is not the owner: both refused.
  assertError(await addMember(url, stranger, channel.id, uid('x')), 403, 'invite by a non-member');
  assertError(await addMember(url, invitee, channel.id, uid('y')), 403, 'invite by a member who is not the owner of a private channel');

  // The invitee sees the private channel now.
  const forInvitee = (await listChannels(url, invitee)).map((c) => c.id);
  assert.ok(forInvitee.includes(channel.id));
});

test('any member of a public channel may invite', async () => {
  const owner = uid('owner');
  const member = uid('member');
  const url = sb.url(0);
  const channel = await createChannel(url, owner, 'open', false);
  assert.equal((await addMember(url, owner, channel.id, member)).status, 201);
  assert.equal((await addMember(url, member, channel.id, uid('friend'))).status, 201);
});

test('unknown channel: 404', async () => {
  const user = uid('lost');
  const unknown = randomUUID();
  assertError(await addMember(sb.url(0), user, unknown, uid('z')), 404, 'invite to an unknown channel');
  const hist = await api(sb.url(0), 'GET', `/api/channels/${unknown}/messages`, { token: auth.token(user) });
  assertError(hist, 404, 'history of an unknown channel');
});

test('missing or invalid token: 401', async () => {
  const url = sb.url(0);
  const user = uid('anon');
  assertError(await api(url, 'GET', '/api/channels'), 401, 'no Authorization header');
  assertError(await api(url, 'GET', '/api/channels', { authorization: 'Bearer abc' }), 401, 'malformed token');
  assertError(await api(url, 'GET', '/api/channels', { token: auth.token(user, { exp: auth.now() - 60 }) }), 401, 'expired token');
  assertError(await api(url, 'GET', '/api/channels', { token: auth.token(user, { key: auth.unpublishedKey().privateKey }) }), 401, 'bad signature');
  assertError(await api(url, 'POST', '/api/channels', { authorization: 'Bearer abc', body: { name: 'x' } }), 401, 'create with a bad token');
});

test('bad JSON or missing name: 400', async () => {
  const url = sb.url(0);
  const token = auth.token(uid('sloppy'));
  assertError(await api(url, 'POST', '/api/channels', { token, rawBody: '{"name": ' }), 400, 'malformed JSON');
  assertError(await api(url, 'POST', '/api/channels', { token, body: {} }), 400, 'missing name');
  assertError(await api(url, 'POST', '/api/channels', { token, body: { name: '   ' } }), 400, 'blank name');
  assertError(await api(url, 'POST', '/api/channels', { token, body: { name: 42 } }), 400, 'name not a string');
  const owner = uid('owner');
  const channel = await createChannel(url, owner);
  assertError(await api(url, 'POST', `/api/channels/${channel.id}/members`, { token: auth.token(owner), body: {} }), 400, 'member without userId');
});

test("an invited user's connected socket (other gateway) starts receiving the channel at once", async () => {
  const owner = uid('owner');
  const invitee = uid('invitee');
  const channel = await createChannel(sb.url(0), owner, 'invite-live', true);
  const ownerSocket = await connectUser(sb.url(0), owner);
  const inviteeSocket = await connectUser(sb.url(1), invitee);
  assert.deepEqual(inviteeSocket.success.channels, []);

  // Before the invitation: the invitee is not in the room.
  ownerSocket.emit('message:send', { content: 'before', channelId: channel.id, tempId: 'before' });
  await waitFor(ownerSocket, 'message:created', (p) => p.tempId === 'before', 10_000);

  const res = await addMember(sb.url(0), owner, channel.id, invitee);
  assert.equal(res.status, 201, res.text);

  const tempId = `after-${randomHex(3)}`;
  ownerSocket.emit('message:send', { content: 'welcome', channelId: channel.id, tempId });
  const got = await waitFor(inviteeSocket, 'message:created', (p) => p.tempId === tempId, 10_000);
  assert.equal(got.message.content, 'welcome');
  assert.equal(got.message.channelId, channel.id);
  await sleep(200);
  assert.ok(!inviteeSocket.recorder.events.some((e) => e.event === 'message:created' && e.payload.tempId === 'before'),
    'messages from before the invitation are not pushed');

  // The invitee can post to it from the live socket, too.
  inviteeSocket.emit('message:send', { content: 'thanks', channelId: channel.id, tempId: 'thanks' });
  await waitFor(ownerSocket, 'message:created', (p) => p.tempId === 'thanks', 10_000);

  // And the channel is in the invitee's next connection:success.
  const again = await connectUser(sb.url(0), invitee);
  assert.deepEqual(again.success.channels, [channel.id]);
});
