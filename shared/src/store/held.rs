//! One PostgreSQL connection kept out of the pool for a worker's inserts.
//!
//! sqlx pings every connection it returns to its pool (a `Sync` and its
//! `ReadyForQuery`, in a task it spawns on release), so a statement through
//! the pool costs PostgreSQL a second round trip and a second wake-up of its
//! backend: about a quarter of the backend's work for a worker's small batch
//! (BENCHMARKS.md, "Issue 9, sixth pass"). A worker inserts one batch at a
//! time, so it keeps that connection between batches instead.
//!
//! Whatever could leave the connection in doubt hands it back to the pool,
//! whose own checks decide whether it is still good (its ping on release,
//! and a ping before an acquire after idling): an insert that failed, one
//! that was cancelled (the connection is dropped with its future), and a
//! connection unused for longer than the pool's idle check, so that a
//! PostgreSQL restart between two batches costs no failed batch.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sea_orm::sqlx::pool::PoolConnection;
use sea_orm::sqlx::Postgres;

/// The kept connection and when it was last used. Empty until the first
/// insert, and again after a failure.
#[derive(Default)]
pub struct InsertConnection {
    slot: Mutex<Option<(PoolConnection<Postgres>, Instant)>>,
}

impl InsertConnection {
    /// Takes the kept connection if it was used less than `fresh_for` ago;
    /// an older one goes back to the pool.
    pub(super) fn take(&self, fresh_for: Duration) -> Option<PoolConnection<Postgres>> {
        let (conn, used) = self.slot.lock().ok()?.take()?;
        (used.elapsed() < fresh_for).then_some(conn)
    }

    /// Keeps `conn` after a successful insert.
    pub(super) fn put(&self, conn: PoolConnection<Postgres>) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some((conn, Instant::now()));
        }
    }

    /// Whether a connection is kept (tests).
    #[cfg(test)]
    pub(super) fn holds(&self) -> bool {
        self.slot.lock().is_ok_and(|slot| slot.is_some())
    }
}
