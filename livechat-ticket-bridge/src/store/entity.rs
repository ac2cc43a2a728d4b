//! SeaORM entities of the bridge's tables. Private: the sinks hand out
//! livechat-core's [`Ticket`](livechat_core::Ticket) and
//! [`Notification`](livechat_core::Notification).

pub(crate) mod ticket {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "livechat_tickets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: i64,
        pub reason: String,
        pub session_id: Option<Uuid>,
        pub customer_id: Option<Uuid>,
        pub agent_id: Option<i64>,
        pub subject: String,
        pub department: Option<String>,
        pub priority: String,
        pub status: String,
        pub created_at: DateTimeUtc,
        pub closed_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(crate) mod notification {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "livechat_notifications")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: i64,
        pub customer_id: Uuid,
        pub session_id: Option<Uuid>,
        pub ticket_id: Option<Uuid>,
        pub kind: String,
        pub title: String,
        pub body: String,
        pub created_at: DateTimeUtc,
        pub read_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
