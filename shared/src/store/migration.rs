//! Schema migrations (sea-orm-migration), portable between PostgreSQL and
//! SQLite. `switchboard-worker migrate` applies them; see [`super::Store::migrate`]
//! for how concurrent runs are serialised.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(Initial), Box::new(ListIndexes)]
    }
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Name,
    ImageUrl,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Channels {
    Table,
    Id,
    Name,
    IsPrivate,
    OwnerId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ChannelMembers {
    Table,
    ChannelId,
    UserId,
    Role,
    InvitedBy,
    JoinedAt,
    LastReadSeq,
    LastReadMessageId,
    LastReadAt,
}

#[derive(DeriveIden)]
enum Messages {
    Table,
    Id,
    ChannelId,
    UserId,
    Content,
    ReplyToId,
    DeliveryStatus,
    TempId,
    Seq,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Reactions {
    Table,
    Id,
    MessageId,
    UserId,
    Type,
    CreatedAt,
}

#[derive(DeriveMigrationName)]
struct Initial;

#[async_trait::async_trait]
impl MigrationTrait for Initial {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Users::Table)
                .if_not_exists()
                .col(string(Users::Id).primary_key())
                .col(string(Users::Name))
                .col(string_null(Users::ImageUrl))
                .col(timestamp_with_time_zone(Users::CreatedAt))
                .col(timestamp_with_time_zone(Users::UpdatedAt))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Channels::Table)
                .if_not_exists()
                .col(uuid(Channels::Id).primary_key())
                .col(string(Channels::Name))
                .col(boolean(Channels::IsPrivate))
                .col(string(Channels::OwnerId))
                .col(timestamp_with_time_zone(Channels::CreatedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Channels::Table, Channels::OwnerId)
                        .to(Users::Table, Users::Id),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("idx_channels_public")
                .table(Channels::Table)
                .col(Channels::IsPrivate)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(ChannelMembers::Table)
                .if_not_exists()
                .col(uuid(ChannelMembers::ChannelId))
                .col(string(ChannelMembers::UserId))
                .col(string(ChannelMembers::Role))
                .col(string_null(ChannelMembers::InvitedBy))
                .col(timestamp_with_time_zone(ChannelMembers::JoinedAt))
                .col(big_integer(ChannelMembers::LastReadSeq).default(0))
                .col(uuid_null(ChannelMembers::LastReadMessageId))
                .col(timestamp_with_time_zone_null(ChannelMembers::LastReadAt))
                .primary_key(
                    Index::create()
                        .col(ChannelMembers::ChannelId)
                        .col(ChannelMembers::UserId),
                )
                .foreign_key(
                    ForeignKey::create()
                        .from(ChannelMembers::Table, ChannelMembers::ChannelId)
                        .to(Channels::Table, Channels::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .foreign_key(
                    ForeignKey::create()
                        .from(ChannelMembers::Table, ChannelMembers::UserId)
                        .to(Users::Table, Users::Id),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("idx_channel_members_user")
                .table(ChannelMembers::Table)
                .col(ChannelMembers::UserId)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Messages::Table)
                .if_not_exists()
                .col(uuid(Messages::Id).primary_key())
                .col(uuid(Messages::ChannelId))
                .col(string(Messages::UserId))
                .col(text(Messages::Content))
                .col(uuid_null(Messages::ReplyToId))
                .col(string(Messages::DeliveryStatus))
                .col(string_null(Messages::TempId))
                .col(big_integer(Messages::Seq))
                .col(timestamp_with_time_zone(Messages::CreatedAt))
                .col(timestamp_with_time_zone(Messages::UpdatedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Messages::Table, Messages::ChannelId)
                        .to(Channels::Table, Channels::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        // History by channel, newest first, and the fence that makes a
        // zombie worker's stale sequence numbers fail instead of duplicating.
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("idx_messages_channel_seq")
                .table(Messages::Table)
                .col(Messages::ChannelId)
                .col(Messages::Seq)
                .unique()
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Reactions::Table)
                .if_not_exists()
                .col(uuid(Reactions::Id).primary_key())
                .col(uuid(Reactions::MessageId))
                .col(string(Reactions::UserId))
                .col(string(Reactions::Type))
                .col(timestamp_with_time_zone(Reactions::CreatedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Reactions::Table, Reactions::MessageId)
                        .to(Messages::Table, Messages::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("idx_reactions_unique")
                .table(Reactions::Table)
                .col(Reactions::MessageId)
                .col(Reactions::UserId)
                .col(Reactions::Type)
                .unique()
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            Reactions::Table.into_iden(),
            Messages::Table.into_iden(),
            ChannelMembers::Table.into_iden(),
            Channels::Table.into_iden(),
            Users::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(t).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

/// Indexes for the paginated channel list (`GET /api/channels`).
///
/// - `idx_messages_unread` (`channel_id, seq, user_id`) covers the unread
///   count: messages of a channel after the member's read position, not
///   their own. PostgreSQL answers it with an index-only scan, SQLite from
///   the covering index, without touching the message rows.
/// - `idx_channels_public_id` (`is_private, id`) walks the public channels
///   in id order from a cursor, a page at a time.
/// - `idx_channel_members_user_channel` (`user_id, channel_id`) does the
///   same for the caller's memberships.
struct ListIndexes;

impl MigrationName for ListIndexes {
    fn name(&self) -> &str {
        "m0002_channel_list_indexes"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ListIndexes {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("idx_messages_unread")
                .table(Messages::Table)
                .col(Messages::ChannelId)
                .col(Messages::Seq)
                .col(Messages::UserId)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("idx_channels_public_id")
                .table(Channels::Table)
                .col(Channels::IsPrivate)
                .col(Channels::Id)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("idx_channel_members_user_channel")
                .table(ChannelMembers::Table)
                .col(ChannelMembers::UserId)
                .col(ChannelMembers::ChannelId)
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for (name, table) in [
            ("idx_messages_unread", Messages::Table.into_iden()),
            ("idx_channels_public_id", Channels::Table.into_iden()),
            (
                "idx_channel_members_user_channel",
                ChannelMembers::Table.into_iden(),
            ),
        ] {
            m.drop_index(Index::drop().name(name).table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
