// Switchboard demo client: plain JavaScript on top of the socket.io-client
// bundle (global `io`) and the gateway's REST API. Served at /demo/app.js in
// embedded / development mode only.
'use strict';

(() => {
  const REACTIONS = ['👍', '❤️', '😂'];
  const HISTORY_LIMIT = 50;
  const STATUS_LABEL = { SENDING: 'sending…', SENT: 'sent ✓', DELIVERED: 'delivered ✓✓', FAILED: 'failed' };

  const $ = (id) => document.getElementById(id);

  /** Creates an element: el('div', {class: 'x', dataset: {a: 1}, onclick}, child, 'text'). */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      if (k === 'dataset') Object.assign(node.dataset, v);
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else if (k === 'class') node.className = v;
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c == null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // ---------------------------------------------------------------------
  // State
  // ---------------------------------------------------------------------

  const state = {
    me: null, // {userId, name, token}
    socket: null,
    channels: new Map(), // id -> channel (REST shape)
    selected: null, // channel id
    lists: new Map(), // channel id -> [entry] in display order
    byId: new Map(), // message id -> entry
    byTemp: new Map(), // tempId -> entry (own messages)
    names: new Map(), // user id -> display name
    readUpTo: new Map(), // channel id -> Map(user id -> message id)
    readSent: new Map(), // channel id -> message id we last marked read
    online: new Map(), // channel id -> Set(user id) online now (CONTRACT §11)
    presenceAt: new Map(), // user id -> timestamp of the latest presence:changed applied
    typing: new Map(), // channel id -> Map(user id -> timer that forgets it)
  };
  // Typing: this page says typing:start at most every TYPING_RENEW_MS while
  // the user types (the server forwards one per second and stops it after
  // 6 s without renewal), and typing:stop when they send or clear the box.
  const TYPING_RENEW_MS = 3000;
  const TYPING_FORGET_MS = 8000; // a lost typing:false must not stick
  let typingSentAt = 0;
  let typingChannel = null;
  let localSeq = 0;

  const newTempId = () =>
    `tmp-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
  const nameOf = (userId) => state.names.get(userId) || userId;
  const listOf = (channelId) => {
    if (!state.lists.has(channelId)) state.lists.set(channelId, []);
    return state.lists.get(channelId);
  };
  const fmtTime = (iso) => {
    const d = iso ? new Date(iso) : new Date();
    return Number.isNaN(d.getTime()) ? '' : d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  };

  // ---------------------------------------------------------------------
  // Small UI helpers
  // ---------------------------------------------------------------------

  const recentToasts = new Map();
  function toast(text, kind = 'info') {
    const now = Date.now();
    if (now - (recentToasts.get(text) || 0) < 1500) return; // same error from ack and event
    recentToasts.set(text, now);
    const t = el('div', { class: 'toast', dataset: { kind }, 'data-testid': 'toast' }, text);
    $('toasts').append(t);
    setTimeout(() => t.remove(), 4000);
  }

  function note(id, text, kind = '') {
    const n = $(id);
    n.textContent = text;
    n.dataset.kind = kind;
  }

  function setConn(s, label = s) {
    const c = $('conn');
    c.dataset.state = s;
    c.textContent = label;
  }

  // ---------------------------------------------------------------------
  // REST
  // ---------------------------------------------------------------------

  async function api(path, { method = 'GET', body } = {}) {
    const res = await fetch(path, {
      method,
      headers: {
        Authorization: `Bearer ${state.me.token}`,
        ...(body ? { 'Content-Type': 'application/json' } : {}),
      },
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (!res.ok) {
      const err = new Error((data && data.error) || `HTTP ${res.status}`);
      err.status = res.status;
      throw err;
    }
    return data;
  }

  // ---------------------------------------------------------------------
  // Login / connection
  // ---------------------------------------------------------------------

  async function login(ev) {
    ev.preventDefault();
    const user = $('login-user').value.trim();
    const name = $('login-name').value.trim();
    if (!user) return;
    $('login-button').disabled = true;
    note('login-error', '');
    try {
      const q = new URLSearchParams({ user });
      if (name) q.set('name', name);
      const res = await fetch(`/demo/token?${q}`);
      const data = await res.json().catch(() => ({}));
      if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
      state.me = { userId: data.userId, name: name || data.userId, token: data.token };
      state.names.set(state.me.userId, state.me.name);
      try { localStorage.setItem('switchboard-demo', JSON.stringify({ user, name })); } catch { /* private mode */ }
      $('login').hidden = true;
      $('app').hidden = false;
      $('logout').hidden = false;
      $('whoami').textContent = `${state.me.name} (${state.me.userId})`;
      connect();
    } catch (e) {
      note('login-error', `Could not get a token: ${e.message}`);
    } finally {
      $('login-button').disabled = false;
    }
  }

  function logout() {
    if (state.socket) state.socket.disconnect();
    state.socket = null;
    state.me = null;
    state.selected = null;
    state.since = {};
    for (const m of [state.channels, state.lists, state.byId, state.byTemp, state.names, state.readUpTo, state.readSent, state.online, state.presenceAt, state.typing]) m.clear();
    $('app').hidden = true;
    $('login').hidden = false;
    $('logout').hidden = true;
    $('whoami').textContent = '';
    setConn('offline');
    renderChannels();
    renderPane();
  }

  function connect() {
    setConn('connecting', 'connecting…');
    // `since`: the highest seq held per channel, sent on every (re)connect
    // so the server replays what this page missed (CONTRACT §9).
    state.since = state.since || {};
    const socket = io(location.origin, {
      path: '/api/socket.io',
      auth: (cb) => cb({ token: `Bearer ${state.me.token}`, userId: state.me.userId, since: { ...state.since } }),
    });
    state.socket = socket;

    const connected = () => setConn('connected', `connected · ${socket.io.engine?.transport?.name || ''}`);
    socket.on('connect', connected);
    socket.io.on('open', () => socket.io.engine.on('upgrade', () => { if (socket.connected) connected(); }));
    socket.on('disconnect', (reason) => {
      if (reason === 'io client disconnect') setConn('offline');
      else if (reason === 'io server disconnect') setConn('disconnected', 'disconnected by server');
      else setConn('reconnecting', 'reconnecting…');
    });
    socket.on('connect_error', (err) => setConn('reconnecting', `connection failed: ${err.message}`));
    socket.io.on('reconnect_attempt', (n) => setConn('reconnecting', `reconnecting… (${n})`));

    socket.on('channel:recovered', (r) => {
      if (!r.recovered) {
        // Missed more than the server replays: reload through history.
        if (r.channelId === state.selected) loadHistory(r.channelId);
        return;
      }
      const n = r.toSeq - r.fromSeq + 1;
      if (n > 0) toast(`recovered ${n} message${n === 1 ? '' : 's'}`, 'info');
    });
    socket.on('connection:success', async (d) => {
      for (const [channelId, seq] of Object.entries((d && d.positions) || {})) {
        if (!(channelId in state.since)) state.since[channelId] = seq;
      }
      state.online.clear();
      for (const [channelId, users] of Object.entries((d && d.online) || {})) state.online.set(channelId, new Set(users));
      renderPresence();
      // Also after every reconnection: catch up on channels and missed messages.
      await loadChannels();
      if (state.selected && state.channels.get(state.selected)?.isMember) await loadHistory(state.selected);
    });
    socket.on('connection:error', (d) => {
      setConn('error', `auth failed: ${d?.error || 'unknown error'}`);
      toast(`Connection refused: ${d?.error || 'unknown error'}`, 'error');
    });

    socket.on('message:delivered', onDelivered);
    socket.on('message:created', onCreated);
    socket.on('message:failed', onFailed);
    socket.on('message:read', onRead);
    socket.on('reaction:added', onReactionAdded);
    socket.on('reaction:removed', onReactionRemoved);
    socket.on('channel:user_joined', onUserJoined);
    socket.on('presence:changed', onPresence);
    socket.on('typing', onTyping);
    socket.on('channel:error', (d) => toast(`Channel: ${d?.error}`, 'error'));
    socket.on('reaction:error', (d) => toast(`Reaction: ${d?.error}`, 'error'));
    socket.on('message:error', (d) => toast(`Read receipt: ${d?.error}`, 'error'));
  }

  // ---------------------------------------------------------------------
  // Channels
  // ---------------------------------------------------------------------

  async function loadChannels() {
    if (!state.me) return;
    try {
      const list = await api('/api/channels');
      const next = new Map();
      for (const ch of list) {
        // The selected channel is being read: keep its badge at zero.
        if (ch.id === state.selected && ch.isMember) ch.unreadCount = 0;
        next.set(ch.id, ch);
      }
      state.channels = next;
      if (state.selected && !next.has(state.selected)) state.selected = null;
      renderChannels();
      renderPaneHead();
    } catch (e) {
      toast(`Could not load channels: ${e.message}`, 'error');
    }
  }

  function channelItem(ch) {
    const join = !ch.isMember
      ? el('button', {
          'data-testid': 'join-channel',
          onclick: (ev) => { ev.stopPropagation(); joinChannel(ch.id); },
        }, 'Join')
      : null;
    return el('li', {
      class: 'channel',
      'data-testid': 'channel-item',
      'aria-selected': String(ch.id === state.selected),
      dataset: { channelId: ch.id, channelName: ch.name, member: String(!!ch.isMember) },
      onclick: () => selectChannel(ch.id),
    },
    el('span', { class: 'icon' }, ch.isPrivate ? '🔒' : '#'),
    el('span', { class: 'name' }, ch.name),
    ch.isMember
      ? el('span', { class: 'unread', 'data-testid': 'unread-count', dataset: { count: String(ch.unreadCount || 0) } }, String(ch.unreadCount || 0))
      : null,
    join);
  }

  function renderChannels() {
    const mine = [...state.channels.values()].filter((c) => c.isMember);
    const others = [...state.channels.values()].filter((c) => !c.isMember);
    const byName = (a, b) => a.name.localeCompare(b.name);
    $('my-channels').replaceChildren(...(mine.length ? mine.sort(byName).map(channelItem) : [el('li', { class: 'empty' }, 'none yet — create or join one')]));
    $('public-channels').replaceChildren(...(others.length ? others.sort(byName).map(channelItem) : [el('li', { class: 'empty' }, 'nothing else to join')]));
  }

  async function createChannel(ev) {
    ev.preventDefault();
    const name = $('create-name').value.trim();
    if (!name) return;
    try {
      const ch = await api('/api/channels', { method: 'POST', body: { name, isPrivate: $('create-private').checked } });
      $('create-name').value = '';
      $('create-private').checked = false;
      note('create-note', `Created ${ch.isPrivate ? '🔒' : '#'}${ch.name}`, 'ok');
      state.channels.set(ch.id, ch);
      await loadChannels();
      selectChannel(ch.id);
    } catch (e) {
      note('create-note', e.message, 'error');
    }
  }

  function joinChannel(channelId) {
    state.socket.emit('channel:join', { channelId }, async (ack) => {
      if (ack && ack.ok === false) {
        toast(`Could not join: ${ack.error}`, 'error');
        return;
      }
      await loadChannels();
      selectChannel(channelId);
    });
  }

  async function invite(ev) {
    ev.preventDefault();
    const userId = $('invite-user').value.trim();
    const ch = state.channels.get(state.selected);
    if (!userId || !ch) return;
    try {
      await api(`/api/channels/${encodeURIComponent(ch.id)}/members`, { method: 'POST', body: { userId } });
      $('invite-user').value = '';
      note('invite-note', `${userId} added to ${ch.name}`, 'ok');
    } catch (e) {
      note('invite-note', e.status === 409 ? `${userId} is already a member` : e.message, 'error');
    }
  }

  function onUserJoined(d) {
    if (!d) return;
    if (d.userId === state.me.userId) {
      loadChannels();
      return;
    }
    if (d.channelId === state.selected) {
      toast(`${nameOf(d.userId)} joined ${state.channels.get(d.channelId)?.name || 'the channel'}`);
      loadPresence(d.channelId);
    }
  }

  // ---------------------------------------------------------------------
  // Presence and typing
  // ---------------------------------------------------------------------

  function onPresence(d) {
    if (!d || !d.channelId || !d.userId) return;
    // Changes of one user may arrive out of order from two nodes: the later
    // timestamp is the current state.
    const at = Date.parse(d.timestamp) || 0;
    if (at < (state.presenceAt.get(d.userId) || 0)) return;
    state.presenceAt.set(d.userId, at);
    if (!state.online.has(d.channelId)) state.online.set(d.channelId, new Set());
    const set = state.online.get(d.channelId);
    if (d.online) set.add(d.userId);
    else set.delete(d.userId);
    if (d.channelId === state.selected) renderPresence();
  }

  /**
   * Who is online in a channel, from REST: on opening it, when someone
   * joins, and for channels above PRESENCE_MAX_MEMBERS (no live events).
   */
  async function loadPresence(channelId) {
    try {
      const p = await api(`/api/channels/${encodeURIComponent(channelId)}/presence`);
      state.online.set(channelId, new Set(p.online));
      if (channelId === state.selected) renderPresence();
    } catch { /* not a member (yet): nothing to show */ }
  }

  function renderPresence() {
    const set = state.online.get(state.selected);
    const names = set ? [...set].map((u) => (u === state.me?.userId ? 'you' : nameOf(u))).sort() : [];
    $('pane-online').textContent = names.length ? `${names.length} online: ${names.join(', ')}` : '';
    renderTyping();
  }

  function onTyping(d) {
    if (!d || !d.channelId || !d.userId || d.userId === state.me.userId) return;
    if (!state.typing.has(d.channelId)) state.typing.set(d.channelId, new Map());
    const users = state.typing.get(d.channelId);
    clearTimeout(users.get(d.userId));
    if (d.typing) {
      users.set(d.userId, setTimeout(() => { users.delete(d.userId); renderTyping(); }, TYPING_FORGET_MS));
    } else users.delete(d.userId);
    if (d.channelId === state.selected) renderTyping();
  }

  function renderTyping() {
    const users = [...(state.typing.get(state.selected)?.keys() || [])].map(nameOf).sort();
    let text = '';
    if (users.length === 1) text = `${users[0]} is typing…`;
    else if (users.length === 2) text = `${users[0]} and ${users[1]} are typing…`;
    else if (users.length > 2) text = 'several people are typing…';
    $('typing').textContent = text;
  }

  /** Called on every keystroke in the composer. */
  function typed() {
    const ch = state.selected;
    if (!state.socket || !ch || !state.channels.get(ch)?.isMember) return;
    if (!$('composer-input').value) {
      stopTyping();
      return;
    }
    const now = Date.now();
    if (typingChannel === ch && now - typingSentAt < TYPING_RENEW_MS) return;
    if (typingChannel && typingChannel !== ch) stopTyping();
    typingChannel = ch;
    typingSentAt = now;
    state.socket.emit('typing:start', { channelId: ch });
  }

  function stopTyping() {
    if (typingChannel && state.socket) state.socket.emit('typing:stop', { channelId: typingChannel });
    typingChannel = null;
    typingSentAt = 0;
  }

  // ---------------------------------------------------------------------
  // Messages: model
  // ---------------------------------------------------------------------

  /** An entry from a server message (history or message:created). */
  /** Remembers a user's display name; true when it is new or changed. */
  function learnName(userId, name) {
    if (!userId || !name || state.names.get(userId) === name) return false;
    state.names.set(userId, name);
    return true;
  }

  function entryFrom(m) {
    learnName(m.userId, m.user && m.user.name);
    const reactions = new Map();
    for (const r of m.reactions || []) {
      if (!reactions.has(r.type)) reactions.set(r.type, new Set());
      reactions.get(r.type).add(r.userId);
    }
    return {
      key: `m${++localSeq}`,
      id: m.id,
      tempId: null,
      channelId: m.channelId,
      userId: m.userId,
      content: m.content,
      createdAt: m.createdAt,
      status: m.deliveryStatus === 'FAILED' ? 'FAILED' : 'DELIVERED',
      error: null,
      reactions,
    };
  }

  function setId(entry, id) {
    if (!id || entry.id === id) return;
    entry.id = id;
    state.byId.set(id, entry);
  }

  async function loadHistory(channelId) {
    let history;
    try {
      history = await api(`/api/channels/${encodeURIComponent(channelId)}/messages?limit=${HISTORY_LIMIT}`);
    } catch (e) {
      toast(`Could not load messages: ${e.message}`, 'error');
      return;
    }
    const ordered = history.slice().reverse(); // oldest at the top
    const seen = new Set();
    const merged = ordered.map((m) => {
      seen.add(m.id);
      const known = state.byId.get(m.id);
      const fresh = entryFrom(m);
      if (!known) {
        state.byId.set(m.id, fresh);
        return fresh;
      }
      // Keep the local entry (and its tempId) but take the server's view.
      Object.assign(known, {
        content: fresh.content, createdAt: fresh.createdAt, reactions: fresh.reactions,
        status: known.status === 'FAILED' ? 'FAILED' : 'DELIVERED',
      });
      return known;
    });
    // Live or pending messages not in this page of history stay after it.
    const rest = listOf(channelId).filter((e) => !(e.id && seen.has(e.id)) && !(e.id && ordered.length && e.id < ordered[0].id));
    state.lists.set(channelId, merged.concat(rest));
    if (channelId === state.selected) renderPane();
  }

  // ---------------------------------------------------------------------
  // Messages: rendering
  // ---------------------------------------------------------------------

  function readersOf(entry) {
    const map = state.readUpTo.get(entry.channelId);
    if (!map || !entry.id) return [];
    const out = [];
    for (const [userId, messageId] of map) {
      if (messageId === entry.id && userId !== state.me.userId) out.push(nameOf(userId));
    }
    return out;
  }

  function messageEl(entry) {
    const own = entry.userId === state.me.userId;
    const foot = el('div', { class: 'foot' });
    if (entry.id) {
      const types = [...REACTIONS, ...[...entry.reactions.keys()].filter((t) => !REACTIONS.includes(t))];
      for (const type of types) {
        const users = entry.reactions.get(type) || new Set();
        const mine = users.has(state.me.userId);
        foot.append(el('button', {
          class: 'react',
          type: 'button',
          'data-testid': 'reaction-button',
          'aria-pressed': String(mine),
          title: users.size ? [...users].map(nameOf).join(', ') : `React with ${type}`,
          dataset: { reaction: type, count: String(users.size), mine: String(mine) },
          onclick: () => toggleReaction(entry, type),
        }, type, users.size ? el('span', { 'data-testid': 'reaction-count' }, ` ${users.size}`) : null));
      }
    }
    if (own) {
      foot.append(el('span', { class: 'status', 'data-testid': 'message-status', dataset: { status: entry.status } }, STATUS_LABEL[entry.status] || entry.status));
      if (entry.status === 'FAILED') {
        if (entry.error) foot.append(el('span', { class: 'err', 'data-testid': 'message-error' }, entry.error));
        foot.append(el('button', { class: 'retry', type: 'button', 'data-testid': 'retry-button', onclick: () => retry(entry) }, 'Retry'));
      }
    }
    const readers = readersOf(entry);
    return el('div', {
      class: `msg${own ? ' own' : ''}`,
      'data-testid': 'message',
      dataset: {
        key: entry.key,
        status: entry.status,
        own: String(own),
        ...(entry.id ? { messageId: entry.id } : {}),
        ...(entry.tempId ? { tempId: entry.tempId } : {}),
      },
    },
    el('div', { class: 'meta' }, own ? 'You' : nameOf(entry.userId), ' · ', fmtTime(entry.createdAt)),
    el('div', { class: 'bubble', 'data-testid': 'message-content' }, entry.content),
    foot,
    readers.length ? el('div', { class: 'read', 'data-testid': 'read-receipt' }, `Read by ${readers.join(', ')}`) : null);
  }

  const nearBottom = (box) => box.scrollHeight - box.scrollTop - box.clientHeight < 60;

  function renderPaneHead() {
    const ch = state.channels.get(state.selected);
    $('pane-title').textContent = ch ? `${ch.isPrivate ? '🔒 ' : '# '}${ch.name}` : 'No channel selected';
    $('pane-sub').textContent = ch ? (ch.isMember ? (ch.isPrivate ? 'private channel' : 'public channel') : 'not a member') : '';
    const member = !!(ch && ch.isMember);
    $('composer-input').disabled = !member;
    $('send-button').disabled = !member;
    $('invite-user').disabled = !member;
    $('invite-form').querySelector('button').disabled = !member;
    $('invite-title').textContent = member ? `Invite to ${ch.name}` : 'Invite to channel';
  }

  function renderPane() {
    renderPaneHead();
    const box = $('messages');
    const ch = state.channels.get(state.selected);
    if (!ch) {
      box.replaceChildren(el('div', { class: 'placeholder' }, state.me ? 'Pick a channel on the left, or create one.' : ''));
      return;
    }
    if (!ch.isMember) {
      box.replaceChildren(el('div', { class: 'placeholder' },
        el('div', {}, `You are not a member of #${ch.name}.`),
        el('button', { class: 'primary', 'data-testid': 'join-channel-main', onclick: () => joinChannel(ch.id) }, 'Join channel')));
      return;
    }
    const list = listOf(ch.id);
    box.replaceChildren(...(list.length ? list.map(messageEl) : [el('div', { class: 'placeholder', 'data-testid': 'no-messages' }, 'No messages yet. Say hello!')]));
    box.scrollTop = box.scrollHeight;
    maybeMarkRead();
  }

  /** Re-renders one entry in place (or appends it) if its channel is shown. */
  function updateEntry(entry, { scroll = false } = {}) {
    if (entry.channelId !== state.selected) return;
    const box = $('messages');
    const stick = scroll || nearBottom(box);
    const old = box.querySelector(`[data-key="${entry.key}"]`);
    const node = messageEl(entry);
    if (old) old.replaceWith(node);
    else {
      box.querySelector('.placeholder')?.remove();
      box.append(node);
    }
    if (stick) box.scrollTop = box.scrollHeight;
    maybeMarkRead();
  }

  function selectChannel(channelId) {
    state.selected = channelId;
    const ch = state.channels.get(channelId);
    if (ch && ch.isMember) ch.unreadCount = 0;
    note('invite-note', '');
    if (typingChannel && typingChannel !== channelId) stopTyping();
    renderChannels();
    renderPane();
    renderPresence();
    if (ch && ch.isMember) loadPresence(channelId);
    if (ch && ch.isMember) loadHistory(channelId);
    if (ch && ch.isMember) $('composer-input').focus();
  }

  // ---------------------------------------------------------------------
  // Sending
  // ---------------------------------------------------------------------

  function emitSend(entry) {
    const tempId = newTempId();
    if (entry.tempId) state.byTemp.delete(entry.tempId);
    entry.tempId = tempId;
    entry.status = 'SENDING';
    entry.error = null;
    state.byTemp.set(tempId, entry);
    updateEntry(entry, { scroll: true });
    state.socket.emit('message:send', { content: entry.content, channelId: entry.channelId, tempId }, (ack) => {
      if (!ack || entry.tempId !== tempId) return; // a retry superseded this attempt
      if (ack.status === 'DELIVERED') applyStatus(entry, 'DELIVERED', ack.messageId);
      else if (ack.status === 'FAILED') fail(entry, ack.error);
    });
  }

  function send(ev) {
    ev.preventDefault();
    const input = $('composer-input');
    const content = input.value;
    const ch = state.channels.get(state.selected);
    if (!content.trim() || !ch || !ch.isMember) return;
    input.value = '';
    stopTyping();
    const entry = {
      key: `m${++localSeq}`, id: null, tempId: null, channelId: ch.id, userId: state.me.userId,
      content, createdAt: new Date().toISOString(), status: 'SENDING', error: null, reactions: new Map(),
    };
    listOf(ch.id).push(entry);
    emitSend(entry);
  }

  function retry(entry) {
    if (entry.status !== 'FAILED') return;
    emitSend(entry); // same content, new tempId
  }

  const RANK = { SENDING: 0, SENT: 1, DELIVERED: 2 };
  function applyStatus(entry, status, messageId) {
    setId(entry, messageId);
    if (entry.status === 'FAILED' && status !== 'DELIVERED') return;
    if (entry.status !== 'FAILED' && RANK[status] <= RANK[entry.status]) {
      updateEntry(entry);
      return;
    }
    entry.status = status;
    entry.error = null;
    updateEntry(entry);
  }

  function fail(entry, error) {
    if (entry.status === 'DELIVERED') return;
    entry.status = 'FAILED';
    entry.error = error || 'failed';
    updateEntry(entry);
  }

  function onDelivered(d) {
    if (!d) return;
    const entry = (d.tempId && state.byTemp.get(d.tempId)) || state.byId.get(d.messageId);
    if (!entry) return;
    if (d.status === 'DELIVERED' || d.status === 'SENT') applyStatus(entry, d.status, d.messageId);
  }

  function onFailed(d) {
    const entry = d && d.tempId && state.byTemp.get(d.tempId);
    if (entry) fail(entry, d.error);
    else toast(`Message failed: ${d?.error || 'unknown error'}`, 'error');
  }

  function onCreated(d) {
    const m = d && d.message;
    if (!m || !m.id) return;
    if (typeof m.seq === 'number') state.since[m.channelId] = Math.max(state.since[m.channelId] || 0, m.seq);
    if (learnName(m.userId, m.user && m.user.name) && m.channelId === state.selected) {
      // Read receipts shown under the user's id so far get the name.
      for (const e of listOf(m.channelId)) if (readersOf(e).length) updateEntry(e);
    }
    if (!state.channels.has(m.channelId)) loadChannels(); // e.g. we were just invited
    let entry = state.byId.get(m.id);
    if (!entry && d.tempId && m.userId === state.me.userId) entry = state.byTemp.get(d.tempId);
    if (entry) {
      setId(entry, m.id);
      entry.createdAt = m.createdAt || entry.createdAt;
      entry.status = 'DELIVERED';
      entry.error = null;
      updateEntry(entry);
      return;
    }
    entry = entryFrom(m);
    state.byId.set(m.id, entry);
    listOf(m.channelId).push(entry);
    const ch = state.channels.get(m.channelId);
    if (m.channelId === state.selected) updateEntry(entry);
    else if (ch && m.userId !== state.me.userId) {
      ch.unreadCount = (ch.unreadCount || 0) + 1;
      renderChannels();
    }
  }

  // ---------------------------------------------------------------------
  // Reactions
  // ---------------------------------------------------------------------

  function toggleReaction(entry, type) {
    if (!entry.id) return;
    const mine = entry.reactions.get(type)?.has(state.me.userId);
    state.socket.emit(mine ? 'reaction:remove' : 'reaction:add', { messageId: entry.id, type }, (ack) => {
      if (ack && ack.ok === false) toast(`Reaction: ${ack.error}`, 'error');
    });
  }

  function onReactionAdded(d) {
    const r = d && d.reaction;
    const entry = d && state.byId.get(d.messageId);
    if (!r || !entry) return;
    if (!entry.reactions.has(r.type)) entry.reactions.set(r.type, new Set());
    entry.reactions.get(r.type).add(r.userId);
    updateEntry(entry);
  }

  function onReactionRemoved(d) {
    const entry = d && state.byId.get(d.messageId);
    if (!entry) return;
    const users = entry.reactions.get(d.type);
    if (users) {
      users.delete(d.userId);
      if (!users.size) entry.reactions.delete(d.type);
    }
    updateEntry(entry);
  }

  // ---------------------------------------------------------------------
  // Read receipts
  // ---------------------------------------------------------------------

  const indexIn = (channelId, messageId) => listOf(channelId).findIndex((e) => e.id === messageId);

  function onRead(d) {
    if (!d || !d.messageId || !d.userId) return;
    const entry = state.byId.get(d.messageId);
    if (!entry) return; // not loaded here: nothing to show it under
    const ch = entry.channelId;
    if (!state.readUpTo.has(ch)) state.readUpTo.set(ch, new Map());
    const map = state.readUpTo.get(ch);
    const prevId = map.get(d.userId);
    if (prevId && indexIn(ch, prevId) > indexIn(ch, d.messageId)) return; // older than what we know
    map.set(d.userId, d.messageId);
    const prev = prevId && state.byId.get(prevId);
    if (prev) updateEntry(prev);
    updateEntry(entry);
  }

  /** Marks the newest visible message of another user in the shown channel read. */
  function maybeMarkRead() {
    const chId = state.selected;
    if (!chId || !state.socket || !state.socket.connected || document.visibilityState !== 'visible') return;
    const box = $('messages');
    const view = box.getBoundingClientRect();
    const list = listOf(chId);
    for (let i = list.length - 1; i >= 0; i--) {
      const e = list[i];
      if (!e.id || e.userId === state.me.userId) continue;
      const node = box.querySelector(`[data-key="${e.key}"]`);
      if (!node) continue;
      const r = node.getBoundingClientRect();
      if (r.bottom <= view.top || r.top >= view.bottom) continue; // scrolled out of view
      const sent = state.readSent.get(chId);
      if (sent && indexIn(chId, sent) >= i) return;
      state.readSent.set(chId, e.id);
      state.socket.emit('message:read', { messageId: e.id }, (ack) => {
        if (ack && ack.ok === false) toast(`Read receipt: ${ack.error}`, 'error');
      });
      return;
    }
  }

  // ---------------------------------------------------------------------
  // Wiring
  // ---------------------------------------------------------------------

  let scrollTimer = null;
  $('messages').addEventListener('scroll', () => {
    clearTimeout(scrollTimer);
    scrollTimer = setTimeout(maybeMarkRead, 150);
  });
  document.addEventListener('visibilitychange', maybeMarkRead);
  window.addEventListener('focus', () => { if (state.me) { loadChannels(); maybeMarkRead(); } });
  $('login').addEventListener('submit', login);
  $('logout').addEventListener('click', logout);
  $('create-form').addEventListener('submit', createChannel);
  $('invite-form').addEventListener('submit', invite);
  $('composer').addEventListener('submit', send);
  $('composer-input').addEventListener('input', typed);
  $('composer-input').addEventListener('blur', stopTyping);
  $('refresh').addEventListener('click', loadChannels);

  try {
    const saved = JSON.parse(localStorage.getItem('switchboard-demo') || 'null');
    if (saved) {
      $('login-user').value = saved.user || '';
      $('login-name').value = saved.name || '';
    }
  } catch { /* ignore */ }
  $('login-user').focus();
  renderPane();
})();
