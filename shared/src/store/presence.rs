//! The queries behind presence (CONTRACT §11): which of a user's channels
//! are small enough for `presence:changed`, and who a channel's members are
//! (a handshake reads its small channels' members with its channels, in
//! `session.rs`).
//!
//! A channel's size is counted only up to `max + 1` rows (a `LIMIT` inside
//! the count), so a user in a channel of a million members costs the same
//! as one in a channel of `max + 1`.

use sea_orm::{
    ColumnTrait, DatabaseBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter, QuerySelect,
    Statement,
};
use uuid::Uuid;

use super::entities::channel_member;
use super::Store;

/// `channel_id`s of the user's channels with at most `$2` members.
fn small_channels_sql(backend: DatabaseBackend) -> String {
    let (p1, p2) = match backend {
        DatabaseBackend::Postgres => ("$1", "$2"),
        _ => ("?", "?"),
    };
    format!(
        "SELECT m.channel_id FROM channel_members m \
         WHERE m.user_id = {p1} AND \
           (SELECT COUNT(*) FROM (SELECT 1 FROM channel_members c \
              WHERE c.channel_id = m.channel_id LIMIT {p2} + 1) AS x) <= {p2}"
    )
}

impl Store {
    /// The user's channels with at most `max` members: where their
    /// `presence:changed` goes.
    pub async fn small_channels_of(&self, user_id: &str, max: usize) -> Result<Vec<Uuid>, DbErr> {
        #[derive(FromQueryResult)]
        struct Row {
            channel_id: Uuid,
        }
        let backend = self.backend();
        let max = max as i64;
        let values: Vec<sea_orm::Value> = match backend {
            DatabaseBackend::Postgres => vec![user_id.into(), max.into()],
            _ => vec![user_id.into(), max.into(), max.into()],
        };
        let rows = Row::find_by_statement(Statement::from_sql_and_values(
            backend,
            small_channels_sql(backend),
            values,
        ))
        .all(&self.db)
        .await?;
        Ok(rows.into_iter().map(|r| r.channel_id).collect())
    }

    /// Every member of a channel (`GET /api/channels/{id}/presence`).
    pub async fn member_ids(&self, channel_id: Uuid) -> Result<Vec<String>, DbErr> {
        channel_member::Entity::find()
            .select_only()
            .column(channel_member::Column::UserId)
            .filter(channel_member::Column::ChannelId.eq(channel_id))
            .into_tuple()
            .all(&self.db)
            .await
    }
}
