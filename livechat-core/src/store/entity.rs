//! SeaORM entities of the `livechat_*` tables. Private to the store: the
//! service hands out [`crate::model`] types.

pub(crate) mod session {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "livechat_sessions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: i64,
        pub agent_id: Option<i64>,
        pub customer_id: Option<Uuid>,
        pub origin: String,
        pub status: String,
        pub topic: Option<String>,
        pub priority_rank: i32,
        pub department: Option<String>,
        pub ticket_id: Option<Uuid>,
        pub contact: Option<String>,
        pub client_ip: Option<String>,
        pub user_agent: Option<String>,
        pub last_seq: i64,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub assigned_at: Option<DateTimeUtc>,
        pub closed_at: Option<DateTimeUtc>,
        /// When an agent closed the ticket `ticket_id` (migration m0009).
        pub ticket_closed_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(crate) mod message {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "livechat_messages")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: i64,
        pub session_id: Uuid,
        pub sender_type: String,
        pub sender_id: Option<i64>,
        pub customer_id: Option<Uuid>,
        pub seq: i64,
        pub body: String,
        pub client_msg_id: Option<String>,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(crate) mod presence {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "livechat_agent_presence")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: i64,
        #[sea_orm(primary_key, auto_increment = false)]
        pub agent_id: i64,
        pub status: String,
        pub updated_at: DateTimeUtc,
        pub last_seen_at: DateTimeUtc,
        pub last_assigned_at: Option<DateTimeUtc>,
        /// When the agent's tenant was told the agent went offline (last
        /// connection closed, grace passed); cleared when they are back.
        pub offline_announced_at: Option<DateTimeUtc>,
        /// The departments the agent serves, a JSON array of strings;
        /// `NULL` or `[]`: every department (migration m0008).
        pub departments: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(crate) mod outbox {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "livechat_outbox")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: i64,
        pub session_id: Option<Uuid>,
        pub kind: String,
        pub payload: String,
        pub created_at: DateTimeUtc,
        pub attempts: i32,
        pub available_at: DateTimeUtc,
        pub claimed_until: Option<DateTimeUtc>,
        pub last_error: Option<String>,
        pub dispatched_at: Option<DateTimeUtc>,
        pub failed_at: Option<DateTimeUtc>,
        /// A JSON array of the names of the receivers the event is still
        /// owed to after an attempt (`NULL` before the first: all of them;
        /// migration m0006).
        pub pending_for: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(crate) mod customer {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "livechat_customers")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: i64,
        pub user_id: Option<i64>,
        pub browser_uuid: Option<Uuid>,
        pub linked_to: Option<Uuid>,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(crate) mod routing {
    use sea_orm::entity::prelude::*;

    /// One row per tenant: its routing settings, and the row every routing
    /// transaction locks first so that capacity checks and assignments of a
    /// tenant happen one at a time.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "livechat_routing")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: i64,
        pub agent_capacity: Option<i64>,
        pub lock_version: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(crate) mod connection {
    use sea_orm::entity::prelude::*;

    /// One live WebSocket connection on some node; expires unless touched.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "livechat_connections")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: i64,
        pub role: String,
        pub agent_id: Option<i64>,
        pub customer_id: Option<Uuid>,
        pub node_id: String,
        pub expires_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(crate) mod connection_join {
    use sea_orm::entity::prelude::*;

    /// A connection following a session.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "livechat_connection_joins")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub connection_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub session_id: Uuid,
        pub tenant_id: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
