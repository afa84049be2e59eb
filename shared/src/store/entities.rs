//! sea-orm entities: the tables of the schema (see `migration.rs`). The same
//! entities serve PostgreSQL (cluster) and SQLite (embedded).

pub mod user {
    use sea_orm::entity::prelude::*;

    /// A user, created on first authenticated request or connection (the
    /// token's `sub`), or by an invitation.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub image_url: Option<String>,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod channel {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "channels")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
        pub is_private: bool,
        pub owner_id: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod channel_member {
    use sea_orm::entity::prelude::*;

    /// Membership, with the member's read position (`last_read_seq` only
    /// moves forward).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "channel_members")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub channel_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: String,
        /// `owner` or `member`.
        pub role: String,
        /// Who invited the user; `None` when they joined themselves.
        pub invited_by: Option<String>,
        pub joined_at: DateTimeUtc,
        pub last_read_seq: i64,
        pub last_read_message_id: Option<Uuid>,
        pub last_read_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod message {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "messages")]
    pub struct Model {
        /// UUID v7 assigned by the gateway when it accepted the message.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub channel_id: Uuid,
        pub user_id: String,
        #[sea_orm(column_type = "Text")]
        pub content: String,
        pub reply_to_id: Option<Uuid>,
        pub delivery_status: String,
        pub temp_id: Option<String>,
        /// 1, 2, 3, … per channel, in persisted (= delivery) order.
        pub seq: i64,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod reaction {
    use sea_orm::entity::prelude::*;

    /// One reaction per message, user and type.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "reactions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub message_id: Uuid,
        pub user_id: String,
        #[sea_orm(column_name = "type")]
        pub kind: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
