//! The state every handler of a gateway node shares.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socketioxide::extract::SocketRef;
use socketioxide::SocketIo;
use switchboard_shared::bus::{Bus, Topics};
use switchboard_shared::config::Settings;
use switchboard_shared::presence::Presence;
use switchboard_shared::store::Store;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::auth::Verifier;
use crate::client_addr::TrustedProxies;
use crate::pending::Pending;
use crate::subscriptions::Subscriptions;
use crate::typing::Typing;
use crate::users::Users;

/// Socket.IO namespaces served, with the same handlers (CONTRACT §1): the
/// seed's URL read as a namespace, and the root namespace on the seed's path.
pub const NAMESPACES: [&str; 2] = ["/", "/api/socket.io"];

pub struct AppState {
    pub settings: Settings,
    pub node_id: String,
    pub bus: Arc<dyn Bus>,
    /// Who is connected, cluster-wide (connection caps, presence).
    pub presence: Arc<dyn Presence>,
    pub store: Store,
    pub topics: Topics,
    pub verifier: Verifier,
    pub subscriptions: Subscriptions,
    pub pending: Pending,
    pub io: SocketIo,
    /// `TRUSTED_PROXIES`: whose `X-Forwarded-For` is believed.
    pub proxies: TrustedProxies,
    /// Which users' rows already hold their claims (skips upserts).
    pub users: Users,
    /// This node's entries in the per-user connection sets
    /// (`<node>:<sid>` → user id), refreshed by the heartbeat
    /// (`MAX_CONNECTIONS_PER_USER`, CONTRACT §2; presence, §11).
    pub connections: dashmap::DashMap<String, String>,
    /// Typing state of this node's users (`typing.rs`).
    pub typing: Arc<Typing>,
    /// Hands recovering sockets to the dispatcher (see [`RoomEntry`]).
    pub room_entries: mpsc::UnboundedSender<RoomEntry>,
    room_entries_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<RoomEntry>>>,
    probes: mpsc::UnboundedSender<Uuid>,
    probes_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Uuid>>>,
    draining: AtomicBool,
    /// Authenticated sockets per namespace of [`NAMESPACES`], so fan-out
    /// skips a namespace nobody uses instead of serialising for it.
    ns_sockets: [AtomicUsize; 2],
}

pub type App = Arc<AppState>;

impl AppState {
    pub fn new(
        settings: Settings,
        node_id: String,
        bus: Arc<dyn Bus>,
        presence: Arc<dyn Presence>,
        store: Store,
        verifier: Verifier,
        io: SocketIo,
    ) -> Self {
        let topics = Topics::new(&settings.redis_prefix);
        // Validated when the settings were read, so this cannot fail here.
        let proxies = TrustedProxies::new(settings.trusted_proxies().unwrap_or_default());
        let (room_entries, rx) = mpsc::unbounded_channel();
        let (probes, probes_rx) = mpsc::unbounded_channel();
        Self {
            room_entries,
            room_entries_rx: std::sync::Mutex::new(Some(rx)),
            probes,
            probes_rx: std::sync::Mutex::new(Some(probes_rx)),
            proxies,
            users: Users::default(),
            connections: dashmap::DashMap::new(),
            typing: Arc::new(Typing::new(
                bus.clone(),
                topics.clone(),
                Duration::from_millis(settings.typing_interval_ms),
                Duration::from_millis(settings.typing_timeout_ms),
            )),
            presence,
            subscriptions: Subscriptions::new(bus.clone(), topics.clone()),
            pending: Pending::default(),
            settings,
            node_id,
            bus,
            store,
            topics,
            verifier,
            io,
            draining: AtomicBool::new(false),
            ns_sockets: [AtomicUsize::new(0), AtomicUsize::new(0)],
        }
    }

    /// The receiving end of [`AppState::room_entries`], once (the dispatcher's).
    pub fn take_room_entries(&self) -> Option<mpsc::UnboundedReceiver<RoomEntry>> {
        self.room_entries_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Asks the dispatcher to compare newly subscribed channels with the
    /// database and repair their rooms: a message stored between reading a
    /// channel's position and Redis confirming the subscription has no live
    /// copy here, and nothing else would bring it. Sent once the socket that
    /// caused the subscription is in the room.
    pub fn probe(&self, channels: &[Uuid]) {
        for c in channels {
            let _ = self.probes.send(*c);
        }
    }

    /// The receiving end of the probes, once (the dispatcher's).
    pub fn take_probes(&self) -> Option<mpsc::UnboundedReceiver<Uuid>> {
        self.probes_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn ns_index(ns: &str) -> usize {
        NAMESPACES.iter().position(|n| *n == ns).unwrap_or(0)
    }

    /// Counts a socket in or out of its namespace.
    pub fn count_socket(&self, ns: &str, delta: isize) {
        let counter = &self.ns_sockets[Self::ns_index(ns)];
        if delta >= 0 {
            counter.fetch_add(delta as usize, Ordering::Relaxed);
        } else {
            counter.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    /// Whether any authenticated socket is in namespace `ns`.
    pub fn namespace_in_use(&self, ns: &str) -> bool {
        self.ns_sockets[Self::ns_index(ns)].load(Ordering::Relaxed) > 0
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// Room of a channel's sockets.
pub fn channel_room(id: &uuid::Uuid) -> String {
    format!("ch:{id}")
}

/// Room of all sockets of one user on this node.
pub fn user_room(user_id: &str) -> String {
    format!("u:{user_id}")
}

/// Sockets of `user_id` on this node, in every namespace.
pub fn local_sockets_of(app: &App, user_id: &str) -> Vec<socketioxide::extract::SocketRef> {
    let room = user_room(user_id);
    NAMESPACES
        .iter()
        .filter_map(|ns| app.io.of(*ns))
        .flat_map(|op| op.to(room.clone()).sockets())
        .collect()
}

/// A socket that was sent a channel's messages up to `replayed_to` from the
/// database (`None`: no replay) and now enters the channel's room. The dispatcher does it, in
/// order with the live events: it first sends what it emitted to the room
/// after `replayed_to`, then joins the socket, so the seam between replayed
/// and live messages has no hole and no duplicate. `done` gets the seq the
/// socket now holds.
pub struct RoomEntry {
    pub socket: SocketRef,
    pub channel: Uuid,
    pub replayed_to: Option<i64>,
    pub done: oneshot::Sender<i64>,
}
