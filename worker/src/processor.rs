//! Processing of one batch of stream entries: dedupe, persist, fan out, ack.
//!
//! The order of the steps is what makes the pipeline safe:
//!
//! 1. **Claim dedupe keys** (`SET NX GET`, value `p:<id>`): an in-flight
//!    duplicate fails, a resent delivered `tempId` answers with the original
//!    id, our own key (a redelivery of this very entry) lets it through.
//!    Reactions and reads claim a marker of their request id in the same
//!    call, so that their redelivery is re-announced too ([`command_claim`]).
//! 2. **Persist** the new messages with one multi-row insert, numbered per
//!    channel. A redelivered entry whose row already exists is not inserted
//!    again: the stored row is fanned out instead.
//! 3. **Fan out** the outcomes on the senders' node topics and
//!    `message:created` on the channel topics, in one ordered publish.
//! 4. **Settle dedupe keys**: `d:<id>` for a `tempId` key (kept `DEDUPE_TTL`),
//!    delete a content key.
//! 5. **Acknowledge** the entries. Nothing is acknowledged before it is
//!    written; a crash anywhere before this step means redelivery, which the
//!    steps above make idempotent (at-least-once fan-out, exactly-once rows).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use bytes::Bytes;
use chrono::Utc;
use sha2::{Digest, Sha256};
use switchboard_shared::bus::{BatchEnd, Bus, DedupeClaim, StreamEntry, Topics};
use switchboard_shared::config::Settings;
use switchboard_shared::protocol::{
    self, errors, iso, ChannelEvent, Command, CommandEnvelope, DeliveryStatus, MessageCreated,
    MessageReadEvent, MessageView, Outcome, OutcomeResult, ReactionAdded, ReactionRemoved,
    SendMessage, UserView,
};
use switchboard_shared::store::{reaction_view, InsertConnection, NewMessage, Store};
use uuid::Uuid;

/// What became of one entry.
enum Verdict {
    /// Insert this message (or re-announce it, when a redelivery finds it stored).
    Persist,
    /// A `tempId` already delivered: answer with the original id.
    AlreadyDelivered(Uuid),
    /// Refused (in-flight duplicate).
    Failed(String),
    /// Refused by a check only the worker can make (`replyToId` not a
    /// message of the channel). Unlike [`Verdict::Failed`] the dedupe key is
    /// ours, so it is released: a corrected resend with the same `tempId`
    /// goes through.
    Rejected(String),
    /// Not stored because its outcome deadline passed (the gateway answers
    /// or answered FAILED "safe to resend"); our dedupe claim is released so
    /// that the resend goes through.
    Expired,
}

struct Item {
    partition: u32,
    entry_id: String,
    env: CommandEnvelope,
    msg: SendMessage,
    dedupe_key: String,
    verdict: Verdict,
}

/// A reaction or read command, applied after the batch's messages are stored.
struct Other {
    partition: u32,
    entry_id: String,
    env: CommandEnvelope,
    /// Its claim (see [`command_claim`]) already held our value: an earlier
    /// attempt may have applied it and then failed before publishing, so it
    /// is announced even when applying it again changes nothing.
    redelivered: bool,
}

/// One entry of the batch, in stream order.
enum Work {
    /// Index into the batch's messages.
    Send(usize),
    Other(Box<Other>),
}

/// The dedupe key of CONTRACT §4: `<userId>:<tempId>`, or
/// `<userId>:h:<sha256(channelId, content)>` without a `tempId`.
pub fn dedupe_key(msg: &SendMessage) -> String {
    match &msg.temp_id {
        Some(t) => format!("{}:{}", msg.author.id, t),
        None => {
            let mut h = Sha256::new();
            h.update(msg.channel_id.as_bytes());
            h.update([0]);
            h.update(msg.content.as_bytes());
            format!("{}:h:{}", msg.author.id, hex::encode(h.finalize()))
        }
    }
}

/// The dedupe claim `(key, value)` an entry holds while it is processed.
///
/// Messages use the key of CONTRACT §4. Reactions and reads use a key of
/// their own request id (unique per command, never sent to a client), only
/// to recognise their own redelivery: when a batch fails after a reaction
/// was committed, the retry finds the reaction stored and would otherwise
/// announce nothing (adding an existing reaction is a silent no-op, §5),
/// although the sender's acknowledgement says ok. Claimed in the batch's one
/// claim call and deleted in its one settle call, so it costs no round trip.
/// The dead-letter path releases the claim with a compare-and-delete.
pub fn command_claim(command: &Command) -> (String, String) {
    match command {
        Command::SendMessage(msg) => (dedupe_key(msg), format!("p:{}", msg.id)),
        other => {
            let id = other.request_id();
            (format!("cmd:{id}"), format!("p:{id}"))
        }
    }
}

/// What the client is told when its entry is dead-lettered for a data
/// error (the database refused it: retrying cannot help).
pub const UNSTORABLE: &str = "The request contains data that cannot be stored";

/// Per-channel sequence numbers, cached while this worker holds the
/// channel's partition (it is the only writer then).
#[derive(Default)]
pub struct SeqCache {
    next: HashMap<Uuid, i64>,
}

impl SeqCache {
    /// Forgets the channels of `partition` (after acquiring it: another
    /// worker may have written meanwhile).
    pub fn forget_partition(&mut self, partition: u32, partitions: u32) {
        self.next
            .retain(|c, _| switchboard_shared::bus::partition_of(c, partitions) != partition);
    }
    pub fn clear(&mut self) {
        self.next.clear();
    }
}

pub struct Processor {
    pub bus: Arc<dyn Bus>,
    pub store: Store,
    pub topics: Topics,
    pub settings: Settings,
    /// The connection this worker keeps for its inserts (batches are
    /// processed one at a time; `store::InsertConnection` says why).
    pub inserts: InsertConnection,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A backend failed; the batch stays unacknowledged and is retried.
    #[error("{0}")]
    Transient(String),
    /// The database refused the data of an entry of the batch (see
    /// [`switchboard_shared::store::is_permanent`]): retrying the same
    /// batch cannot succeed, so the caller splits it at once to isolate the
    /// entry, which is dead-lettered. Nothing of the batch is acknowledged.
    #[error("{0}")]
    Permanent(String),
}

/// A database error, classified.
fn db_err(e: sea_orm::DbErr) -> ProcessError {
    if switchboard_shared::store::is_permanent(&e) {
        ProcessError::Permanent(e.to_string())
    } else {
        ProcessError::Transient(e.to_string())
    }
}

impl Processor {
    /// Processes entries (of one or more partitions, each in stream order)
    /// and acknowledges them. On error nothing of the batch is acknowledged.
    pub async fn process(
        &self,
        entries: Vec<(u32, StreamEntry)>,
        seqs: &mut SeqCache,
    ) -> Result<usize, ProcessError> {
        let transient = |e: &dyn std::fmt::Display| ProcessError::Transient(e.to_string());
        let mut items = Vec::with_capacity(entries.len());
        let mut work = Vec::with_capacity(entries.len());
        for (partition, entry) in entries {
            match protocol::decode::<CommandEnvelope>(&entry.payload) {
                Ok(env) => match env.command.clone() {
                    Command::SendMessage(msg) => {
                        work.push(Work::Send(items.len()));
                        items.push(Item {
                            partition,
                            entry_id: entry.id,
                            dedupe_key: dedupe_key(&msg),
                            env,
                            msg,
                            verdict: Verdict::Persist,
                        });
                    }
                    _ => work.push(Work::Other(Box::new(Other {
                        partition,
                        entry_id: entry.id,
                        env,
                        redelivered: false,
                    }))),
                },
                Err(e) => {
                    // Undecodable: retrying cannot help.
                    tracing::error!(partition, id = %entry.id, error = %e, "undecodable entry");
                    self.bus
                        .dead_letter(partition, &entry, &format!("undecodable entry: {e}"))
                        .await
                        .map_err(|e| transient(&e))?;
                }
            }
        }
        if work.is_empty() {
            return Ok(0);
        }

        // 1. Dedupe claims: the messages', then the other commands' (their
        //    own redelivery marker, see `command_claim`).
        let mut claims: Vec<(String, String)> = items
            .iter()
            .map(|i| (i.dedupe_key.clone(), format!("p:{}", i.msg.id)))
            .collect();
        let mut command_keys = Vec::new();
        for w in &work {
            if let Work::Other(o) = w {
                let claim = command_claim(&o.env.command);
                command_keys.push(claim.0.clone());
                claims.push(claim);
            }
        }
        let processing_ttl = Duration::from_secs(self.settings.dedupe_processing_ttl);
        let results = self
            .bus
            .claim_dedupe(&claims, processing_ttl)
            .instrument(tracing::debug_span!("dedupe", keys = claims.len()))
            .await
            .map_err(|e| transient(&e))?;
        let mut results = results.into_iter();
        let message_results: Vec<DedupeClaim> = results.by_ref().take(items.len()).collect();
        for (w, claim) in work
            .iter_mut()
            .filter_map(|w| match w {
                Work::Other(o) => Some(o),
                Work::Send(_) => None,
            })
            .zip(results)
        {
            let ours = format!("p:{}", w.env.command.request_id());
            w.redelivered = claim == DedupeClaim::Existing(ours);
        }
        let mut maybe_stored = Vec::new();
        for (item, claim) in items.iter_mut().zip(message_results) {
            item.verdict = match claim {
                DedupeClaim::Claimed => Verdict::Persist,
                DedupeClaim::Existing(v) => match v.split_once(':') {
                    Some(("p", id)) if id == item.msg.id.to_string() => {
                        maybe_stored.push(item.msg.id);
                        Verdict::Persist
                    }
                    Some(("d", id)) => match Uuid::parse_str(id) {
                        Ok(orig) => Verdict::AlreadyDelivered(orig),
                        Err(_) => Verdict::Failed(errors::ALREADY_PROCESSING.into()),
                    },
                    _ => Verdict::Failed(errors::ALREADY_PROCESSING.into()),
                },
            };
            match &item.verdict {
                Verdict::AlreadyDelivered(_) => {
                    metrics::counter!("worker_dedupe_hits_total", "kind" => "delivered")
                        .increment(1)
                }
                Verdict::Failed(_) => {
                    metrics::counter!("worker_dedupe_hits_total", "kind" => "in_flight")
                        .increment(1)
                }
                _ => {}
            }
        }

        // 2. Persist. Redelivered entries may already be stored.
        let mut stored: HashMap<Uuid, switchboard_shared::store::entities::message::Model> =
            HashMap::new();
        if !maybe_stored.is_empty() {
            for m in self
                .store
                .existing_messages(&maybe_stored)
                .await
                .map_err(db_err)?
            {
                stored.insert(m.id, m);
            }
        }
        let now = Utc::now();
        let expiry = self.settings.worker_expiry().as_millis() as i64;
        for item in items.iter_mut() {
            let age = now.timestamp_millis() - item.env.accepted_ms;
            if item.env.accepted_ms > 0
                && age > expiry
                && matches!(item.verdict, Verdict::Persist)
                && !stored.contains_key(&item.msg.id)
            {
                metrics::counter!("worker_messages_expired_total").increment(1);
                tracing::warn!(id = %item.msg.id, age_ms = age, "entry past its outcome deadline, not stored");
                item.verdict = Verdict::Expired;
            }
        }
        self.check_replies(&mut items, &stored).await?;
        let mut new_rows: Vec<NewMessage> = Vec::new();
        let unknown: Vec<Uuid> = {
            let mut v: Vec<Uuid> = items
                .iter()
                .filter(|i| matches!(i.verdict, Verdict::Persist))
                .filter(|i| !stored.contains_key(&i.msg.id))
                .map(|i| i.msg.channel_id)
                .filter(|c| !seqs.next.contains_key(c))
                .collect();
            v.sort();
            v.dedup();
            v
        };
        if !unknown.is_empty() {
            let max = self.store.max_seqs(&unknown).await.map_err(db_err)?;
            for (c, m) in max {
                seqs.next.insert(c, m + 1);
            }
        }
        let mut planned: HashMap<Uuid, i64> = HashMap::new();
        for item in items.iter_mut() {
            if !matches!(item.verdict, Verdict::Persist) {
                continue;
            }
            if stored.contains_key(&item.msg.id) {
                continue;
            }
            let next = planned
                .entry(item.msg.channel_id)
                .or_insert_with(|| seqs.next.get(&item.msg.channel_id).copied().unwrap_or(1));
            new_rows.push(NewMessage {
                id: item.msg.id,
                channel_id: item.msg.channel_id,
                user_id: item.msg.author.id.clone(),
                content: item.msg.content.clone(),
                reply_to_id: item.msg.reply_to_id,
                temp_id: item.msg.temp_id.clone(),
                seq: *next,
                created_at: now,
            });
            *next += 1;
        }
        let insert_started = std::time::Instant::now();
        let inserted = self
            .store
            .insert_messages_kept(&self.inserts, &new_rows)
            .instrument(tracing::debug_span!("insert", rows = new_rows.len()))
            .await;
        metrics::histogram!("worker_insert_duration_seconds")
            .record(insert_started.elapsed().as_secs_f64());
        if let Err(e) = inserted {
            let e = db_err(e);
            if matches!(e, ProcessError::Transient(_)) {
                // Perhaps a stale sequence (another worker wrote): reload next time.
                seqs.clear();
            }
            return Err(e);
        }
        seqs.next.extend(planned);
        let rows: HashMap<Uuid, &NewMessage> = new_rows.iter().map(|r| (r.id, r)).collect();

        // 3. Apply reactions and reads (their messages are stored by now),
        //    and fan everything out in stream order.
        // One publish per topic per batch: a channel's events in stream
        // order, a node's outcomes in stream order.
        let mut channel_events: Vec<(Uuid, Vec<ChannelEvent>)> = Vec::new();
        let mut node_outcomes: Vec<(String, Vec<Outcome>)> = Vec::new();
        let mut settle_set = Vec::new();
        let mut settle_del = Vec::new();
        for w in &work {
            let (origin, request_id, temp_id, result, event) = match w {
                Work::Send(i) => {
                    let item = &items[*i];
                    let Some((result, created)) =
                        send_result(item, &stored, &rows, &mut settle_set, &mut settle_del)
                    else {
                        continue;
                    };
                    (
                        &item.env.origin,
                        item.msg.id,
                        item.msg.temp_id.clone(),
                        result,
                        created,
                    )
                }
                Work::Other(o) => {
                    let (result, event) = self
                        .apply(&o.env.command, o.redelivered)
                        .await
                        .map_err(db_err)?;
                    (
                        &o.env.origin,
                        o.env.command.request_id(),
                        None,
                        result,
                        event,
                    )
                }
            };
            if let Some(event) = event {
                let channel = match w {
                    Work::Send(i) => items[*i].msg.channel_id,
                    Work::Other(o) => o.env.command.channel_id(),
                };
                push_grouped(&mut channel_events, channel, event);
            }
            let outcome = Outcome {
                origin: origin.clone(),
                request_id,
                temp_id,
                result,
            };
            push_grouped(&mut node_outcomes, origin.node.clone(), outcome);
        }
        // The commands' redelivery markers are done with once published.
        settle_del.extend(command_keys);
        // The outcomes go first. A gateway's dispatcher handles its topics in
        // arrival order, and emitting a channel event wakes one writer per
        // member socket: published after the event, a sender's `DELIVERED`
        // would queue behind its whole room (tens of milliseconds in a room
        // of thousands). Nothing can overtake the event in return: the batch
        // end publishes both before anything else (one script on a single
        // Redis, one call under one lock in the embedded bus; on a cluster
        // one awaited pipeline before the partition's next batch), so the
        // event is out before the sender can act on its outcome.
        let mut publish: Vec<(String, Bytes)> =
            Vec::with_capacity(channel_events.len() + node_outcomes.len());
        for (node, outcomes) in &node_outcomes {
            let bytes = protocol::encode(outcomes).map_err(|e| transient(&e))?;
            publish.push((self.topics.node(node), Bytes::from(bytes)));
        }
        for (channel, events) in &channel_events {
            let bytes = protocol::encode(events).map_err(|e| transient(&e))?;
            publish.push((self.topics.channel(channel), Bytes::from(bytes)));
        }
        // 4. Settle dedupe keys and 5. acknowledge: with the publish, one
        //    round trip (one script on Redis), in that order.
        let mut acks: Vec<(u32, Vec<String>)> = Vec::new();
        for w in &work {
            let (partition, id) = match w {
                Work::Send(i) => (items[*i].partition, &items[*i].entry_id),
                Work::Other(o) => (o.partition, &o.entry_id),
            };
            push_grouped(&mut acks, partition, id.clone());
        }
        self.bus
            .complete_batch(BatchEnd {
                publish,
                settle_set,
                settle_ttl: Duration::from_secs(self.settings.dedupe_ttl),
                settle_delete: settle_del,
                acks,
            })
            .instrument(tracing::debug_span!("publish_settle_ack"))
            .await
            .map_err(|e| transient(&e))?;
        metrics::counter!("worker_messages_persisted_total").increment(new_rows.len() as u64);
        Ok(work.len())
    }

    /// `replyToId` must name a message of the same channel (CONTRACT §4):
    /// checked for every new message of the batch with one query, plus the
    /// messages stored earlier in this very batch. A message that fails the
    /// check is [`Verdict::Rejected`].
    async fn check_replies(
        &self,
        items: &mut [Item],
        stored: &HashMap<Uuid, switchboard_shared::store::entities::message::Model>,
    ) -> Result<(), ProcessError> {
        let to_check =
            |i: &Item| matches!(i.verdict, Verdict::Persist) && !stored.contains_key(&i.msg.id);
        let mut reply_ids: Vec<Uuid> = items
            .iter()
            .filter(|i| to_check(i))
            .filter_map(|i| i.msg.reply_to_id)
            .collect();
        if reply_ids.is_empty() {
            return Ok(());
        }
        reply_ids.sort();
        reply_ids.dedup();
        let mut channels = self
            .store
            .message_channels(&reply_ids)
            .await
            .map_err(db_err)?;
        for item in items.iter_mut() {
            if !to_check(item) {
                continue;
            }
            if let Some(reply) = item.msg.reply_to_id {
                if channels.get(&reply) != Some(&item.msg.channel_id) {
                    item.verdict =
                        Verdict::Rejected("replyToId is not a message of this channel".into());
                    continue;
                }
            }
            // Stored with this batch: later messages may reply to it.
            channels.insert(item.msg.id, item.msg.channel_id);
        }
        Ok(())
    }

    /// Applies a reaction or read command. A no-op (reaction already there,
    /// read position already past) succeeds without an event, unless the
    /// command is `redelivered`: then an earlier attempt may have made the
    /// change without announcing it, so the stored state is announced (the
    /// stored reaction row, its absence, the read) — at-least-once like
    /// `message:created`, and never contradicting what is stored.
    async fn apply(
        &self,
        command: &Command,
        redelivered: bool,
    ) -> Result<(OutcomeResult, Option<ChannelEvent>), sea_orm::DbErr> {
        let event = match command {
            Command::SendMessage(_) => None,
            Command::AddReaction(r) => {
                let mut row = self
                    .store
                    .add_reaction(r.message_id, &r.user_id, &r.kind)
                    .await?;
                if row.is_none() && redelivered {
                    row = self
                        .store
                        .reaction(r.message_id, &r.user_id, &r.kind)
                        .await?;
                }
                row.map(|row| {
                    ChannelEvent::ReactionAdded(ReactionAdded {
                        message_id: r.message_id.to_string(),
                        reaction: reaction_view(&row),
                        processed: true,
                    })
                })
            }
            Command::RemoveReaction(r) => (self
                .store
                .remove_reaction(r.message_id, &r.user_id, &r.kind)
                .await?
                || redelivered)
                .then(|| {
                    ChannelEvent::ReactionRemoved(ReactionRemoved {
                        message_id: r.message_id.to_string(),
                        user_id: r.user_id.clone(),
                        kind: r.kind.clone(),
                        processed: true,
                    })
                }),
            Command::ReadMessage(r) => (self
                .store
                .mark_read(r.channel_id, &r.user_id, r.message_id)
                .await?
                || redelivered)
                .then(|| {
                    ChannelEvent::MessageRead(MessageReadEvent {
                        message_id: r.message_id.to_string(),
                        user_id: r.user_id.clone(),
                        status: DeliveryStatus::Read,
                        timestamp: iso(Utc::now()),
                    })
                }),
        };
        Ok((OutcomeResult::Done, event))
    }
}

/// The outcome and `message:created` of one message of the batch, and the
/// dedupe key settlement it implies. `None` if the message was neither
/// stored nor refused (cannot happen after a successful insert).
fn send_result(
    item: &Item,
    stored: &HashMap<Uuid, switchboard_shared::store::entities::message::Model>,
    rows: &HashMap<Uuid, &NewMessage>,
    settle_set: &mut Vec<(String, String)>,
    settle_del: &mut Vec<String>,
) -> Option<(OutcomeResult, Option<ChannelEvent>)> {
    match &item.verdict {
        Verdict::Persist => {
            let view = if let Some(m) = stored.get(&item.msg.id) {
                let mut v = switchboard_shared::store::message_view(m, None);
                v.user = user_view(&item.msg);
                v
            } else {
                message_view(&item.msg, rows.get(&item.msg.id)?)
            };
            if item.msg.temp_id.is_some() {
                settle_set.push((item.dedupe_key.clone(), format!("d:{}", item.msg.id)));
            } else {
                settle_del.push(item.dedupe_key.clone());
            }
            Some((
                OutcomeResult::Delivered {
                    message_id: item.msg.id,
                },
                Some(ChannelEvent::MessageCreated(MessageCreated {
                    message: view,
                    temp_id: item.msg.temp_id.clone(),
                    processed: true,
                })),
            ))
        }
        Verdict::AlreadyDelivered(orig) => {
            Some((OutcomeResult::Delivered { message_id: *orig }, None))
        }
        Verdict::Failed(error) => Some((
            OutcomeResult::Failed {
                error: error.clone(),
            },
            None,
        )),
        Verdict::Rejected(error) => {
            // Our own claim (fresh or our redelivery): free it for a resend.
            settle_del.push(item.dedupe_key.clone());
            Some((
                OutcomeResult::Failed {
                    error: error.clone(),
                },
                None,
            ))
        }
        Verdict::Expired => {
            settle_del.push(item.dedupe_key.clone());
            Some((
                OutcomeResult::Failed {
                    error: errors::OUTCOME_UNKNOWN.into(),
                },
                None,
            ))
        }
    }
}

/// Appends `value` to the group of `key`, keeping first-seen group order
/// (a batch touches few topics, so a linear scan beats hashing).
fn push_grouped<K: PartialEq, V>(groups: &mut Vec<(K, Vec<V>)>, key: K, value: V) {
    match groups.iter_mut().find(|(k, _)| *k == key) {
        Some((_, values)) => values.push(value),
        None => groups.push((key, vec![value])),
    }
}

fn user_view(msg: &SendMessage) -> UserView {
    UserView {
        id: msg.author.id.clone(),
        name: msg.author.name.clone(),
        image_url: msg.author.image_url.clone(),
    }
}

fn message_view(msg: &SendMessage, row: &NewMessage) -> MessageView {
    MessageView {
        id: msg.id.to_string(),
        content: msg.content.clone(),
        channel_id: msg.channel_id.to_string(),
        user_id: msg.author.id.clone(),
        reply_to_id: msg.reply_to_id.map(|r| r.to_string()),
        delivery_status: DeliveryStatus::Delivered,
        seq: row.seq,
        created_at: iso(row.created_at),
        updated_at: iso(row.created_at),
        user: user_view(msg),
    }
}
