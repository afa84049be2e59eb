//! Processing of one batch of stream entries: dedupe, persist, fan out, ack.
//!
//! The order of the steps is what makes the pipeline safe:
//!
//! 1. **Claim dedupe keys** (`SET NX GET`, value `p:<id>`): an in-flight
//!    duplicate fails, a resent delivered `tempId` answers with the original
//!    id, our own key (a redelivery of this very entry) lets it through.
//! 2. **Persist** the new messages with one multi-row insert, numbered per
//!    channel. A redelivered entry whose row already exists is not inserted
//!    again: the stored row is fanned out instead.
//! 3. **Fan out** `message:created` on the channel topics and the outcomes on
//!    the senders' node topics, in one ordered publish.
//! 4. **Settle dedupe keys**: `d:<id>` for a `tempId` key (kept `DEDUPE_TTL`),
//!    delete a content key.
//! 5. **Acknowledge** the entries. Nothing is acknowledged before it is
//!    written; a crash anywhere before this step means redelivery, which the
//!    steps above make idempotent (at-least-once fan-out, exactly-once rows).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use sha2::{Digest, Sha256};
use switchboard_shared::bus::{Bus, DedupeClaim, StreamEntry, Topics};
use switchboard_shared::config::Settings;
use switchboard_shared::protocol::{
    self, errors, iso, ChannelEvent, Command, CommandEnvelope, DeliveryStatus, MessageCreated,
    MessageReadEvent, MessageView, Outcome, OutcomeResult, ReactionAdded, ReactionRemoved,
    SendMessage, UserView,
};
use switchboard_shared::store::{reaction_view, NewMessage, Store};
use uuid::Uuid;

/// What became of one entry.
enum Verdict {
    /// Insert this message (or re-announce it, when a redelivery finds it stored).
    Persist,
    /// A `tempId` already delivered: answer with the original id.
    AlreadyDelivered(Uuid),
    /// Refused (in-flight duplicate).
    Failed(String),
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
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A backend failed; the batch stays unacknowledged and is retried.
    #[error("{0}")]
    Transient(String),
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
        let mut acks: HashMap<u32, Vec<String>> = HashMap::new();
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

        // 1. Dedupe claims.
        let claims: Vec<(String, String)> = items
            .iter()
            .map(|i| (i.dedupe_key.clone(), format!("p:{}", i.msg.id)))
            .collect();
        let processing_ttl = Duration::from_secs(self.settings.dedupe_processing_ttl);
        let results = self
            .bus
            .claim_dedupe(&claims, processing_ttl)
            .await
            .map_err(|e| transient(&e))?;
        let mut maybe_stored = Vec::new();
        for (item, claim) in items.iter_mut().zip(results) {
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
        }

        // 2. Persist. Redelivered entries may already be stored.
        let mut stored: HashMap<Uuid, switchboard_shared::store::entities::message::Model> =
            HashMap::new();
        if !maybe_stored.is_empty() {
            for m in self
                .store
                .existing_messages(&maybe_stored)
                .await
                .map_err(|e| transient(&e))?
            {
                stored.insert(m.id, m);
            }
        }
        let now = Utc::now();
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
            let max = self
                .store
                .max_seqs(&unknown)
                .await
                .map_err(|e| transient(&e))?;
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
        if let Err(e) = self.store.insert_messages(&new_rows).await {
            // Perhaps a stale sequence (another worker wrote): reload next time.
            seqs.clear();
            return Err(transient(&e));
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
                        .apply(&o.env.command)
                        .await
                        .map_err(|e| transient(&e))?;
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
        let mut publish: Vec<(String, Bytes)> =
            Vec::with_capacity(channel_events.len() + node_outcomes.len());
        for (channel, events) in &channel_events {
            let bytes = protocol::encode(events).map_err(|e| transient(&e))?;
            publish.push((self.topics.channel(channel), Bytes::from(bytes)));
        }
        for (node, outcomes) in &node_outcomes {
            let bytes = protocol::encode(outcomes).map_err(|e| transient(&e))?;
            publish.push((self.topics.node(node), Bytes::from(bytes)));
        }
        self.bus.publish(publish).await.map_err(|e| transient(&e))?;

        // 4. Settle dedupe keys.
        self.bus
            .settle_dedupe(
                &settle_set,
                Duration::from_secs(self.settings.dedupe_ttl),
                &settle_del,
            )
            .await
            .map_err(|e| transient(&e))?;

        // 5. Acknowledge.
        for w in &work {
            let (partition, id) = match w {
                Work::Send(i) => (items[*i].partition, &items[*i].entry_id),
                Work::Other(o) => (o.partition, &o.entry_id),
            };
            acks.entry(partition).or_default().push(id.clone());
        }
        for (partition, ids) in acks {
            self.bus
                .ack(partition, &ids)
                .await
                .map_err(|e| transient(&e))?;
        }
        metrics::counter!("worker_messages_persisted_total").increment(new_rows.len() as u64);
        Ok(work.len())
    }

    /// Applies a reaction or read command. A no-op (reaction already there,
    /// read position already past) succeeds without an event.
    async fn apply(
        &self,
        command: &Command,
    ) -> Result<(OutcomeResult, Option<ChannelEvent>), sea_orm::DbErr> {
        let event = match command {
            Command::SendMessage(_) => None,
            Command::AddReaction(r) => self
                .store
                .add_reaction(r.message_id, &r.user_id, &r.kind)
                .await?
                .map(|row| {
                    ChannelEvent::ReactionAdded(ReactionAdded {
                        message_id: r.message_id.to_string(),
                        reaction: reaction_view(&row),
                        processed: true,
                    })
                }),
            Command::RemoveReaction(r) => self
                .store
                .remove_reaction(r.message_id, &r.user_id, &r.kind)
                .await?
                .then(|| {
                    ChannelEvent::ReactionRemoved(ReactionRemoved {
                        message_id: r.message_id.to_string(),
                        user_id: r.user_id.clone(),
                        kind: r.kind.clone(),
                        processed: true,
                    })
                }),
            Command::ReadMessage(r) => self
                .store
                .mark_read(r.channel_id, &r.user_id, r.message_id)
                .await?
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
