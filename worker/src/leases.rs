//! Partition leases: which partitions this worker processes.
//!
//! Each partition is processed by exactly one worker at a time, which is what
//! keeps a channel's messages in one order. A worker holds a partition through
//! a lease key with a TTL:
//!
//! - the [`LeaseKeeper`] task renews every held lease each `ttl / 3` and
//!   publishes the worker's heartbeat; from the number of live workers it
//!   computes the fair share `ceil(partitions / workers)`;
//! - the processing loop, between batches, acquires free partitions up to
//!   the share and releases those above it ([`Leases::rebalance`]), so
//!   partitions move when workers join or leave;
//! - a lease that could not be renewed is *lost*: the processing loop stops
//!   touching the partition once `valid_until` passes, which is before the
//!   key expires in Redis and anyone else can take it (fencing by time; the
//!   unique `(channel_id, seq)` index fences a paused zombie on top).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use switchboard_shared::bus::Bus;
use tokio_util::sync::CancellationToken;

/// A held partition and until when we may act on it.
#[derive(Debug, Clone, Copy)]
struct Held {
    valid_until: Instant,
}

#[derive(Default)]
struct Table {
    held: BTreeMap<u32, Held>,
    /// Fair share from the last heartbeat.
    target: usize,
    /// When the processing loop last rebalanced.
    last_rebalance: Option<Instant>,
}

/// The lease table shared by the keeper task and the processing loop.
#[derive(Clone)]
pub struct Leases {
    worker: String,
    bus: Arc<dyn Bus>,
    partitions: u32,
    ttl: Duration,
    table: Arc<Mutex<Table>>,
}

impl Leases {
    pub fn new(worker: &str, bus: Arc<dyn Bus>, partitions: u32, ttl: Duration) -> Self {
        Self {
            worker: worker.to_string(),
            bus,
            partitions,
            ttl,
            table: Arc::new(Mutex::new(Table {
                held: BTreeMap::new(),
                target: partitions as usize,
                last_rebalance: None,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long after a successful renewal we still act on a lease: two
    /// thirds of the TTL, leaving a third as margin before anyone else can
    /// take it.
    fn grace(&self) -> Duration {
        self.ttl * 2 / 3
    }

    /// Partitions we may process right now.
    pub fn valid(&self) -> Vec<u32> {
        let now = Instant::now();
        self.lock()
            .held
            .iter()
            .filter(|(_, h)| h.valid_until > now)
            .map(|(p, _)| *p)
            .collect()
    }

    pub fn is_valid(&self, partition: u32) -> bool {
        let now = Instant::now();
        self.lock()
            .held
            .get(&partition)
            .is_some_and(|h| h.valid_until > now)
    }

    /// Acquires free partitions up to the fair share and releases the ones
    /// above it. Returns the newly acquired partitions, whose pending entries
    /// the caller must take over before reading new ones.
    ///
    /// Runs at most every [`RECHECK`] (or `ttl / 3` if shorter): the loop
    /// calls it between every batch, and a worker whose share cannot be
    /// reached (more workers than `partitions / share`) must not retry every
    /// free-looking partition on the hot path. Each run first refreshes the
    /// heartbeat and the fair share, so partitions released by a worker
    /// stopped with SIGTERM (it leaves the live set at once) are taken within
    /// `RECHECK` plus one read, and those of a killed worker within the lease
    /// TTL plus that.
    pub async fn rebalance(&self) -> Vec<u32> {
        {
            let mut t = self.lock();
            if t.last_rebalance
                .is_some_and(|last| last.elapsed() < RECHECK.min(self.ttl / 3))
            {
                return Vec::new();
            }
            t.last_rebalance = Some(Instant::now());
        }
        if let Ok(live) = self.bus.heartbeat(&self.worker, self.ttl).await {
            self.lock().target = (self.partitions as usize).div_ceil(live.max(1));
        }
        let (held, target) = {
            let t = self.lock();
            (t.held.keys().copied().collect::<Vec<_>>(), t.target)
        };
        let mut acquired = Vec::new();
        if held.len() < target {
            // Start at a per-worker offset so that workers starting together
            // do not all race for partition 0 first.
            let offset = fxhash(&self.worker) % self.partitions;
            for i in 0..self.partitions {
                if held.len() + acquired.len() >= target {
                    break;
                }
                let p = (offset + i) % self.partitions;
                if held.contains(&p) {
                    continue;
                }
                match self.bus.acquire_lease(p, &self.worker, self.ttl).await {
                    Ok(true) => {
                        self.lock().held.insert(
                            p,
                            Held {
                                valid_until: Instant::now() + self.grace(),
                            },
                        );
                        acquired.push(p);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "lease acquisition failed");
                        break;
                    }
                }
            }
        } else if held.len() > target {
            for p in held.iter().rev().take(held.len() - target) {
                self.lock().held.remove(p);
                if let Err(e) = self.bus.release_lease(*p, &self.worker).await {
                    tracing::warn!(partition = p, error = %e, "lease release failed");
                }
                tracing::info!(partition = p, "released partition for rebalancing");
            }
        }
        if !acquired.is_empty() {
            tracing::info!(?acquired, "acquired partitions");
        }
        metrics::gauge!("worker_partitions_held").set(self.lock().held.len() as f64);
        acquired
    }

    /// Renews every held lease and refreshes the heartbeat and fair share.
    async fn keep(&self) {
        match self.bus.heartbeat(&self.worker, self.ttl).await {
            Ok(live) => {
                let target = (self.partitions as usize).div_ceil(live.max(1));
                self.lock().target = target;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        let held: Vec<u32> = self.lock().held.keys().copied().collect();
        // All renewals at once: fred pipelines concurrent commands on its
        // connection, so the keeper waits for one round trip instead of one
        // per held partition, and no renewal waits behind the others' (a
        // late renewal shortens the time a stalled worker may keep acting,
        // see `grace`).
        let started = Instant::now();
        let renewals = join_all(
            held.iter()
                .map(|&p| self.bus.renew_lease(p, &self.worker, self.ttl)),
        )
        .await;
        for (&p, renewal) in held.iter().zip(renewals) {
            match renewal {
                Ok(true) => {
                    if let Some(h) = self.lock().held.get_mut(&p) {
                        h.valid_until = started + self.grace();
                    }
                }
                Ok(false) => {
                    tracing::warn!(partition = p, "lease lost");
                    metrics::counter!("worker_leases_lost_total").increment(1);
                    self.lock().held.remove(&p);
                }
                // Unknown: keep acting until `valid_until`, then stop.
                Err(e) => tracing::warn!(partition = p, error = %e, "lease renewal failed"),
            }
        }
        metrics::gauge!("worker_stream_partitions").set(f64::from(self.partitions));
    }

    /// Sets the backlog gauges of every partition: the held ones from Redis
    /// (length and oldest entry, read concurrently), the others to 0, so that
    /// `max by (partition)` over all workers is the holder's figure, not a
    /// former holder's stale one.
    async fn refresh_backlog_gauges(&self) {
        let held: Vec<u32> = self.lock().held.keys().copied().collect();
        let backlogs = join_all(held.iter().map(|&p| self.bus.backlog_stats(p))).await;
        for (&p, backlog) in held.iter().zip(backlogs) {
            if let Ok(b) = backlog {
                metrics::gauge!("worker_stream_backlog", "partition" => p.to_string())
                    .set(b.entries as f64);
                metrics::gauge!("worker_stream_oldest_pending_age_seconds", "partition" => p.to_string())
                    .set(b.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
            }
        }
        for p in (0..self.partitions).filter(|p| !held.contains(p)) {
            metrics::gauge!("worker_stream_backlog", "partition" => p.to_string()).set(0.0);
            metrics::gauge!("worker_stream_oldest_pending_age_seconds", "partition" => p.to_string())
                .set(0.0);
        }
    }

    /// Renews leases every `ttl / 3` until cancelled, then releases them all
    /// and leaves the live set so the others take over at once.
    pub async fn run_keeper(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges_at: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    self.keep().await;
                    if gauges_at.is_none_or(|t| t.elapsed() >= BACKLOG_GAUGES_EVERY) {
                        gauges_at = Some(Instant::now());
                        self.refresh_backlog_gauges().await;
                    }
                }
            }
        }
    }

    /// Releases every lease and leaves the live set (clean shutdown).
    pub async fn release_all(&self) {
        let held: Vec<u32> = std::mem::take(&mut self.lock().held).into_keys().collect();
        join_all(
            held.iter()
                .map(|&p| self.bus.release_lease(p, &self.worker)),
        )
        .await;
        let _ = self.bus.leave(&self.worker).await;
    }
}

/// How often the keeper refreshes the backlog gauges (`worker_stream_backlog`,
/// `worker_stream_oldest_pending_age_seconds`): they feed alerts over minutes
/// and are scraped every 15 s or so, while renewals run every `LEASE_TTL_MS`/3
/// (~0.7 s); reading every held stream at that pace was about a fifth of an
/// idle cluster's Redis calls.
const BACKLOG_GAUGES_EVERY: Duration = Duration::from_secs(5);

/// Longest time between two rebalances: how soon a worker notices partitions
/// that another released or let expire (one heartbeat round trip each time,
/// plus one `SET NX` per partition it could still take).
const RECHECK: Duration = Duration::from_millis(100);

fn fxhash(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}
