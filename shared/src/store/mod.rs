//! Storage: sea-orm over PostgreSQL (cluster) or SQLite (embedded). The
//! sea-orm connection is the storage seam; every query of the product lives
//! in this module so that both backends run the same code.

pub mod entities;
mod held;
pub mod migration;
mod presence;
mod session;

pub use held::InsertConnection;
pub use session::SessionChannels;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseBackend,
    DatabaseConnection, DbErr, EntityTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect,
    Statement, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use uuid::Uuid;

use crate::protocol::{iso, DeliveryStatus, MessageView, ReactionView, UserView};
use entities::{channel, channel_member, message, reaction, user};

/// Rows per multi-row INSERT (far below both backends' parameter limits).
const INSERT_CHUNK: usize = 1000;

/// Key of the PostgreSQL advisory lock that serialises concurrent migrations.
const MIGRATION_LOCK: i64 = 0x5357_4254_4348; // "SWBTCH"

/// A channel as the REST API shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelView {
    pub id: String,
    pub name: String,
    pub is_private: bool,
    pub owner_id: String,
    pub created_at: String,
    pub is_member: bool,
    /// Messages after the caller's read position (0 for non-members).
    pub unread_count: i64,
}

/// A page of the channel list: the channels, and the cursor (`after`) of
/// the next page when there is one.
#[derive(Debug, Clone)]
pub struct ChannelPage {
    pub channels: Vec<ChannelView>,
    pub next: Option<String>,
}

/// A message with its reactions, as the history API shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryMessage {
    #[serde(flatten)]
    pub message: MessageView,
    pub reactions: Vec<ReactionView>,
    /// The sender's `tempId` (not part of the history shape; a replayed
    /// `message:created` carries it).
    #[serde(skip)]
    pub temp_id: Option<String>,
}

/// A message ready to be inserted by a worker.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: Uuid,
    pub channel_id: Uuid,
    pub user_id: String,
    pub content: String,
    pub reply_to_id: Option<Uuid>,
    pub temp_id: Option<String>,
    pub seq: i64,
    pub created_at: DateTime<Utc>,
}

/// Result of adding a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddMember {
    Added,
    AlreadyMember,
}

/// Result of removing a member (CONTRACT §3, §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMember {
    Removed,
    NotMember,
    /// The owner, while the channel has other members: nothing removed.
    OwnerWithMembers,
}

/// A pooled connection idle this long is pinged before it is handed out
/// (one more round trip); a busier one is used as it is. SQLx's default
/// pings on *every* checkout, and pings again on every return: three round
/// trips per query for the worker's insert and each handshake read. A
/// connection the server dropped while it was in use recently fails its
/// next query instead, which the callers treat as any database error (the
/// worker retries, a handshake answers "Service temporarily unavailable").
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
}

impl Store {
    /// Connects to `url` (`postgres://…` or `sqlite://…`).
    pub async fn connect(url: &str, pool: u32) -> Result<Self, DbErr> {
        Self::connect_with(Self::options(url, pool)).await
    }

    async fn connect_with(opts: ConnectOptions) -> Result<Self, DbErr> {
        Ok(Self {
            db: Database::connect(opts).await?,
        })
    }

    fn options(url: &str, pool: u32) -> ConnectOptions {
        let mut opts = ConnectOptions::new(url.to_string());
        opts.max_connections(pool)
            .min_connections(1)
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR)
            .sqlx_logging(false);
        opts
    }

    /// Opens (creating it if needed) the SQLite file of the embedded mode.
    pub async fn open_embedded(data_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("switchboard.sqlite3");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut opts = Self::options(&url, 1);
        // Set on every connection the pool opens, not once: `synchronous`
        // belongs to a connection, and the pool replaces its connection
        // (after `max_lifetime`, 30 minutes, or an error). A pragma run once
        // left the replacement with SQLite's `FULL`, a `fsync` per commit.
        // WAL lets history reads run beside the worker's writes; `NORMAL`
        // in WAL mode syncs at checkpoints, so a power cut may lose the last
        // commits but never corrupts the file (a process crash loses
        // nothing).
        opts.map_sqlx_sqlite_opts(|o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
        });
        Ok(Self::connect_with(opts).await?)
    }

    pub fn backend(&self) -> DatabaseBackend {
        self.db.get_database_backend()
    }

    /// Applies pending migrations. On PostgreSQL the run holds an advisory
    /// lock, so several nodes starting at once migrate one after the other
    /// (the later ones find nothing to do).
    pub async fn migrate(&self) -> Result<(), DbErr> {
        match self.backend() {
            DatabaseBackend::Postgres => {
                // One connection, so the session lock and the migration share it.
                let txn = self.db.begin().await?;
                txn.execute_raw(Statement::from_string(
                    DatabaseBackend::Postgres,
                    format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"),
                ))
                .await?;
                migration::Migrator::up(&txn, None).await?;
                txn.commit().await
            }
            _ => migration::Migrator::up(&self.db, None).await,
        }
    }

    pub async fn ping(&self) -> Result<(), DbErr> {
        self.db.ping().await
    }

    // ---- users -------------------------------------------------------------

    /// Creates or refreshes a user from their token's profile claims.
    ///
    /// The display claims (name, image) are free text from the identity
    /// provider; a NUL character in them would make PostgreSQL refuse the
    /// row and with it every handshake and REST call of that user, so it is
    /// stripped here, where every caller passes. (The id is not rewritten:
    /// it must match the token's `sub` exactly.)
    pub async fn upsert_user(
        &self,
        id: &str,
        name: &str,
        image_url: Option<&str>,
    ) -> Result<(), DbErr> {
        let now = Utc::now();
        // Only a changed name or picture is written: an unchanged user (every
        // returning user after a gateway restart, a reconnect storm) costs an
        // index lookup instead of a row version, WAL and a flushed commit.
        let distinct = match self.backend() {
            DatabaseBackend::Postgres => "IS DISTINCT FROM",
            _ => "IS NOT",
        };
        let changed = sea_orm::sea_query::Expr::cust(format!(
            "users.name {distinct} excluded.name OR users.image_url {distinct} excluded.image_url"
        ));
        user::Entity::insert(user::ActiveModel {
            id: Set(id.to_string()),
            name: Set(strip_nul(name)),
            image_url: Set(image_url.map(strip_nul)),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict(
            OnConflict::column(user::Column::Id)
                .update_columns([
                    user::Column::Name,
                    user::Column::ImageUrl,
                    user::Column::UpdatedAt,
                ])
                .action_and_where(changed)
                .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await?;
        Ok(())
    }

    /// Creates a user known only by id (an invitation of someone never seen).
    async fn ensure_user<C: ConnectionTrait>(db: &C, id: &str) -> Result<(), DbErr> {
        let now = Utc::now();
        user::Entity::insert(user::ActiveModel {
            id: Set(id.to_string()),
            name: Set(id.to_string()),
            image_url: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict(OnConflict::column(user::Column::Id).do_nothing().to_owned())
        .exec_without_returning(db)
        .await?;
        Ok(())
    }

    // ---- channels and membership ---------------------------------------------

    pub async fn channel(&self, id: Uuid) -> Result<Option<channel::Model>, DbErr> {
        channel::Entity::find_by_id(id).one(&self.db).await
    }

    pub async fn is_member(&self, channel_id: Uuid, user_id: &str) -> Result<bool, DbErr> {
        Ok(
            channel_member::Entity::find_by_id((channel_id, user_id.to_string()))
                .one(&self.db)
                .await?
                .is_some(),
        )
    }

    /// Creates a channel owned by `owner`, who becomes its first member.
    pub async fn create_channel(
        &self,
        name: &str,
        is_private: bool,
        owner: &str,
    ) -> Result<ChannelView, DbErr> {
        let now = Utc::now();
        let id = Uuid::now_v7();
        let txn = self.db.begin().await?;
        Self::ensure_user(&txn, owner).await?;
        channel::Entity::insert(channel::ActiveModel {
            id: Set(id),
            name: Set(name.to_string()),
            is_private: Set(is_private),
            owner_id: Set(owner.to_string()),
            created_at: Set(now),
        })
        .exec_without_returning(&txn)
        .await?;
        channel_member::Entity::insert(member_row(id, owner, "owner", None, now))
            .exec_without_returning(&txn)
            .await?;
        txn.commit().await?;
        Ok(ChannelView {
            id: id.to_string(),
            name: name.to_string(),
            is_private,
            owner_id: owner.to_string(),
            created_at: iso(now),
            is_member: true,
            unread_count: 0,
        })
    }

    /// Adds a member (creating the user if never seen).
    pub async fn add_member(
        &self,
        channel_id: Uuid,
        user_id: &str,
        invited_by: Option<&str>,
    ) -> Result<AddMember, DbErr> {
        let txn = self.db.begin().await?;
        Self::ensure_user(&txn, user_id).await?;
        let res = channel_member::Entity::insert(member_row(
            channel_id,
            user_id,
            "member",
            invited_by,
            Utc::now(),
        ))
        .on_conflict(
            OnConflict::columns([
                channel_member::Column::ChannelId,
                channel_member::Column::UserId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await?;
        Ok(if res == 0 {
            AddMember::AlreadyMember
        } else {
            AddMember::Added
        })
    }

    /// Removes `user_id` from the channel, unless they are its owner and
    /// others remain (the channel would be left without anyone able to
    /// manage it). Checked and deleted in one transaction.
    pub async fn remove_member(
        &self,
        channel_id: Uuid,
        owner_id: &str,
        user_id: &str,
    ) -> Result<RemoveMember, DbErr> {
        let txn = self.db.begin().await?;
        let member = channel_member::Entity::find_by_id((channel_id, user_id.to_string()))
            .one(&txn)
            .await?;
        if member.is_none() {
            txn.commit().await?;
            return Ok(RemoveMember::NotMember);
        }
        if user_id == owner_id {
            let others = channel_member::Entity::find()
                .filter(channel_member::Column::ChannelId.eq(channel_id))
                .filter(channel_member::Column::UserId.ne(user_id))
                .limit(1)
                .all(&txn)
                .await?;
            if !others.is_empty() {
                txn.commit().await?;
                return Ok(RemoveMember::OwnerWithMembers);
            }
        }
        channel_member::Entity::delete_by_id((channel_id, user_id.to_string()))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(RemoveMember::Removed)
    }

    /// One page of the caller's channels and the public ones, with unread
    /// counts, in id order (UUID v7: creation order) after the channel
    /// `after` (exclusive), at most `limit`. `next` is the cursor of the
    /// following page, `None` on the last one.
    ///
    /// Each side (public channels, the caller's memberships) is walked from
    /// the cursor through its own index and cut at `limit`, so a page costs
    /// O(limit) rows however many channels exist; the unread count of each
    /// is answered from `idx_messages_unread` alone (see the migration).
    pub async fn list_channels(
        &self,
        user_id: &str,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<ChannelPage, DbErr> {
        #[derive(FromQueryResult)]
        struct Row {
            id: Uuid,
            name: String,
            is_private: bool,
            owner_id: String,
            created_at: DateTime<Utc>,
            is_member: bool,
            unread_count: i64,
        }
        let backend = self.backend();
        let mut values: Vec<sea_orm::Value> = Vec::new();
        let mut param = |v: sea_orm::Value| {
            values.push(v);
            match backend {
                DatabaseBackend::Postgres => format!("${}", values.len()),
                _ => "?".to_string(),
            }
        };
        // One row more than the page tells whether there is a next page.
        let fetch = limit.saturating_add(1) as i64;
        let after = after.unwrap_or(Uuid::nil());
        let (pub_private, pub_after, pub_limit) = (
            param(false.into()),
            param(after.into()),
            param(fetch.into()),
        );
        let (mine_user, mine_after, mine_limit) = (
            param(user_id.into()),
            param(after.into()),
            param(fetch.into()),
        );
        let (member_user, page_limit) = (param(user_id.into()), param(fetch.into()));
        let sql = format!(
            "SELECT c.id, c.name, c.is_private, c.owner_id, c.created_at, \
               (m.user_id IS NOT NULL) AS is_member, \
               CASE WHEN m.user_id IS NULL THEN 0 ELSE \
                 (SELECT COUNT(*) FROM messages x WHERE x.channel_id = c.id AND x.seq > m.last_read_seq AND x.user_id <> m.user_id) \
               END AS unread_count \
             FROM ( \
               SELECT id FROM (SELECT p.id FROM channels p \
                 WHERE p.is_private = {pub_private} AND p.id > {pub_after} \
                 ORDER BY p.id LIMIT {pub_limit}) public_page \
               UNION \
               SELECT id FROM (SELECT cm.channel_id AS id FROM channel_members cm \
                 WHERE cm.user_id = {mine_user} AND cm.channel_id > {mine_after} \
                 ORDER BY cm.channel_id LIMIT {mine_limit}) member_page \
             ) k \
             JOIN channels c ON c.id = k.id \
             LEFT JOIN channel_members m ON m.channel_id = c.id AND m.user_id = {member_user} \
             ORDER BY c.id \
             LIMIT {page_limit}"
        );
        let mut rows = Row::find_by_statement(Statement::from_sql_and_values(backend, sql, values))
            .all(&self.db)
            .await?;
        let next = if rows.len() as u64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|r| r.id.to_string())
        } else {
            None
        };
        Ok(ChannelPage {
            channels: rows
                .into_iter()
                .map(|r| ChannelView {
                    id: r.id.to_string(),
                    name: r.name,
                    is_private: r.is_private,
                    owner_id: r.owner_id,
                    created_at: iso(r.created_at),
                    is_member: r.is_member,
                    unread_count: r.unread_count,
                })
                .collect(),
            next,
        })
    }

    // ---- messages ------------------------------------------------------------

    /// The seq of message `id` if it belongs to `channel_id`: a history
    /// anchor from another channel must not reveal that it exists, nor its
    /// position.
    pub async fn message_seq(&self, channel_id: Uuid, id: Uuid) -> Result<Option<i64>, DbErr> {
        message::Entity::find_by_id(id)
            .filter(message::Column::ChannelId.eq(channel_id))
            .select_only()
            .column(message::Column::Seq)
            .into_tuple::<i64>()
            .one(&self.db)
            .await
    }

    /// Newest first, before `before` (a message id of the same channel;
    /// another channel's id yields nothing: callers check it with
    /// [`Store::message_seq`] first to answer a clear error).
    pub async fn history(
        &self,
        channel_id: Uuid,
        before: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<HistoryMessage>, DbErr> {
        let mut q = message::Entity::find().filter(message::Column::ChannelId.eq(channel_id));
        if let Some(before) = before {
            let Some(seq) = self.message_seq(channel_id, before).await? else {
                return Ok(Vec::new());
            };
            q = q.filter(message::Column::Seq.lt(seq));
        }
        let rows = q
            .order_by_desc(message::Column::Seq)
            .limit(limit)
            .all(&self.db)
            .await?;
        self.hydrate(rows).await
    }

    /// Messages of a channel with `seq > after_seq`, oldest first, at most
    /// `limit` (catch-up and gap repair, CONTRACT §9).
    pub async fn messages_after(
        &self,
        channel_id: Uuid,
        after_seq: i64,
        limit: u64,
    ) -> Result<Vec<HistoryMessage>, DbErr> {
        let rows = message::Entity::find()
            .filter(message::Column::ChannelId.eq(channel_id))
            .filter(message::Column::Seq.gt(after_seq))
            .order_by_asc(message::Column::Seq)
            .limit(limit)
            .all(&self.db)
            .await?;
        self.hydrate(rows).await
    }

    /// Adds authors and reactions to message rows, keeping their order.
    async fn hydrate(&self, rows: Vec<message::Model>) -> Result<Vec<HistoryMessage>, DbErr> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = rows.iter().map(|m| m.id).collect();
        let mut authors: Vec<String> = rows.iter().map(|m| m.user_id.clone()).collect();
        authors.sort();
        authors.dedup();
        let users: HashMap<String, user::Model> = user::Entity::find()
            .filter(user::Column::Id.is_in(authors))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|u| (u.id.clone(), u))
            .collect();
        let mut reactions: HashMap<Uuid, Vec<ReactionView>> = HashMap::new();
        for r in reaction::Entity::find()
            .filter(reaction::Column::MessageId.is_in(ids))
            .order_by_asc(reaction::Column::CreatedAt)
            .all(&self.db)
            .await?
        {
            reactions
                .entry(r.message_id)
                .or_default()
                .push(reaction_view(&r));
        }
        Ok(rows
            .into_iter()
            .map(|m| HistoryMessage {
                reactions: reactions.remove(&m.id).unwrap_or_default(),
                message: message_view(&m, users.get(&m.user_id)),
                temp_id: m.temp_id,
            })
            .collect())
    }

    /// Highest sequence number per channel (0 for a channel without messages).
    pub async fn max_seqs(&self, channels: &[Uuid]) -> Result<HashMap<Uuid, i64>, DbErr> {
        let rows: Vec<(Uuid, Option<i64>)> = message::Entity::find()
            .select_only()
            .column(message::Column::ChannelId)
            .column_as(message::Column::Seq.max(), "max_seq")
            .filter(message::Column::ChannelId.is_in(channels.to_vec()))
            .group_by(message::Column::ChannelId)
            .into_tuple()
            .all(&self.db)
            .await?;
        let mut out: HashMap<Uuid, i64> = channels.iter().map(|c| (*c, 0)).collect();
        for (c, s) in rows {
            out.insert(c, s.unwrap_or(0));
        }
        Ok(out)
    }

    /// Messages among `ids` that are already stored (a redelivered entry
    /// whose first processing died after the insert).
    pub async fn existing_messages(&self, ids: &[Uuid]) -> Result<Vec<message::Model>, DbErr> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        message::Entity::find()
            .filter(message::Column::Id.is_in(ids.to_vec()))
            .all(&self.db)
            .await
    }

    /// Inserts a batch in one transaction (multi-row inserts). Either all rows
    /// are stored or none.
    pub async fn insert_messages(&self, rows: &[NewMessage]) -> Result<(), DbErr> {
        if rows.is_empty() {
            return Ok(());
        }
        // Stay far below both backends' bound-parameter limits. One
        // statement is atomic on its own: a batch that fits one chunk (every
        // batch up to WORKER_BATCH_SIZE 1000) needs no BEGIN/COMMIT, two
        // round trips fewer per batch.
        if rows.len() <= INSERT_CHUNK {
            insert_of(rows).exec_without_returning(&self.db).await?;
            return Ok(());
        }
        let txn = self.db.begin().await?;
        for chunk in rows.chunks(INSERT_CHUNK) {
            insert_of(chunk).exec_without_returning(&txn).await?;
        }
        txn.commit().await
    }

    /// [`Self::insert_messages`] on a worker's kept connection, which saves
    /// PostgreSQL the pool's ping after every statement (see `held`). The
    /// same statement; SQLite (whose one connection the embedded gateway
    /// shares), a pool of one connection and batches of several chunks take
    /// the pool's way.
    pub async fn insert_messages_kept(
        &self,
        kept: &InsertConnection,
        rows: &[NewMessage],
    ) -> Result<(), DbErr> {
        use sea_orm::sqlx;
        if self.backend() != DatabaseBackend::Postgres
            || rows.is_empty()
            || rows.len() > INSERT_CHUNK
        {
            return self.insert_messages(rows).await;
        }
        let pool = self.db.get_postgres_connection_pool();
        // The kept connection leaves the pool one short: with a pool of one,
        // the worker's other queries would wait for it in vain.
        if pool.options().get_max_connections() < 2 {
            return self.insert_messages(rows).await;
        }
        let exec_err = |e: sqlx::Error| DbErr::Exec(sea_orm::RuntimeErr::SqlxError(e.into()));
        let mut conn = match kept.take(PING_IF_IDLE_FOR) {
            Some(conn) => conn,
            None => pool.acquire().await.map_err(exec_err)?,
        };
        let stmt = sea_orm::QueryTrait::build(&insert_of(rows), DatabaseBackend::Postgres);
        let values = stmt
            .values
            .unwrap_or(sea_orm::sea_query::Values(Vec::new()));
        // On an error `conn` is dropped here: back to the pool, which checks it.
        sqlx::query_with(
            sqlx::AssertSqlSafe(stmt.sql.as_str()),
            sea_query_sqlx::SqlxValues(values),
        )
        .execute(&mut *conn)
        .await
        .map_err(exec_err)?;
        kept.put(conn);
        Ok(())
    }

    /// The channel of a message, if the message exists.
    pub async fn message_channel(&self, message_id: Uuid) -> Result<Option<Uuid>, DbErr> {
        message::Entity::find_by_id(message_id)
            .select_only()
            .column(message::Column::ChannelId)
            .into_tuple::<Uuid>()
            .one(&self.db)
            .await
    }

    /// The channel of each of `ids` that exists, in one query (a worker
    /// checks every `replyToId` of a batch with it).
    pub async fn message_channels(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Uuid>, DbErr> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(Uuid, Uuid)> = message::Entity::find()
            .select_only()
            .column(message::Column::Id)
            .column(message::Column::ChannelId)
            .filter(message::Column::Id.is_in(ids.to_vec()))
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// The stored reaction of `user_id` of this type on the message, if any
    /// (a redelivered `reaction:add` re-announces the row it stored).
    pub async fn reaction(
        &self,
        message_id: Uuid,
        user_id: &str,
        kind: &str,
    ) -> Result<Option<reaction::Model>, DbErr> {
        reaction::Entity::find()
            .filter(reaction::Column::MessageId.eq(message_id))
            .filter(reaction::Column::UserId.eq(user_id))
            .filter(reaction::Column::Kind.eq(kind))
            .one(&self.db)
            .await
    }

    /// Adds a reaction; `None` when the same user already reacted so (a no-op).
    pub async fn add_reaction(
        &self,
        message_id: Uuid,
        user_id: &str,
        kind: &str,
    ) -> Result<Option<reaction::Model>, DbErr> {
        let row = reaction::Model {
            id: Uuid::now_v7(),
            message_id,
            user_id: user_id.to_string(),
            kind: kind.to_string(),
            created_at: Utc::now(),
        };
        let n = reaction::Entity::insert(reaction::ActiveModel {
            id: Set(row.id),
            message_id: Set(row.message_id),
            user_id: Set(row.user_id.clone()),
            kind: Set(row.kind.clone()),
            created_at: Set(row.created_at),
        })
        .on_conflict(
            OnConflict::columns([
                reaction::Column::MessageId,
                reaction::Column::UserId,
                reaction::Column::Kind,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await?;
        Ok((n > 0).then_some(row))
    }

    /// Removes a reaction; `false` when there was none (a no-op).
    pub async fn remove_reaction(
        &self,
        message_id: Uuid,
        user_id: &str,
        kind: &str,
    ) -> Result<bool, DbErr> {
        let res = reaction::Entity::delete_many()
            .filter(reaction::Column::MessageId.eq(message_id))
            .filter(reaction::Column::UserId.eq(user_id))
            .filter(reaction::Column::Kind.eq(kind))
            .exec(&self.db)
            .await?;
        Ok(res.rows_affected > 0)
    }

    /// Moves the user's read position in the message's channel forward to
    /// the message; `false` when it already was at or past it.
    pub async fn mark_read(
        &self,
        channel_id: Uuid,
        user_id: &str,
        message_id: Uuid,
    ) -> Result<bool, DbErr> {
        let Some(m) = message::Entity::find_by_id(message_id)
            .one(&self.db)
            .await?
        else {
            return Ok(false);
        };
        let res = channel_member::Entity::update_many()
            .col_expr(channel_member::Column::LastReadSeq, m.seq.into())
            .col_expr(
                channel_member::Column::LastReadMessageId,
                Some(message_id).into(),
            )
            .col_expr(channel_member::Column::LastReadAt, Some(Utc::now()).into())
            .filter(channel_member::Column::ChannelId.eq(channel_id))
            .filter(channel_member::Column::UserId.eq(user_id))
            .filter(channel_member::Column::LastReadSeq.lt(m.seq))
            .exec(&self.db)
            .await?;
        Ok(res.rows_affected > 0)
    }
}

/// `s` without NUL characters, which PostgreSQL cannot store in text.
fn strip_nul(s: &str) -> String {
    s.replace('\0', "")
}

/// The multi-row INSERT of `rows` (both ways of [`Store::insert_messages`]).
fn insert_of(rows: &[NewMessage]) -> sea_orm::InsertMany<message::ActiveModel> {
    message::Entity::insert_many(rows.iter().map(|m| message::ActiveModel {
        id: Set(m.id),
        channel_id: Set(m.channel_id),
        user_id: Set(m.user_id.clone()),
        content: Set(m.content.clone()),
        reply_to_id: Set(m.reply_to_id),
        delivery_status: Set(DeliveryStatus::Delivered.as_str().to_string()),
        temp_id: Set(m.temp_id.clone()),
        seq: Set(m.seq),
        created_at: Set(m.created_at),
        updated_at: Set(m.created_at),
    }))
}

/// Whether a database error is about the data of the statement rather than
/// about reaching the database: retrying the same statement can never
/// succeed, so a worker isolates the entry that causes it at once instead of
/// retrying its whole batch with backoff (a poison message must not stall
/// every partition of its worker). Everything else (connection refused or
/// lost, pool timeout, serialization failures, lock timeouts) is transient.
pub fn is_permanent(e: &DbErr) -> bool {
    use sea_orm::sqlx;
    use sea_orm::RuntimeErr;
    let (DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e))) = e else {
        return false;
    };
    let sqlx::Error::Database(db) = e.as_ref() else {
        return false;
    };
    let Some(code) = db.code() else {
        return false;
    };
    if db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        sqlstate_is_permanent(&code)
    } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        sqlite_code_is_permanent(&code)
    } else {
        false
    }
}

/// PostgreSQL SQLSTATE classes 22 (data exception: invalid byte sequence
/// such as a NUL, value too long, out of range…) and 23 (integrity
/// constraint violation), except `23505` unique violation: the unique
/// `(channel_id, seq)` index is the fence against a worker with stale
/// sequence numbers, and a primary-key clash means another worker stored the
/// same entry concurrently. Both resolve on retry (the worker reloads its
/// sequence numbers and finds stored rows), so they are transient.
pub fn sqlstate_is_permanent(code: &str) -> bool {
    match code.get(..2) {
        Some("22") => true,
        Some("23") => code != "23505",
        _ => false,
    }
}

/// SQLite extended result codes: the `SQLITE_CONSTRAINT` family (19) except
/// primary key / unique / rowid (the same races as above), and `TOOBIG`
/// (18), `MISMATCH` (20), `RANGE` (25).
pub fn sqlite_code_is_permanent(code: &str) -> bool {
    let Ok(n) = code.parse::<i32>() else {
        return false;
    };
    match n & 0xff {
        19 => !matches!(n, 1555 | 2067 | 2579),
        18 | 20 | 25 => true,
        _ => false,
    }
}

fn member_row(
    channel_id: Uuid,
    user_id: &str,
    role: &str,
    invited_by: Option<&str>,
    now: DateTime<Utc>,
) -> channel_member::ActiveModel {
    channel_member::ActiveModel {
        channel_id: Set(channel_id),
        user_id: Set(user_id.to_string()),
        role: Set(role.to_string()),
        invited_by: Set(invited_by.map(String::from)),
        joined_at: Set(now),
        last_read_seq: Set(0),
        last_read_message_id: Set(None),
        last_read_at: Set(None),
    }
}

pub fn reaction_view(r: &reaction::Model) -> ReactionView {
    ReactionView {
        id: r.id.to_string(),
        kind: r.kind.clone(),
        user_id: r.user_id.clone(),
        message_id: r.message_id.to_string(),
        created_at: iso(r.created_at),
    }
}

pub fn message_view(m: &message::Model, author: Option<&user::Model>) -> MessageView {
    MessageView {
        id: m.id.to_string(),
        content: m.content.clone(),
        channel_id: m.channel_id.to_string(),
        user_id: m.user_id.clone(),
        reply_to_id: m.reply_to_id.map(|r| r.to_string()),
        delivery_status: DeliveryStatus::Delivered,
        seq: m.seq,
        created_at: iso(m.created_at),
        updated_at: iso(m.updated_at),
        user: UserView {
            id: m.user_id.clone(),
            name: author
                .map(|a| a.name.clone())
                .unwrap_or_else(|| m.user_id.clone()),
            image_url: author.and_then(|a| a.image_url.clone()),
        },
    }
}

#[cfg(test)]
mod classifier_tests {
    use super::*;

    #[test]
    fn data_exceptions_and_constraint_violations_are_permanent_except_unique() {
        for code in [
            "22021", "22001", "22003", "22P02", "23502", "23503", "23514",
        ] {
            assert!(sqlstate_is_permanent(code), "{code}");
        }
        // unique violation (the seq fence), connection, shutdown,
        // serialization, too many connections, lock timeout: transient.
        for code in ["23505", "08006", "57P01", "40001", "53300", "55P03", ""] {
            assert!(!sqlstate_is_permanent(code), "{code}");
        }
    }

    #[test]
    fn sqlite_constraint_family_is_permanent_except_unique() {
        for code in ["787", "1299", "275", "19", "18", "20", "25"] {
            assert!(sqlite_code_is_permanent(code), "{code}");
        }
        for code in ["2067", "1555", "2579", "5", "6", "10", "13", "x"] {
            assert!(!sqlite_code_is_permanent(code), "{code}");
        }
    }

    #[tokio::test]
    async fn sqlite_errors_are_classified_from_the_driver() {
        let store = Store::connect("sqlite::memory:", 1).await.expect("sqlite");
        store.migrate().await.expect("migrate");
        store
            .db
            .execute_unprepared("PRAGMA foreign_keys=ON")
            .await
            .expect("pragma");
        // A reaction on a message that does not exist: foreign key (787).
        let fk = store
            .db
            .execute_unprepared(
                "INSERT INTO reactions (id, message_id, user_id, type, created_at) \
                 VALUES ('a', 'nope', 'u', 't', '2024-01-01T00:00:00Z')",
            )
            .await
            .expect_err("foreign key");
        assert!(is_permanent(&fk), "{fk:?}");
        store
            .db
            .execute_unprepared(
                "INSERT INTO users (id, name, created_at, updated_at) \
                 VALUES ('u', 'U', '2024-01-01T00:00:00Z', '2024-01-01T00:00:00Z')",
            )
            .await
            .expect("user");
        let dup = store
            .db
            .execute_unprepared(
                "INSERT INTO users (id, name, created_at, updated_at) \
                 VALUES ('u', 'U', '2024-01-01T00:00:00Z', '2024-01-01T00:00:00Z')",
            )
            .await
            .expect_err("primary key");
        assert!(!is_permanent(&dup), "a unique violation is a race: {dup:?}");
    }

    #[tokio::test]
    async fn postgres_refuses_nul_permanently_and_an_outage_is_transient() {
        let url = std::env::var("TEST_PG_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let store = Store::connect(&url, 1).await.expect("postgres");
        let nul = store
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT $1::text AS t",
                ["a\0b".into()],
            ))
            .await
            .expect_err("PostgreSQL refuses NUL in text");
        assert!(is_permanent(&nul), "{nul:?}");
        let ok = store
            .db
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT 1 AS one",
            ))
            .await;
        assert!(ok.is_ok());
        let refused = Store::connect("postgres://postgres@127.0.0.1:1/none", 1)
            .await
            .err()
            .expect("nothing listens on port 1");
        assert!(!is_permanent(&refused), "{refused:?}");
    }

    #[test]
    fn nul_is_stripped_from_display_claims() {
        assert_eq!(strip_nul("a\0b\0"), "ab");
    }
}

#[cfg(test)]
mod embedded_tests {
    use super::*;

    /// The embedded store's settings are the connection's, so they must
    /// hold on the connection that replaces the first one (the pool
    /// replaces it after `max_lifetime` or an error).
    #[tokio::test]
    async fn embedded_settings_hold_on_a_replaced_connection() {
        let dir = std::env::temp_dir().join(format!("sb-embedded-{}", Uuid::now_v7().simple()));
        let store = Store::open_embedded(&dir).await.expect("open");
        let pragma = |name: &'static str| {
            let db = store.db.clone();
            async move {
                let row = db
                    .query_one_raw(Statement::from_string(
                        DatabaseBackend::Sqlite,
                        format!("PRAGMA {name}"),
                    ))
                    .await
                    .expect("pragma")
                    .expect("a row");
                row.try_get_by_index::<String>(0)
                    .or_else(|_| row.try_get_by_index::<i64>(0).map(|v| v.to_string()))
                    .expect("a value")
            }
        };
        let settings = || async {
            (
                pragma("journal_mode").await,
                pragma("synchronous").await,
                pragma("foreign_keys").await,
            )
        };
        let wanted = ("wal".to_string(), "1".to_string(), "1".to_string());
        assert_eq!(settings().await, wanted, "first connection");
        // Close the pool's only connection: the next query opens another.
        let pool = store.db.get_sqlite_connection_pool();
        pool.acquire()
            .await
            .expect("acquire")
            .close()
            .await
            .expect("close");
        assert_eq!(settings().await, wanted, "replacement connection");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod upsert_tests {
    use super::*;

    /// (name, image_url, updated_at) of user `u`.
    async fn row(store: &Store) -> (String, Option<String>, chrono::DateTime<Utc>) {
        let u = user::Entity::find_by_id("u")
            .one(&store.db)
            .await
            .expect("read")
            .expect("the user exists");
        (u.name, u.image_url, u.updated_at)
    }

    async fn only_changes_are_written(store: Store) {
        store.upsert_user("u", "Ann", None).await.expect("insert");
        let first = row(&store).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        store.upsert_user("u", "Ann", None).await.expect("same");
        assert_eq!(
            row(&store).await,
            first,
            "an unchanged user is not rewritten"
        );
        store
            .upsert_user("u", "Ann", Some("i"))
            .await
            .expect("picture");
        let pictured = row(&store).await;
        assert_eq!(pictured.1.as_deref(), Some("i"));
        assert!(pictured.2 > first.2, "a change moves updated_at");
        store
            .upsert_user("u", "Bo", Some("i"))
            .await
            .expect("rename");
        assert_eq!(row(&store).await.0, "Bo");
        store
            .upsert_user("u", "Bo", None)
            .await
            .expect("no picture");
        assert_eq!(row(&store).await.1, None);
    }

    #[tokio::test]
    async fn writes_only_changed_users() {
        test_support::each_backend(|store, _| only_changes_are_written(store)).await;
    }
}

#[cfg(test)]
mod kept_connection_tests {
    use super::*;

    fn row(channel: Uuid, seq: i64) -> NewMessage {
        NewMessage {
            id: Uuid::now_v7(),
            channel_id: channel,
            user_id: "u".into(),
            content: format!("m{seq}"),
            reply_to_id: None,
            temp_id: Some(format!("t{seq}")),
            seq,
            created_at: Utc::now(),
        }
    }

    /// Stored rows of `channel` as (seq, content).
    async fn stored(store: &Store, channel: Uuid) -> Vec<(i64, String)> {
        message::Entity::find()
            .filter(message::Column::ChannelId.eq(channel))
            .order_by_asc(message::Column::Seq)
            .all(&store.db)
            .await
            .expect("read")
            .into_iter()
            .map(|m| (m.seq, m.content))
            .collect()
    }

    /// The kept connection stores what the pool's way stores, keeps
    /// serving after a refused statement (the seq fence), and a refused
    /// batch stores nothing.
    async fn inserts_like_the_pool(store: Store, keeps: bool) {
        store.upsert_user("u", "U", None).await.expect("user");
        let channel = Uuid::parse_str(
            &store
                .create_channel("c", false, "u")
                .await
                .expect("channel")
                .id,
        )
        .expect("uuid");
        let kept = InsertConnection::default();
        store
            .insert_messages_kept(&kept, &[row(channel, 1), row(channel, 2)])
            .await
            .expect("first batch");
        assert_eq!(kept.holds(), keeps);
        store
            .insert_messages_kept(&kept, &[row(channel, 3)])
            .await
            .expect("second batch, same connection");
        let clash = store
            .insert_messages_kept(&kept, &[row(channel, 4), row(channel, 3)])
            .await
            .expect_err("seq 3 is taken");
        assert!(
            !is_permanent(&clash),
            "the seq fence is transient: {clash:?}"
        );
        store
            .insert_messages_kept(&kept, &[row(channel, 4)])
            .await
            .expect("after a refusal");
        store
            .insert_messages(&[row(channel, 5)])
            .await
            .expect("the pool's way");
        let seqs: Vec<i64> = stored(&store, channel)
            .await
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    }

    /// Two connections, as a worker's pool has at least: one kept, one for
    /// the pool's way. (A pool of one takes the pool's way throughout.)
    #[tokio::test]
    async fn kept_connection_inserts_like_the_pool() {
        test_support::each_backend_with_pool(2, |store, backend| {
            inserts_like_the_pool(store, matches!(backend, test_support::Backend::Postgres))
        })
        .await;
    }

    #[tokio::test]
    async fn a_pool_of_one_is_never_kept() {
        test_support::each_backend(|store, _| inserts_like_the_pool(store, false)).await;
    }
}

/// Stores for the tests of this module's queries: one per backend.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    #[derive(Debug, Clone, Copy)]
    pub enum Backend {
        Sqlite,
        Postgres,
    }

    /// Runs `test` on an in-memory SQLite store, then on a PostgreSQL
    /// store of its own temporary database (`TEST_PG_ADMIN_URL`, default
    /// the local `postgres` database), dropped afterwards.
    pub async fn each_backend<F, Fut>(test: F)
    where
        F: Fn(Store, Backend) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        each_backend_with_pool(1, test).await
    }

    /// [`each_backend`] with a PostgreSQL pool of `pool` connections.
    pub async fn each_backend_with_pool<F, Fut>(pool: u32, test: F)
    where
        F: Fn(Store, Backend) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let store = Store::connect("sqlite::memory:", 1).await.expect("sqlite");
        store.migrate().await.expect("migrate");
        test(store, Backend::Sqlite).await;

        let admin = std::env::var("TEST_PG_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("sb_store_{}", uuid::Uuid::now_v7().simple());
        let admin_store = Store::connect(&admin, 1).await.expect("postgres");
        admin_store
            .db
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("TEST_PG_ADMIN_URL has no database part"),
        };
        let store = Store::connect(&url, pool).await.expect("connect");
        store.migrate().await.expect("migrate");
        test(store, Backend::Postgres).await;
        let _ = admin_store
            .db
            .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await;
    }
}
