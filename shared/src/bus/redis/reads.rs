//! A worker's stream reads.
//!
//! On a single Redis one blocking `XREADGROUP` covers every partition a
//! worker holds, and its arguments are kept for the next read
//! ([`ReadArgs`]). On a cluster the streams live in different slots (that is
//! the point: they spread over the shards), and one command may only name
//! keys of one slot. So each held partition gets its own blocking read, on
//! its own connection (a blocked connection holds up everything queued
//! behind it), and [`ClusterReads::read`] returns as soon as any of them
//! answers. Reads still blocked stay in flight and are collected by the next
//! call: at most one read per partition is ever outstanding, as on a single
//! Redis, so nothing is read ahead of what the worker asked for.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use fred::prelude::*;
use fred::types::CustomCommand;
use tokio::sync::{mpsc, Mutex};

use super::slots;
use crate::bus::{BusError, BusResult, PartitionBatch, Topics};

type ReadResult = (u32, Result<Value, fred::error::Error>);

pub(super) struct ClusterReads {
    /// A client of the same configuration, cloned for each partition.
    template: Client,
    state: Mutex<State>,
}

struct State {
    /// One client (connections to every shard) per partition ever read.
    clients: HashMap<u32, Client>,
    in_flight: HashSet<u32>,
    done_tx: mpsc::UnboundedSender<ReadResult>,
    done_rx: mpsc::UnboundedReceiver<ReadResult>,
}

impl ClusterReads {
    pub fn new(template: Client) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            template,
            state: Mutex::new(State {
                clients: HashMap::new(),
                in_flight: HashSet::new(),
                done_tx,
                done_rx,
            }),
        }
    }

    /// Starts a read on every partition of `partitions` that has none in
    /// flight, then waits for the first answer (and takes every other one
    /// already there). Replies are handed to `parse` as they come; a failed
    /// read is reported only when no read brought entries.
    #[allow(clippy::too_many_arguments)]
    pub async fn read(
        &self,
        topics: &Topics,
        group: &str,
        partitions: &[u32],
        consumer: &str,
        max: usize,
        block: Duration,
        parse: impl Fn(Value) -> BusResult<Vec<PartitionBatch>>,
    ) -> BusResult<Vec<PartitionBatch>> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        for &p in partitions {
            if state.in_flight.contains(&p) {
                continue;
            }
            let client = match state.clients.get(&p) {
                Some(c) => c.clone(),
                None => {
                    let c = self.template.clone_new();
                    c.init()
                        .await
                        .map_err(|e| BusError::Unavailable(e.to_string()))?;
                    state.clients.insert(p, c.clone());
                    c
                }
            };
            state.in_flight.insert(p);
            let stream = topics.stream(p);
            let (group, consumer) = (group.to_string(), consumer.to_string());
            let done = state.done_tx.clone();
            tokio::spawn(async move {
                let result = xreadgroup(&client, &stream, &group, &consumer, max, block).await;
                let _ = done.send((p, result));
            });
        }
        if state.in_flight.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        // Every read answers within `block` (or fails at its timeout).
        let mut answers = Vec::new();
        if let Some(first) = state.done_rx.recv().await {
            answers.push(first);
        }
        while let Ok(more) = state.done_rx.try_recv() {
            answers.push(more);
        }
        for (p, _) in &answers {
            state.in_flight.remove(p);
        }
        let mut out = Vec::new();
        let mut failure = None;
        for (p, result) in answers {
            let outcome = match result {
                Ok(value) => parse(value).map(|batches| out.extend(batches)),
                Err(e) if e.details().contains("NOGROUP") => {
                    ensure_group(&self.template, &topics.stream(p), group).await
                }
                Err(e) => Err(BusError::Unavailable(e.to_string())),
            };
            if let Err(e) = outcome {
                failure = Some(e);
            }
        }
        match failure {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }
}

/// One blocking `XREADGROUP` of one stream.
pub(super) async fn xreadgroup(
    client: &Client,
    stream: &str,
    group: &str,
    consumer: &str,
    max: usize,
    block: Duration,
) -> Result<Value, fred::error::Error> {
    let args = xreadgroup_args(group, consumer, max, block, &[stream.to_string()]);
    client
        .with_options(&read_options(block))
        .custom(
            CustomCommand::new_static("XREADGROUP", slots::at(stream), true),
            args,
        )
        .await
}

/// The arguments of a worker's last read on a single Redis, kept for the
/// next one. A worker reads the same partitions again and again (its held
/// set changes only on a rebalance), and building the arguments — a stream
/// name formatted per partition and a string value per argument — was most
/// of the worker's own work per read (~28 k of its ~37 k instructions,
/// BENCHMARKS.md "Issue 9, fifth pass"); a clone of the kept arguments
/// only bumps reference counts.
#[derive(Default)]
pub(super) struct ReadArgs {
    last: std::sync::Mutex<Option<Kept>>,
}

struct Kept {
    group: String,
    partitions: Vec<u32>,
    consumer: String,
    max: usize,
    block: Duration,
    args: Vec<Value>,
    /// Hash slot of the first stream (the command's routing key).
    slot: Option<u16>,
}

impl ReadArgs {
    /// The `XREADGROUP` arguments for these partitions, and the slot of the
    /// first stream.
    pub fn get(
        &self,
        topics: &Topics,
        group: &str,
        partitions: &[u32],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> (Vec<Value>, Option<u16>) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = last.as_ref().filter(|k| {
            k.group == group
                && k.partitions == partitions
                && k.consumer == consumer
                && k.max == max
                && k.block == block
        }) {
            return (k.args.clone(), k.slot);
        }
        let streams: Vec<String> = partitions.iter().map(|p| topics.stream(*p)).collect();
        let kept = Kept {
            group: group.to_string(),
            partitions: partitions.to_vec(),
            consumer: consumer.to_string(),
            max,
            block,
            args: xreadgroup_args(group, consumer, max, block, &streams),
            slot: streams.first().map(|s| slots::slot(s)),
        };
        let out = (kept.args.clone(), kept.slot);
        *last = Some(kept);
        out
    }
}

/// The arguments of `XREADGROUP GROUP … BLOCK … STREAMS <streams> > …`.
pub(super) fn xreadgroup_args(
    group: &str,
    consumer: &str,
    max: usize,
    block: Duration,
    streams: &[String],
) -> Vec<Value> {
    let mut args: Vec<Value> = vec![
        "GROUP".into(),
        group.into(),
        consumer.into(),
        "COUNT".into(),
        (max as i64).into(),
        "BLOCK".into(),
        (block.as_millis() as i64).into(),
        "STREAMS".into(),
    ];
    args.extend(streams.iter().map(|s| Value::from(s.as_str())));
    args.extend(streams.iter().map(|_| Value::from(">")));
    args
}

/// A read in flight when Redis goes away must fail soon, not wait for the
/// reconnect: the worker's loop has leases to re-take meanwhile.
pub(super) fn read_options(block: Duration) -> Options {
    Options {
        timeout: Some(block + Duration::from_secs(1)),
        max_attempts: Some(1),
        fail_fast: true,
        ..Default::default()
    }
}

/// `XGROUP CREATE … MKSTREAM`, a no-op when the group exists.
pub(super) async fn ensure_group(client: &Client, stream: &str, group: &str) -> BusResult<()> {
    let res: Result<Value, _> = client
        .custom(
            CustomCommand::new_static("XGROUP", slots::at(stream), false),
            vec![
                Value::from("CREATE"),
                Value::from(stream),
                Value::from(group),
                Value::from("0"),
                Value::from("MKSTREAM"),
            ],
        )
        .await;
    match res {
        Ok(_) => Ok(()),
        Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
        Err(e) => Err(BusError::Unavailable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[Value]) -> Vec<String> {
        args.iter()
            .map(|v| v.as_string().unwrap_or_default())
            .collect()
    }

    /// The kept arguments are reused only for the same read: another held
    /// set, group, consumer, count or block time builds them anew.
    #[test]
    fn read_args_follow_the_held_partitions() {
        let topics = Topics::new("t");
        let block = Duration::from_millis(250);
        let kept = ReadArgs::default();
        let (first, slot) = kept.get(&topics, "g", &[0, 1], "w1", 10, block);
        assert_eq!(
            strings(&first),
            [
                "GROUP",
                "g",
                "w1",
                "COUNT",
                "10",
                "BLOCK",
                "250",
                "STREAMS",
                "t:stream:0",
                "t:stream:1",
                ">",
                ">"
            ]
        );
        assert_eq!(slot, Some(slots::slot("t:stream:0")));
        assert_eq!(kept.get(&topics, "g", &[0, 1], "w1", 10, block).0, first);

        let (other, slot) = kept.get(&topics, "g", &[2], "w1", 10, block);
        assert_eq!(&strings(&other)[8..], ["t:stream:2", ">"]);
        assert_eq!(slot, Some(slots::slot("t:stream:2")));
        let (other, _) = kept.get(&topics, "g", &[2], "w2", 5, block);
        assert_eq!(&strings(&other)[..5], ["GROUP", "g", "w2", "COUNT", "5"]);
        let (other, _) = kept.get(&topics, "h", &[2], "w2", 5, block);
        assert_eq!(&strings(&other)[..2], ["GROUP", "h"]);
    }
}
