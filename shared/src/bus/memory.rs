//! The in-process implementation of [`Bus`] for the embedded mode: the same
//! partitions, pending entries, leases, TTL'd dedupe keys and topics as
//! Redis, held in memory. Nothing here survives a restart, which is fine:
//! in embedded mode the gateway and the worker live and die together, and
//! everything acknowledged is already in SQLite.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, Notify};

use super::{
    Backlog, Bus, BusError, BusResult, DedupeClaim, PartitionBatch, RateLimit, StreamEntry,
    TopicMessage,
};

#[derive(Default)]
struct Partition {
    next_seq: u64,
    /// Entries not yet acknowledged, by sequence.
    entries: BTreeMap<u64, Slot>,
    /// Highest sequence handed out by `read`.
    delivered_up_to: u64,
}

struct Slot {
    payload: Bytes,
    deliveries: u64,
    appended: Instant,
}

#[derive(Default)]
struct State {
    partitions: HashMap<u32, Partition>,
    leases: HashMap<u32, (String, Instant)>,
    workers: HashMap<String, Instant>,
    keys: HashMap<String, (String, Instant)>,
    counters: HashMap<String, (u64, Instant)>,
    /// Token buckets: level and when it was last taken from.
    buckets: HashMap<String, (f64, Instant)>,
    subscribed: HashSet<String>,
    inserts_since_sweep: usize,
}

impl State {
    fn sweep_expired(&mut self) {
        self.inserts_since_sweep += 1;
        if self.inserts_since_sweep < 4096 {
            return;
        }
        self.inserts_since_sweep = 0;
        let now = Instant::now();
        self.keys.retain(|_, (_, exp)| *exp > now);
        self.counters.retain(|_, (_, exp)| *exp > now);
        // A bucket idle for a minute is full again at any sane rate.
        self.buckets
            .retain(|_, (_, last)| now.duration_since(*last) < Duration::from_secs(60));
    }

    /// Takes a token from `limit`'s bucket (see `RateLimit::take`).
    fn take_token(&mut self, limit: &RateLimit) -> Result<(), u64> {
        let now = Instant::now();
        let (tokens, last) = self
            .buckets
            .get(&limit.key)
            .copied()
            .unwrap_or((limit.burst, now));
        let elapsed = now.duration_since(last).as_secs_f64() * 1000.0;
        let level = limit.take(tokens, 0.0, elapsed)?;
        self.buckets.insert(limit.key.clone(), (level, now));
        Ok(())
    }

    fn live_key(&mut self, key: &str) -> Option<&String> {
        let now = Instant::now();
        if matches!(self.keys.get(key), Some((_, exp)) if *exp <= now) {
            self.keys.remove(key);
        }
        self.keys.get(key).map(|(v, _)| v)
    }
}

pub struct MemoryBus {
    state: Mutex<State>,
    /// Woken on every append so a blocked `read` returns at once.
    appended: Notify,
    incoming: broadcast::Sender<TopicMessage>,
    /// Never bumped: in-process pub/sub cannot disconnect.
    gaps: tokio::sync::watch::Sender<u64>,
    max_len: u64,
}

fn entry_id(seq: u64) -> String {
    format!("{seq}-0")
}

fn seq_of(id: &str) -> Option<u64> {
    id.split('-').next().and_then(|s| s.parse().ok())
}

impl MemoryBus {
    pub fn new(max_len: u64) -> Self {
        let (incoming, _) = broadcast::channel(4096);
        Self {
            state: Mutex::new(State::default()),
            appended: Notify::new(),
            incoming,
            gaps: tokio::sync::watch::Sender::new(0),
            max_len,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_new(&self, partitions: &[u32], max: usize) -> Vec<PartitionBatch> {
        let mut state = self.lock();
        let mut out = Vec::new();
        for p in partitions {
            let Some(part) = state.partitions.get_mut(p) else {
                continue;
            };
            let from = part.delivered_up_to;
            let mut entries = Vec::new();
            for (seq, slot) in part.entries.range_mut(from + 1..).take(max) {
                slot.deliveries += 1;
                entries.push(StreamEntry {
                    id: entry_id(*seq),
                    payload: slot.payload.clone(),
                    deliveries: slot.deliveries,
                });
            }
            if let Some(last) = entries.last() {
                part.delivered_up_to = seq_of(&last.id).unwrap_or(from);
                out.push(PartitionBatch {
                    partition: *p,
                    entries,
                });
            }
        }
        out
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn append(&self, partition: u32, payload: Bytes) -> BusResult<String> {
        let id = {
            let mut state = self.lock();
            let part = state.partitions.entry(partition).or_default();
            if part.entries.len() as u64 >= self.max_len {
                return Err(BusError::Full);
            }
            part.next_seq += 1;
            let seq = part.next_seq;
            part.entries.insert(
                seq,
                Slot {
                    payload,
                    deliveries: 0,
                    appended: Instant::now(),
                },
            );
            entry_id(seq)
        };
        self.appended.notify_waiters();
        Ok(id)
    }

    async fn take_token(&self, limit: &RateLimit) -> BusResult<Result<(), u64>> {
        Ok(self.lock().take_token(limit))
    }

    async fn append_many_limited(
        &self,
        entries: Vec<(u32, Bytes)>,
        limit: Option<RateLimit>,
    ) -> Vec<BusResult<String>> {
        let Some(limit) = limit else {
            return self.append_many(entries).await;
        };
        let mut out = Vec::with_capacity(entries.len());
        for (partition, payload) in entries {
            // The bucket is checked, and a full partition takes no token, as
            // in the Redis script; one lock, so nothing interleaves.
            let res = {
                let mut state = self.lock();
                let full = state
                    .partitions
                    .get(&partition)
                    .map(|p| p.entries.len() as u64 >= self.max_len)
                    .unwrap_or(false);
                let bucket = {
                    let saved = state.buckets.get(&limit.key).copied();
                    let taken = state.take_token(&limit);
                    if full {
                        // Give the token back.
                        match saved {
                            Some(v) => state.buckets.insert(limit.key.clone(), v),
                            None => state.buckets.remove(&limit.key),
                        };
                    }
                    taken
                };
                match bucket {
                    Err(ms) => Err(BusError::RateLimited { retry_after_ms: ms }),
                    Ok(()) if full => Err(BusError::Full),
                    Ok(()) => Ok(()),
                }
            };
            out.push(match res {
                Ok(()) => self.append(partition, payload).await,
                Err(e) => Err(e),
            });
        }
        out
    }

    async fn read(
        &self,
        partitions: &[u32],
        _consumer: &str,
        max: usize,
        block: Duration,
    ) -> BusResult<Vec<PartitionBatch>> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            // Register interest before looking, so an append in between wakes us.
            let notified = self.appended.notified();
            let batches = self.take_new(partitions, max);
            if !batches.is_empty() {
                return Ok(batches);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn claim_pending(
        &self,
        partition: u32,
        _consumer: &str,
        max: usize,
    ) -> BusResult<Vec<StreamEntry>> {
        let mut state = self.lock();
        let Some(part) = state.partitions.get_mut(&partition) else {
            return Ok(Vec::new());
        };
        let up_to = part.delivered_up_to;
        Ok(part
            .entries
            .range_mut(..=up_to)
            .take(max)
            .map(|(seq, slot)| {
                slot.deliveries += 1;
                StreamEntry {
                    id: entry_id(*seq),
                    payload: slot.payload.clone(),
                    deliveries: slot.deliveries,
                }
            })
            .collect())
    }

    async fn ack(&self, partition: u32, ids: &[String]) -> BusResult<()> {
        let mut state = self.lock();
        if let Some(part) = state.partitions.get_mut(&partition) {
            for id in ids {
                if let Some(seq) = seq_of(id) {
                    part.entries.remove(&seq);
                }
            }
        }
        Ok(())
    }

    async fn dead_letter(&self, partition: u32, entry: &StreamEntry, error: &str) -> BusResult<()> {
        tracing::error!(partition, id = %entry.id, error, "entry moved to the dead letters");
        metrics::counter!("bus_dead_letters_total").increment(1);
        self.ack(partition, std::slice::from_ref(&entry.id)).await
    }

    async fn backlog(&self, partition: u32) -> BusResult<u64> {
        Ok(self
            .lock()
            .partitions
            .get(&partition)
            .map(|p| p.entries.len() as u64)
            .unwrap_or(0))
    }

    async fn backlog_stats(&self, partition: u32) -> BusResult<Backlog> {
        let state = self.lock();
        let part = state.partitions.get(&partition);
        Ok(Backlog {
            entries: part.map(|p| p.entries.len() as u64).unwrap_or(0),
            oldest_age: part
                .and_then(|p| p.entries.values().next())
                .map(|slot| slot.appended.elapsed()),
        })
    }

    async fn acquire_lease(&self, partition: u32, owner: &str, ttl: Duration) -> BusResult<bool> {
        let mut state = self.lock();
        let now = Instant::now();
        let free = match state.leases.get(&partition) {
            None => true,
            Some((o, exp)) => o == owner || *exp <= now,
        };
        if free {
            state
                .leases
                .insert(partition, (owner.to_string(), now + ttl));
        }
        Ok(free)
    }

    async fn renew_lease(&self, partition: u32, owner: &str, ttl: Duration) -> BusResult<bool> {
        let mut state = self.lock();
        let now = Instant::now();
        match state.leases.get_mut(&partition) {
            Some((o, exp)) if o == owner && *exp > now => {
                *exp = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_lease(&self, partition: u32, owner: &str) -> BusResult<()> {
        let mut state = self.lock();
        if matches!(state.leases.get(&partition), Some((o, _)) if o == owner) {
            state.leases.remove(&partition);
        }
        Ok(())
    }

    async fn heartbeat(&self, worker: &str, ttl: Duration) -> BusResult<usize> {
        let mut state = self.lock();
        let now = Instant::now();
        state.workers.insert(worker.to_string(), now);
        state
            .workers
            .retain(|_, seen| now.duration_since(*seen) < ttl);
        Ok(state.workers.len().max(1))
    }

    async fn leave(&self, worker: &str) -> BusResult<()> {
        self.lock().workers.remove(worker);
        Ok(())
    }

    async fn claim_dedupe(
        &self,
        claims: &[(String, String)],
        ttl: Duration,
    ) -> BusResult<Vec<DedupeClaim>> {
        let mut state = self.lock();
        let now = Instant::now();
        let mut out = Vec::with_capacity(claims.len());
        for (key, value) in claims {
            match state.live_key(key).cloned() {
                Some(old) => out.push(DedupeClaim::Existing(old)),
                None => {
                    state.keys.insert(key.clone(), (value.clone(), now + ttl));
                    state.sweep_expired();
                    out.push(DedupeClaim::Claimed);
                }
            }
        }
        Ok(out)
    }

    async fn settle_dedupe(
        &self,
        set: &[(String, String)],
        ttl: Duration,
        delete: &[String],
    ) -> BusResult<()> {
        let mut state = self.lock();
        let exp = Instant::now() + ttl;
        for (k, v) in set {
            state.keys.insert(k.clone(), (v.clone(), exp));
        }
        for k in delete {
            state.keys.remove(k);
        }
        Ok(())
    }

    async fn release_dedupe(&self, claims: &[(String, String)]) -> BusResult<()> {
        let mut state = self.lock();
        for (key, value) in claims {
            if state.live_key(key) == Some(value) {
                state.keys.remove(key);
            }
        }
        Ok(())
    }

    async fn count_in_window(&self, key: &str, window: Duration) -> BusResult<u64> {
        let mut state = self.lock();
        let now = Instant::now();
        let slot = state
            .counters
            .entry(key.to_string())
            .or_insert((0, now + window));
        if slot.1 <= now {
            *slot = (0, now + window);
        }
        slot.0 += 1;
        let n = slot.0;
        state.sweep_expired();
        Ok(n)
    }

    async fn read_counter(&self, key: &str) -> BusResult<u64> {
        let state = self.lock();
        let now = Instant::now();
        Ok(match state.counters.get(key) {
            Some((n, exp)) if *exp > now => *n,
            _ => 0,
        })
    }

    async fn publish(&self, messages: Vec<(String, Bytes)>) -> BusResult<()> {
        let state = self.lock();
        for (topic, payload) in messages {
            if state.subscribed.contains(&topic) {
                let _ = self.incoming.send(TopicMessage { topic, payload });
            }
        }
        Ok(())
    }

    async fn subscribe(&self, topics: Vec<String>) -> BusResult<()> {
        self.lock().subscribed.extend(topics);
        Ok(())
    }

    async fn unsubscribe(&self, topics: Vec<String>) -> BusResult<()> {
        let mut state = self.lock();
        for t in topics {
            state.subscribed.remove(&t);
        }
        Ok(())
    }

    fn incoming(&self) -> broadcast::Receiver<TopicMessage> {
        self.incoming.subscribe()
    }

    fn pubsub_gaps(&self) -> tokio::sync::watch::Receiver<u64> {
        self.gaps.subscribe()
    }

    async fn ping(&self) -> BusResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_stay_pending_until_acked_and_the_bound_holds() {
        let bus = MemoryBus::new(2);
        bus.append(0, Bytes::from_static(b"a")).await.expect("a");
        bus.append(0, Bytes::from_static(b"b")).await.expect("b");
        let stats = bus.backlog_stats(0).await.expect("stats");
        assert_eq!(stats.entries, 2);
        assert!(stats.oldest_age.is_some());
        assert_eq!(bus.backlog_stats(1).await.expect("stats").oldest_age, None);
        assert!(matches!(
            bus.append(0, Bytes::from_static(b"c")).await,
            Err(BusError::Full)
        ));
        let batches = bus
            .read(&[0], "w", 10, Duration::from_millis(10))
            .await
            .expect("read");
        assert_eq!(batches[0].entries.len(), 2);
        // Not acked: a takeover sees both again, with a second delivery.
        let pending = bus.claim_pending(0, "w2", 10).await.expect("claim");
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].deliveries, 2);
        bus.ack(0, &[pending[0].id.clone()]).await.expect("ack");
        assert_eq!(bus.backlog(0).await.expect("backlog"), 1);
    }

    #[tokio::test]
    async fn dedupe_claims_are_set_nx_get() {
        let bus = MemoryBus::new(10);
        let ttl = Duration::from_secs(5);
        let first = bus
            .claim_dedupe(&[("k".into(), "v1".into())], ttl)
            .await
            .expect("claim");
        assert_eq!(first, vec![DedupeClaim::Claimed]);
        let second = bus
            .claim_dedupe(&[("k".into(), "v2".into())], ttl)
            .await
            .expect("claim");
        assert_eq!(second, vec![DedupeClaim::Existing("v1".into())]);
    }

    #[tokio::test]
    async fn release_deletes_only_our_own_claim() {
        let bus = MemoryBus::new(10);
        let ttl = Duration::from_secs(5);
        let claims = [("a".into(), "p:1".into()), ("b".into(), "p:2".into())];
        bus.claim_dedupe(&claims, ttl).await.expect("claim");
        // "b" holds another entry's claim: kept.
        bus.release_dedupe(&[("a".into(), "p:1".into()), ("b".into(), "p:9".into())])
            .await
            .expect("release");
        let again = bus.claim_dedupe(&claims, ttl).await.expect("claim");
        assert_eq!(
            again,
            vec![DedupeClaim::Claimed, DedupeClaim::Existing("p:2".into())]
        );
    }
}
