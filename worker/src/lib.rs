//! The Switchboard worker: takes the writes that gateways appended to the
//! partitioned command streams, and persists, dedupes and fans them out.
//!
//! - [`leases`]: which partitions this worker owns (one owner per partition).
//! - [`processor`]: what happens to one batch (dedupe → insert → publish → ack).
//! - [`Worker::run`]: the loop that ties them together, retries with backoff
//!   and dead-letters what cannot succeed.
//!
//! The embedded mode runs the same [`Worker`] inside the gateway process, on
//! the in-memory bus and SQLite.

pub mod leases;
pub mod processor;

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use switchboard_shared::backends::Backends;
use switchboard_shared::bus::{Bus, StreamEntry, Topics};
use switchboard_shared::config::Settings;
use switchboard_shared::protocol::{self, CommandEnvelope, Outcome, OutcomeResult};
use switchboard_shared::store::InsertConnection;
use tokio_util::sync::CancellationToken;

use leases::Leases;
use processor::{ProcessError, Processor, SeqCache};

/// What the client is told when its entry is dead-lettered after retries.
const GAVE_UP: &str = "The request could not be processed";

pub struct Worker {
    id: String,
    processor: Processor,
    leases: Leases,
}

impl Worker {
    pub fn new(backends: &Backends, settings: &Settings) -> Self {
        let id = settings
            .node_id
            .clone()
            .unwrap_or_else(|| format!("worker-{}", uuid::Uuid::now_v7().simple()));
        let leases = Leases::new(
            &id,
            backends.bus.clone(),
            settings.stream_partitions,
            settings.lease_ttl(),
        );
        Self {
            processor: Processor {
                bus: backends.bus.clone(),
                store: backends.store.clone(),
                topics: Topics::new(&settings.redis_prefix),
                settings: settings.clone(),
                inserts: InsertConnection::default(),
            },
            leases,
            id,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn bus(&self) -> &Arc<dyn Bus> {
        &self.processor.bus
    }

    /// Runs until `cancel` fires, then finishes the batch in hand, releases
    /// its leases and returns.
    pub async fn run(self, cancel: CancellationToken) {
        let settings = &self.processor.settings;
        let partitions = settings.stream_partitions;
        let batch = settings.worker_batch_size;
        let block = Duration::from_millis(settings.worker_block_ms);
        let linger = Duration::from_millis(settings.worker_linger_ms);
        tracing::info!(worker = %self.id, partitions, "worker started");

        let keeper_cancel = CancellationToken::new();
        let keeper = tokio::spawn(self.leases.clone().run_keeper(keeper_cancel.clone()));
        let mut seqs = SeqCache::default();

        while !cancel.is_cancelled() {
            // Take over what previous owners of new partitions left pending.
            for p in self.leases.rebalance().await {
                seqs.forget_partition(p, partitions);
                if let Err(e) = self.take_over(p, &mut seqs, &cancel).await {
                    tracing::warn!(partition = p, error = %e, "take-over failed; will retry");
                }
            }
            let held = self.leases.valid();
            let read = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.bus().read(&held, &self.id, batch, block) => r,
            };
            let batches = match read {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "stream read failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let entries: Vec<(u32, StreamEntry)> = batches
                .into_iter()
                .flat_map(|b| {
                    let p = b.partition;
                    b.entries.into_iter().map(move |e| (p, e))
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            let full = entries.len() >= batch;
            self.process_with_retry(entries, &mut seqs, &cancel).await;
            // A small batch: let the next one grow (WORKER_LINGER_MS). A
            // full one means a backlog, which is read at once.
            if !full && !linger.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(linger) => {}
                }
            }
        }

        // Release first: the other workers take the partitions over while the
        // keeper winds down (a renewal racing the release finds the lease gone).
        keeper_cancel.cancel();
        self.leases.release_all().await;
        let _ = keeper.await;
        // A heartbeat of the keeper that raced the release may have put this
        // worker back in the live set: leave it again (nothing is held now).
        self.leases.release_all().await;
        tracing::info!(worker = %self.id, "worker stopped");
    }

    /// Processes the entries a dead or previous owner of `partition` left
    /// unacknowledged, oldest first, before any new entry of that partition.
    async fn take_over(
        &self,
        partition: u32,
        seqs: &mut SeqCache,
        cancel: &CancellationToken,
    ) -> Result<(), switchboard_shared::bus::BusError> {
        let max_attempts = self.processor.settings.max_delivery_attempts;
        loop {
            let pending = self
                .bus()
                .claim_pending(
                    partition,
                    &self.id,
                    self.processor.settings.worker_batch_size,
                )
                .await?;
            if pending.is_empty() {
                return Ok(());
            }
            tracing::info!(
                partition,
                count = pending.len(),
                "taking over pending entries"
            );
            metrics::counter!("worker_entries_taken_over_total").increment(pending.len() as u64);
            let mut todo = Vec::with_capacity(pending.len());
            for entry in pending {
                if entry.deliveries > max_attempts {
                    let error = format!("gave up after {} deliveries", entry.deliveries - 1);
                    self.dead_letter(partition, &entry, &error, GAVE_UP).await;
                } else {
                    todo.push((partition, entry));
                }
            }
            self.process_with_retry(todo, seqs, cancel).await;
            if !self.leases.is_valid(partition) {
                return Ok(());
            }
        }
    }

    /// Processes a batch (entries of one or more partitions, each in stream
    /// order) until it is settled: processed, or its bad entries
    /// dead-lettered. Returns `false` when it leaves the batch
    /// unacknowledged instead (lease lost, shutdown): the next owner takes it
    /// over, and nothing after it may be processed here.
    ///
    /// - A transient failure (a backend down) is retried with backoff while
    ///   our leases hold; nothing is dead-lettered while the backends do not
    ///   answer.
    /// - A permanent failure (the database refused an entry's data, see
    ///   `store::is_permanent`) cannot succeed on retry, so the batch is
    ///   split in halves at once, in stream order: the good entries are
    ///   processed after a few extra attempts (about log2 of the batch size
    ///   per bad entry) and the bad entry, alone, is dead-lettered. Every
    ///   partition of the worker is stalled for milliseconds, not for the
    ///   backoff of `MAX_DELIVERY_ATTEMPTS` retries.
    /// - A batch that keeps failing with an error the classifier does not
    ///   know while the backends answer is split into single entries after
    ///   `MAX_DELIVERY_ATTEMPTS`, as the last resort.
    async fn process_with_retry(
        &self,
        entries: Vec<(u32, StreamEntry)>,
        seqs: &mut SeqCache,
        cancel: &CancellationToken,
    ) -> bool {
        let max_attempts = self.processor.settings.max_delivery_attempts;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .without_max_times()
            .build();
        let mut failures = 0u64;
        loop {
            let span = tracing::debug_span!("process_batch", entries = entries.len());
            if let Some((_, first)) = entries.first() {
                if let Ok(env) = protocol::decode::<CommandEnvelope>(&first.payload) {
                    switchboard_shared::telemetry::continue_trace(&span, &env.trace);
                }
            }
            metrics::histogram!("worker_batch_entries").record(entries.len() as f64);
            let started = std::time::Instant::now();
            // Instrumented, not entered: the future may resume on another thread.
            let result = self
                .processor
                .process(entries.clone(), seqs)
                .instrument(span)
                .await;
            metrics::histogram!("worker_batch_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(_) => return true,
                Err(ProcessError::Permanent(e)) => {
                    metrics::counter!("worker_batch_failures_total").increment(1);
                    if entries.len() == 1 {
                        let (p, entry) = &entries[0];
                        self.dead_letter(*p, entry, &e, processor::UNSTORABLE).await;
                        return true;
                    }
                    tracing::warn!(error = %e, entries = entries.len(), "data error in batch; splitting it");
                    let mut left = entries;
                    let right = left.split_off(left.len() / 2);
                    return Box::pin(self.process_with_retry(left, seqs, cancel)).await
                        && Box::pin(self.process_with_retry(right, seqs, cancel)).await;
                }
                Err(ProcessError::Transient(e)) => {
                    failures += 1;
                    metrics::counter!("worker_batch_failures_total").increment(1);
                    tracing::warn!(error = %e, failures, "batch failed; retrying");
                    if entries.iter().any(|(p, _)| !self.leases.is_valid(*p)) {
                        tracing::warn!(
                            "lease lost during retries; leaving the batch to the next owner"
                        );
                        return false;
                    }
                    if failures >= max_attempts
                        && entries.len() > 1
                        && self.processor.store.ping().await.is_ok()
                        && self.bus().ping().await.is_ok()
                    {
                        // The backends answer, so something in the batch is bad.
                        for one in entries {
                            Box::pin(self.process_one_or_dead_letter(one, seqs)).await;
                        }
                        return true;
                    }
                    if failures >= max_attempts
                        && entries.len() == 1
                        && self.processor.store.ping().await.is_ok()
                    {
                        let (p, entry) = &entries[0];
                        self.dead_letter(*p, entry, &e, GAVE_UP).await;
                        return true;
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(2));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // On shutdown leave the batch unacknowledged: the next
                        // owner takes it over.
                        _ = cancel.cancelled() => return false,
                    }
                }
            }
        }
    }

    async fn process_one_or_dead_letter(&self, one: (u32, StreamEntry), seqs: &mut SeqCache) {
        let (p, entry) = one.clone();
        match self.processor.process(vec![one], seqs).await {
            Ok(_) => {}
            Err(ProcessError::Transient(e)) => self.dead_letter(p, &entry, &e, GAVE_UP).await,
            Err(ProcessError::Permanent(e)) => {
                self.dead_letter(p, &entry, &e, processor::UNSTORABLE).await
            }
        }
    }

    /// Moves an entry to the dead letters and tells its sender it failed
    /// (`client_error`; `error` is for the logs and the dead-letter stream).
    ///
    /// First the entry's own dedupe claim is released (compare-and-delete,
    /// only on this rare path): otherwise a resend with the same `tempId`
    /// would be refused as "already being processed" until the claim's TTL
    /// runs out, although nothing is being processed.
    async fn dead_letter(
        &self,
        partition: u32,
        entry: &StreamEntry,
        error: &str,
        client_error: &str,
    ) {
        tracing::error!(partition, id = %entry.id, error, "dead-lettering entry");
        metrics::counter!("worker_dead_letters_total").increment(1);
        if let Ok(env) = protocol::decode::<CommandEnvelope>(&entry.payload) {
            let claim = processor::command_claim(&env.command);
            if let Err(e) = self.bus().release_dedupe(&[claim]).await {
                tracing::warn!(error = %e, "could not release the dedupe claim of a dead letter");
            }
            let outcome = Outcome {
                origin: env.origin.clone(),
                request_id: env.command.request_id(),
                temp_id: env.command.temp_id(),
                result: OutcomeResult::Failed {
                    error: client_error.into(),
                },
            };
            if let Ok(bytes) = protocol::encode(&[outcome]) {
                let topic = self.processor.topics.node(&env.origin.node);
                let _ = self.bus().publish(vec![(topic, Bytes::from(bytes))]).await;
            }
        }
        if let Err(e) = self.bus().dead_letter(partition, entry, error).await {
            tracing::error!(error = %e, "could not dead-letter entry");
        }
    }
}
