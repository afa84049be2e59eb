//! The state of one authenticated socket, and the one place that owns its
//! resources: channel subscriptions, room entries, the inbox, the counters.
//!
//! Everything a socket holds is taken through its [`Session`] and given back
//! by [`Session::close`], exactly once, whichever way the socket ends: a
//! normal disconnect (the disconnect handler), or a client that went away
//! while the handshake middleware ran — socketioxide then drops the socket
//! without calling any handler, and the [`SessionGuard`] in its extensions
//! closes the session when the socket is freed. Nothing holds a socket
//! strongly for its whole life (the inbox task keeps a weak reference), so
//! being freed is guaranteed.
//!
//! Entering a channel and closing are serialised by one async lock per
//! session, so a `channel:join` racing a disconnect either enters before the
//! close (and is released by it) or finds the session closed and takes
//! nothing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use socketioxide::extract::SocketRef;
use uuid::Uuid;

use crate::auth::Identity;
use crate::state::{channel_room, App};

struct Channels {
    set: HashSet<Uuid>,
    /// Channels revoked (out of `set` and the room) whose subscription
    /// reference is still held, until [`Session::leave`] gives it back.
    revoked: HashSet<Uuid>,
    closed: bool,
}

pub struct Session {
    pub user: Identity,
    /// Namespace of the socket (its counter).
    ns: String,
    /// Channels this socket is in (and holds a subscription reference for).
    channels: Mutex<Channels>,
    /// Orders [`Session::enter`] against [`Session::close`].
    membership: tokio::sync::Mutex<()>,
    /// This socket's entry in the user's connection set, given back on close.
    connection: Mutex<Option<String>>,
}

impl Session {
    /// A session holding `channels`, whose subscriptions the caller has
    /// already retained; counts the socket in.
    pub fn open(app: &App, user: Identity, ns: &str, channels: &[Uuid]) -> Arc<Self> {
        app.count_socket(ns, 1);
        metrics::gauge!("gateway_sockets_connected").increment(1.0);
        Arc::new(Self {
            user,
            ns: ns.to_string(),
            channels: Mutex::new(Channels {
                set: channels.iter().copied().collect(),
                revoked: HashSet::new(),
                closed: false,
            }),
            membership: tokio::sync::Mutex::new(()),
            connection: Mutex::new(None),
        })
    }

    /// Hands the socket's connection-set entry (`<node>:<sid>`, already
    /// claimed and registered in `app.connections`) to the session.
    pub fn hold_connection(&self, member: String) {
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(member);
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_member(&self, channel: &Uuid) -> bool {
        self.channels().set.contains(channel)
    }

    pub fn is_closed(&self) -> bool {
        self.channels().closed
    }

    /// Puts the socket in a channel: subscription first (so nothing
    /// published afterwards is missed), then the room. `false` when the
    /// subscription failed or the socket is gone.
    /// `known_position`: the channel's position when the membership was
    /// stored, if the caller has it (see `MembershipChange::position`).
    pub async fn enter(
        &self,
        app: &App,
        s: &SocketRef,
        channel: Uuid,
        known_position: Option<i64>,
    ) -> bool {
        let _order = self.membership.lock().await;
        {
            let c = self.channels();
            if c.closed {
                return false;
            }
            if c.set.contains(&channel) {
                return true;
            }
        }
        // Revoked but not yet released: the subscription is still ours.
        let held = {
            let mut c = self.channels();
            if c.revoked.remove(&channel) {
                c.set.insert(channel);
                true
            } else {
                false
            }
        };
        if held {
            s.join(channel_room(&channel));
            return true;
        }
        // A channel this node does not track yet starts at its latest
        // stored message (anything after it is live or repaired).
        let position = match (app.subscriptions.cursor(&channel), known_position) {
            (Some(p), _) | (None, Some(p)) => p,
            (None, None) => match app.store.max_seqs(&[channel]).await {
                Ok(m) => m.get(&channel).copied().unwrap_or(0),
                Err(e) => {
                    tracing::warn!(error = %e, "channel position unavailable");
                    return false;
                }
            },
        };
        let subscribed = match app.subscriptions.retain(&[(channel, position)]).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "subscription failed");
                return false;
            }
        };
        self.channels().set.insert(channel);
        s.join(channel_room(&channel));
        app.probe(&subscribed);
        true
    }

    /// Takes the socket out of a channel at once, without waiting for any
    /// lock: out of the room (no further event of the channel reaches it)
    /// and out of the membership its writes are checked against. The
    /// dispatcher calls this in order with the channel's events, so nothing
    /// published after a removal was acknowledged is emitted to the socket.
    /// The subscription is given back later by [`Session::leave`].
    pub fn revoke(&self, s: &SocketRef, channel: Uuid) {
        {
            let mut c = self.channels();
            if c.set.remove(&channel) && !c.closed {
                c.revoked.insert(channel);
            }
        }
        s.leave(channel_room(&channel));
    }

    /// Leaves a channel ([`Session::revoke`]) and gives back its
    /// subscription, under the same lock as [`Session::enter`] and
    /// [`Session::close`], so the reference is released exactly once.
    pub async fn leave(&self, app: &App, s: &SocketRef, channel: Uuid) {
        let _order = self.membership.lock().await;
        self.revoke(s, channel);
        let release = {
            let mut c = self.channels();
            !c.closed && c.revoked.remove(&channel)
        };
        if release {
            app.subscriptions.release(&[channel]).await;
        }
    }

    /// Gives back everything the socket held. Idempotent.
    pub async fn close(&self, app: &App) {
        let _order = self.membership.lock().await;
        let channels: Vec<Uuid> = {
            let mut c = self.channels();
            if c.closed {
                return;
            }
            c.closed = true;
            let revoked: Vec<Uuid> = c.revoked.drain().collect();
            c.set.drain().chain(revoked).collect()
        };
        app.subscriptions.release(&channels).await;
        app.typing.stop_user(&self.user.id).await;
        let held = self
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(member) = held {
            crate::presence::release(app, &member).await;
        }
        app.count_socket(&self.ns, -1);
        metrics::gauge!("gateway_sockets_connected").decrement(1.0);
    }
}

/// Lives in the socket's extensions: closes the session when the socket is
/// freed without its disconnect handler having run (aborted handshake).
pub struct SessionGuard {
    pub app: App,
    pub session: Arc<Session>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.session.is_closed() {
            return;
        }
        metrics::counter!("gateway_sockets_reclaimed_total").increment(1);
        let app = self.app.clone();
        let session = self.session.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { session.close(&app).await });
        }
    }
}
