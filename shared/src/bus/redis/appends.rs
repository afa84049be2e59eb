//! Appends of many sockets in one script call: group commit.
//!
//! Every socket's inbox appends its sends and waits for their stream ids
//! before answering `SENT`. One `EVALSHA` per socket batch meant, at
//! thousands of messages a second, thousands of script calls a second:
//! Redis pays the I/O and set-up of each call, and fred writes each
//! `EVALSHA` with a system call of its own. Here, while one call is in
//! flight, the appends that arrive wait and leave together in the next call
//! (one per slot on a Redis Cluster): batches grow with the load by
//! themselves, and a lone append goes out at once — no timer, no waiting,
//! no extra task on the way.
//!
//! Order: a caller's entries stay in order and in one call per slot, and
//! callers are served in arrival order, so one socket's messages reach their
//! stream in the order sent (its inbox awaits each batch before the next).

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::oneshot;

use super::{evalsha, slots, unavailable};
use crate::bus::{BusError, BusResult, RateLimit};

/// Entries per script call: bounds one call's run time inside Redis (which
/// serves nobody else meanwhile). A queue longer than this leaves in several
/// calls, one after the other.
const APPEND_CALL_MAX: usize = 256;

/// One caller's appends: `(stream key, payload)` in order, each checked
/// against `limit` in the same atomic step when given.
pub(super) struct Request {
    pub entries: Vec<(String, Bytes)>,
    pub limit: Option<RateLimit>,
}

/// A request queued behind the call in flight, and where its results go.
struct Waiting {
    request: Request,
    reply: oneshot::Sender<Vec<BusResult<String>>>,
}

#[derive(Default)]
struct State {
    /// A call is in flight (its owner sends the queue next).
    busy: bool,
    queue: Vec<Waiting>,
}

pub(super) struct Appends {
    client: Client,
    script: Script,
    max_len: u64,
    /// On a Redis Cluster a token bucket lives next to the stream it guards
    /// (see [`bucket_key`]).
    clustered: bool,
    state: Mutex<State>,
}

/// The key of a bucket checked with an append to `stream`: on a Redis
/// Cluster, hash-tagged with the stream's name so both share a slot (one
/// bucket per user and partition there).
fn bucket_key(clustered: bool, limit: &RateLimit, stream: &str) -> String {
    if clustered {
        format!("{}:{{{}}}", limit.key, stream)
    } else {
        limit.key.clone()
    }
}

/// Releases the turn (the right to send) when its owner is done or dropped:
/// whatever queued meanwhile is then sent by a task of its own, so a
/// cancelled caller cannot leave the others waiting.
struct Turn(Arc<Appends>);

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.hand_over();
    }
}

impl Appends {
    pub(super) fn new(client: Client, script: Script, max_len: u64, clustered: bool) -> Self {
        Self {
            client,
            script,
            max_len,
            clustered,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned state is still
        // consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `request`'s entries: one result per entry, in order.
    pub(super) async fn append(self: &Arc<Self>, request: Request) -> Vec<BusResult<String>> {
        let n = request.entries.len();
        if n == 0 {
            return Vec::new();
        }
        let queued = {
            let mut state = self.state();
            if state.busy {
                let (reply, rx) = oneshot::channel();
                state.queue.push(Waiting { request, reply });
                Ok(rx)
            } else {
                state.busy = true;
                Err(request)
            }
        };
        match queued {
            Ok(rx) => rx.await.unwrap_or_else(|_| lost(n)),
            Err(request) => {
                let _turn = Turn(self.clone());
                self.send(vec![request]).await.pop().unwrap_or_default()
            }
        }
    }

    /// Called when a sender is done: frees the turn, or hands the queue to
    /// a task that sends it.
    fn hand_over(self: &Arc<Self>) {
        let mut state = self.state();
        if state.queue.is_empty() {
            state.busy = false;
            return;
        }
        drop(state);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let me = self.clone();
                runtime.spawn(async move { me.drain().await });
            }
            Err(_) => {
                // No runtime left (shutting down): the waiters get an error.
                let mut state = self.state();
                state.queue.clear();
                state.busy = false;
            }
        }
    }

    /// Sends the queue, call after call, until it is empty.
    async fn drain(self: Arc<Self>) {
        let turn = Turn(self.clone());
        loop {
            let batch = {
                let mut state = self.state();
                let mut entries = 0;
                let take = state
                    .queue
                    .iter()
                    .take_while(|w| {
                        entries += w.request.entries.len();
                        entries <= APPEND_CALL_MAX
                    })
                    .count()
                    .max(1);
                let take = take.min(state.queue.len());
                state.queue.drain(..take).collect::<Vec<_>>()
            };
            if batch.is_empty() {
                break;
            }
            let (requests, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|w| (w.request, w.reply)).unzip();
            let results = self.send(requests).await;
            for (reply, result) in replies.into_iter().zip(results) {
                // A caller that went away no longer wants its results.
                let _ = reply.send(result);
            }
        }
        // The queue was empty under the lock just now; `hand_over` frees
        // the turn or, if more arrived since, starts another drain.
        drop(turn);
    }

    /// Sends `requests` (one script call per slot and `APPEND_CALL_MAX`
    /// entries, concurrently) and returns each request's results.
    async fn send(&self, requests: Vec<Request>) -> Vec<Vec<BusResult<String>>> {
        // Every entry, flat: (request, stream, payload).
        let flat: Vec<(usize, &str, &Bytes)> = requests
            .iter()
            .enumerate()
            .flat_map(|(r, req)| {
                req.entries
                    .iter()
                    .map(move |(stream, payload)| (r, stream.as_str(), payload))
            })
            .collect();
        let groups: Vec<Vec<usize>> = if self.clustered {
            slots::group_by_slot(flat.iter().map(|(_, stream, _)| *stream))
        } else {
            vec![(0..flat.len()).collect()]
        };
        let calls: Vec<&[usize]> = groups
            .iter()
            .flat_map(|g| g.chunks(APPEND_CALL_MAX))
            .collect();
        let replies = futures::future::join_all(calls.iter().map(|idx| {
            let mut keys = Vec::with_capacity(idx.len() * 2);
            let mut args = Vec::with_capacity(1 + idx.len() * 5);
            args.push(Value::from(self.max_len as i64));
            for i in idx.iter() {
                let (r, stream, payload) = flat[*i];
                keys.push(stream.to_string());
                args.push(Value::Bytes((*payload).clone()));
                match &requests[r].limit {
                    Some(l) => {
                        keys.push(bucket_key(self.clustered, l, stream));
                        args.extend([
                            Value::from("1"),
                            Value::from(l.per_s.to_string()),
                            Value::from(l.burst.to_string()),
                            Value::from(l.idle_ttl_ms() as i64),
                        ]);
                    }
                    None => {
                        keys.push(stream.to_string());
                        args.extend([
                            Value::from("0"),
                            Value::from(""),
                            Value::from(""),
                            Value::from(""),
                        ]);
                    }
                }
            }
            // Not fail-fast: through a reconnection or a failover the call
            // waits for the connection (or the slot's new master) within the
            // client's command timeout, so a send just after a failover is
            // stored rather than refused. A call refused with NOSCRIPT
            // appended nothing, so `evalsha` running it again cannot
            // duplicate an entry.
            evalsha::<Value>(&self.client, false, &self.script, keys, args)
        }))
        .await;

        let mut out: Vec<Vec<BusResult<String>>> = requests
            .iter()
            .map(|r| Vec::with_capacity(r.entries.len()))
            .collect();
        // Results by flat index, then handed out in each request's order.
        let mut by_entry: Vec<Option<BusResult<String>>> = (0..flat.len()).map(|_| None).collect();
        for (idx, reply) in calls.iter().zip(replies) {
            match reply {
                Ok(Value::Array(items)) if items.len() == idx.len() => {
                    for (i, item) in idx.iter().zip(items) {
                        by_entry[*i] = Some(entry_result(item));
                    }
                }
                Ok(other) => {
                    for i in idx.iter() {
                        by_entry[*i] = Some(Err(BusError::Protocol(format!(
                            "append: unexpected reply {other:?}"
                        ))));
                    }
                }
                Err(e) => {
                    for i in idx.iter() {
                        by_entry[*i] = Some(Err(unavailable(&e)));
                    }
                }
            }
        }
        for ((r, _, _), result) in flat.iter().zip(by_entry) {
            out[*r].push(result.unwrap_or_else(|| Err(unavailable("append not sent"))));
        }
        out
    }
}

/// One entry's reply of `APPEND_LUA`.
fn entry_result(item: Value) -> BusResult<String> {
    let reply = item.as_string().unwrap_or_default();
    if reply == "full" {
        return Err(BusError::Full);
    }
    match reply.strip_prefix("rl:") {
        Some(ms) => Err(BusError::RateLimited {
            retry_after_ms: ms.parse().unwrap_or(1000),
        }),
        None => Ok(reply),
    }
}

/// The results of a request whose sender went away (the runtime is shutting
/// down): unknown, so reported as unavailable.
fn lost(n: usize) -> Vec<BusResult<String>> {
    (0..n)
        .map(|_| Err(unavailable("append abandoned while shutting down")))
        .collect()
}
