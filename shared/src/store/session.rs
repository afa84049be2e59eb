//! What a handshake reads from the database, in one statement: the user's
//! channels with their positions (CONTRACT §2 `connection:success`), and the
//! members of the small ones (§11: the `online` lists, and where an arrival
//! is announced).
//!
//! It was two queries, and in a reconnect storm every round trip counts
//! twice: the database's work and the loopback write that carries it
//! (profiles of `loadtest/limits.sh storm` showed a gateway's writes to
//! PostgreSQL and Redis as a fifth of its CPU).

use sea_orm::{DatabaseBackend, DbErr, FromQueryResult, Statement};
use uuid::Uuid;

use super::Store;

/// See the module doc.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SessionChannels {
    /// The user's channels, oldest membership first (at most the `limit`
    /// asked for), each with its position: the seq of its latest message,
    /// 0 if none.
    pub channels: Vec<(Uuid, i64)>,
    /// Every member (the user included) of each of those channels with at
    /// most `presence_max` members, channel by channel.
    pub small_members: Vec<(Uuid, String)>,
}

impl SessionChannels {
    /// The channels of [`SessionChannels::small_members`], in order.
    pub fn small_channels(&self) -> Vec<Uuid> {
        let mut out: Vec<Uuid> = Vec::new();
        for (c, _) in &self.small_members {
            if out.last() != Some(c) {
                out.push(*c);
            }
        }
        out
    }
}

impl Store {
    /// See [`SessionChannels`]. `presence_max` 0 reads no members.
    ///
    /// A channel's size is counted only up to `presence_max + 1` rows, so a
    /// member of a huge channel costs what a member of a channel just over
    /// the limit does. On PostgreSQL the members are read through a
    /// `LATERAL` join, from the primary key, per small channel: with a plain
    /// join the planner preferred a hash join over a sequential scan of the
    /// whole membership table, once per handshake (1.5 ms at 10,000
    /// memberships, growing with them); `OFFSET 0` keeps it from
    /// flattening the subquery back into that join. SQLite has no `LATERAL`
    /// and answers the plain join from the index.
    pub async fn session_channels(
        &self,
        user_id: &str,
        limit: usize,
        presence_max: usize,
    ) -> Result<SessionChannels, DbErr> {
        #[derive(FromQueryResult)]
        struct Row {
            channel_id: Uuid,
            position: i64,
            member: Option<String>,
        }
        let backend = self.backend();
        // Numbered placeholders: `$n` on PostgreSQL, `?n` on SQLite.
        let p = if backend == DatabaseBackend::Postgres {
            "$"
        } else {
            "?"
        };
        let members = if backend == DatabaseBackend::Postgres {
            POSTGRES_MEMBERS
        } else {
            SQLITE_MEMBERS
        };
        let sql = format!("{} {members}", mine(p));
        let values: Vec<sea_orm::Value> = vec![
            user_id.into(),
            (limit as i64).into(),
            (presence_max as i64).into(),
        ];
        let rows = Row::find_by_statement(Statement::from_sql_and_values(backend, sql, values))
            .all(&self.db)
            .await?;
        let mut out = SessionChannels::default();
        for r in rows {
            if out.channels.last().map(|(c, _)| c) != Some(&r.channel_id) {
                out.channels.push((r.channel_id, r.position));
            }
            if let Some(member) = r.member {
                out.small_members.push((r.channel_id, member));
            }
        }
        Ok(out)
    }
}

/// The user's channels (`{p}1`, at most `{p}2`), their positions, and
/// whether each has at most `{p}3` members (`p`: the placeholder prefix).
/// Its position comes from the `(channel_id, seq)` unique index.
fn mine(p: &str) -> String {
    format!(
        "SELECT mine.channel_id, mine.position, cm.user_id AS member FROM ( \
           SELECT m.channel_id, m.joined_at, \
             COALESCE((SELECT MAX(x.seq) FROM messages x WHERE x.channel_id = m.channel_id), 0) \
               AS position, \
             ({p}3 > 0 AND (SELECT COUNT(*) FROM (SELECT 1 FROM channel_members c \
               WHERE c.channel_id = m.channel_id LIMIT {p}3 + 1) AS n) <= {p}3) AS small \
           FROM channel_members m WHERE m.user_id = {p}1 \
           ORDER BY m.joined_at, m.channel_id LIMIT {p}2 \
         ) AS mine"
    )
}

const POSTGRES_MEMBERS: &str = "LEFT JOIN LATERAL (SELECT c.user_id FROM channel_members c \
       WHERE mine.small AND c.channel_id = mine.channel_id OFFSET 0) AS cm ON TRUE \
     ORDER BY mine.joined_at, mine.channel_id, cm.user_id";

const SQLITE_MEMBERS: &str = "LEFT JOIN channel_members cm \
       ON mine.small AND cm.channel_id = mine.channel_id \
     ORDER BY mine.joined_at, mine.channel_id, cm.user_id";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{each_backend, Backend};
    use crate::store::NewMessage;

    async fn reads_channels_positions_and_small_members(store: Store) {
        // "big" has 3 members, "small" 2, "quiet" only u; limit of presence: 2.
        let big = store.create_channel("big", false, "u").await.expect("big");
        let small = store
            .create_channel("small", false, "u")
            .await
            .expect("small");
        let quiet = store
            .create_channel("quiet", false, "u")
            .await
            .expect("quiet");
        let id = |c: &crate::store::ChannelView| Uuid::parse_str(&c.id).expect("uuid");
        let (big, small, quiet) = (id(&big), id(&small), id(&quiet));
        for m in ["a", "b"] {
            store.add_member(big, m, Some("u")).await.expect("member");
        }
        store
            .add_member(small, "a", Some("u"))
            .await
            .expect("member");
        let rows: Vec<NewMessage> = (1..=3)
            .map(|seq| NewMessage {
                id: Uuid::now_v7(),
                channel_id: small,
                user_id: "u".into(),
                content: format!("m{seq}"),
                reply_to_id: None,
                temp_id: None,
                seq,
                created_at: chrono::Utc::now(),
            })
            .collect();
        store.insert_messages(&rows).await.expect("messages");

        let got = store.session_channels("u", 100, 2).await.expect("read");
        assert_eq!(got.channels, vec![(big, 0), (small, 3), (quiet, 0)]);
        assert_eq!(
            got.small_members,
            vec![
                (small, "a".to_string()),
                (small, "u".to_string()),
                (quiet, "u".to_string())
            ]
        );
        assert_eq!(got.small_channels(), vec![small, quiet]);

        let first_two = store.session_channels("u", 2, 2).await.expect("read");
        assert_eq!(first_two.channels, vec![(big, 0), (small, 3)]);
        assert_eq!(first_two.small_channels(), vec![small]);

        let no_presence = store.session_channels("u", 100, 0).await.expect("read");
        assert_eq!(no_presence.channels.len(), 3);
        assert!(no_presence.small_members.is_empty());

        let stranger = store
            .session_channels("nobody", 100, 2)
            .await
            .expect("read");
        assert_eq!(stranger, SessionChannels::default());
    }

    #[tokio::test]
    async fn one_statement_reads_what_a_handshake_needs() {
        each_backend(|store, _: Backend| reads_channels_positions_and_small_members(store)).await;
    }
}
