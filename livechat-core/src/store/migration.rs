//! Schema migrations for SQLite and PostgreSQL.
//!
//! A host runs them on its own connection with
//! `Migrator::up(&db, None)` (from [`sea_orm_migration::MigratorTrait`]);
//! the bookkeeping table is `livechat_migrations`, so the host's own
//! SeaORM migrations (table `seaql_migrations`) are not disturbed.

use sea_orm_migration::prelude::*;

/// The livechat migrator. Tables are prefixed `livechat_`.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_chat::Migration),
            Box::new(m0002_outbox_scan::Migration),
            Box::new(m0003_presence_announced::Migration),
            Box::new(m0004_messages_deferred_fk::Migration),
            Box::new(m0005_customers_linked::Migration),
            Box::new(m0006_outbox_pending_for::Migration),
            Box::new(m0007_sessions_agent::Migration),
            Box::new(m0008_presence_departments::Migration),
            Box::new(m0009_sessions_ticket_closed::Migration),
            Box::new(m0010_outbox_missed::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        "livechat_migrations".into_iden()
    }
}

mod m0001_chat {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0001_chat"
        }
    }

    #[derive(DeriveIden)]
    enum LivechatSessions {
        Table,
        Id,
        TenantId,
        AgentId,
        CustomerId,
        Origin,
        Status,
        Topic,
        PriorityRank,
        Department,
        TicketId,
        Contact,
        ClientIp,
        UserAgent,
        LastSeq,
        CreatedAt,
        UpdatedAt,
        AssignedAt,
        ClosedAt,
    }

    #[derive(DeriveIden)]
    enum LivechatMessages {
        Table,
        Id,
        TenantId,
        SessionId,
        SenderType,
        SenderId,
        CustomerId,
        Seq,
        Body,
        ClientMsgId,
        CreatedAt,
    }

    #[derive(DeriveIden)]
    enum LivechatAgentPresence {
        Table,
        TenantId,
        AgentId,
        Status,
        UpdatedAt,
        LastSeenAt,
        LastAssignedAt,
    }

    #[derive(DeriveIden)]
    enum LivechatOutbox {
        Table,
        Id,
        TenantId,
        SessionId,
        Kind,
        Payload,
        CreatedAt,
        Attempts,
        AvailableAt,
        ClaimedUntil,
        LastError,
        DispatchedAt,
        FailedAt,
    }

    #[derive(DeriveIden)]
    enum LivechatCustomers {
        Table,
        Id,
        TenantId,
        UserId,
        BrowserUuid,
        LinkedTo,
        CreatedAt,
    }

    #[derive(DeriveIden)]
    enum LivechatConnections {
        Table,
        Id,
        TenantId,
        Role,
        AgentId,
        CustomerId,
        NodeId,
        ExpiresAt,
    }

    #[derive(DeriveIden)]
    enum LivechatConnectionJoins {
        Table,
        ConnectionId,
        SessionId,
        TenantId,
    }

    #[derive(DeriveIden)]
    enum LivechatRouting {
        Table,
        TenantId,
        AgentCapacity,
        LockVersion,
    }

    /// Partial indexes: sea-query's index builder has no `WHERE`, and this
    /// SQL is the same on both databases.
    const PARTIAL_INDEXES: &[&str] = &[
        // DESIGN.md invariant 2: one OPEN agent-started session per (tenant, agent).
        "CREATE UNIQUE INDEX livechat_sessions_one_open_per_agent \
         ON livechat_sessions (tenant_id, agent_id) \
         WHERE status = 'OPEN' AND origin = 'agent'",
        // DESIGN.md invariant 2: one WAITING-or-OPEN session per (tenant, customer).
        "CREATE UNIQUE INDEX livechat_sessions_one_active_per_customer \
         ON livechat_sessions (tenant_id, customer_id) \
         WHERE status IN ('WAITING', 'OPEN') AND customer_id IS NOT NULL",
        // The queue: waiting sessions by priority, then age.
        "CREATE INDEX livechat_sessions_queue \
         ON livechat_sessions (tenant_id, priority_rank, created_at) \
         WHERE status = 'WAITING'",
        // Agent load: open sessions per agent.
        "CREATE INDEX livechat_sessions_agent_load \
         ON livechat_sessions (tenant_id, agent_id) WHERE status = 'OPEN'",
        // DESIGN.md invariant 6: one message per client idempotency key.
        "CREATE UNIQUE INDEX livechat_messages_client_msg_id \
         ON livechat_messages (session_id, client_msg_id) \
         WHERE client_msg_id IS NOT NULL",
        // Undispatched events, oldest first.
        "CREATE INDEX livechat_outbox_pending \
         ON livechat_outbox (available_at, id) WHERE dispatched_at IS NULL",
        "CREATE INDEX livechat_outbox_pending_session \
         ON livechat_outbox (session_id, id) WHERE dispatched_at IS NULL",
        // One identified customer per host user, one visitor per browser.
        "CREATE UNIQUE INDEX livechat_customers_user \
         ON livechat_customers (tenant_id, user_id) WHERE user_id IS NOT NULL",
        "CREATE UNIQUE INDEX livechat_customers_browser \
         ON livechat_customers (tenant_id, browser_uuid) WHERE browser_uuid IS NOT NULL",
    ];

    fn ts(col: impl IntoIden) -> ColumnDef {
        ColumnDef::new(col)
            .timestamp_with_time_zone()
            .not_null()
            .to_owned()
    }

    fn ts_null(col: impl IntoIden) -> ColumnDef {
        ColumnDef::new(col)
            .timestamp_with_time_zone()
            .null()
            .to_owned()
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        /// The change and its record commit together, on SQLite too (where
        /// `sea-orm-migration` uses no transaction unless asked): a failure
        /// in between would leave the change without its record, and every
        /// later start failing on it.
        fn use_transaction(&self) -> Option<bool> {
            Some(true)
        }

        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            use LivechatSessions as S;
            manager
                .create_table(
                    Table::create()
                        .table(S::Table)
                        .col(ColumnDef::new(S::Id).uuid().not_null().primary_key())
                        .col(ColumnDef::new(S::TenantId).big_integer().not_null())
                        .col(ColumnDef::new(S::AgentId).big_integer().null())
                        .col(ColumnDef::new(S::CustomerId).uuid().null())
                        .col(ColumnDef::new(S::Origin).string_len(16).not_null())
                        .col(ColumnDef::new(S::Status).string_len(16).not_null())
                        .col(ColumnDef::new(S::Topic).string_len(200).null())
                        .col(
                            ColumnDef::new(S::PriorityRank)
                                .integer()
                                .not_null()
                                .default(2),
                        )
                        .col(ColumnDef::new(S::Department).string_len(100).null())
                        .col(ColumnDef::new(S::TicketId).uuid().null())
                        .col(ColumnDef::new(S::Contact).text().null())
                        .col(ColumnDef::new(S::ClientIp).string_len(64).null())
                        .col(ColumnDef::new(S::UserAgent).text().null())
                        .col(
                            ColumnDef::new(S::LastSeq)
                                .big_integer()
                                .not_null()
                                .default(0),
                        )
                        .col(ts(S::CreatedAt))
                        .col(ts(S::UpdatedAt))
                        .col(ts_null(S::AssignedAt))
                        .col(ts_null(S::ClosedAt))
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("livechat_sessions_tenant_created")
                        .table(S::Table)
                        .col(S::TenantId)
                        .col(S::CreatedAt)
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("livechat_sessions_customer")
                        .table(S::Table)
                        .col(S::TenantId)
                        .col(S::CustomerId)
                        .col(S::Id)
                        .to_owned(),
                )
                .await?;

            use LivechatMessages as M;
            manager
                .create_table(
                    Table::create()
                        .table(M::Table)
                        .col(ColumnDef::new(M::Id).uuid().not_null().primary_key())
                        .col(ColumnDef::new(M::TenantId).big_integer().not_null())
                        .col(ColumnDef::new(M::SessionId).uuid().not_null())
                        .col(ColumnDef::new(M::SenderType).string_len(16).not_null())
                        .col(ColumnDef::new(M::SenderId).big_integer().null())
                        .col(ColumnDef::new(M::CustomerId).uuid().null())
                        .col(ColumnDef::new(M::Seq).big_integer().not_null())
                        .col(ColumnDef::new(M::Body).text().not_null())
                        .col(ColumnDef::new(M::ClientMsgId).string_len(128).null())
                        .col(ts(M::CreatedAt))
                        .foreign_key(
                            ForeignKey::create()
                                .name("livechat_messages_session_fk")
                                .from(M::Table, M::SessionId)
                                .to(S::Table, S::Id)
                                .on_delete(ForeignKeyAction::Cascade),
                        )
                        .to_owned(),
                )
                .await?;
            // DESIGN.md invariant 4: seq is unique per session; also the read order.
            manager
                .create_index(
                    Index::create()
                        .name("livechat_messages_session_seq")
                        .table(M::Table)
                        .col(M::SessionId)
                        .col(M::Seq)
                        .unique()
                        .to_owned(),
                )
                .await?;

            use LivechatAgentPresence as P;
            manager
                .create_table(
                    Table::create()
                        .table(P::Table)
                        .col(ColumnDef::new(P::TenantId).big_integer().not_null())
                        .col(ColumnDef::new(P::AgentId).big_integer().not_null())
                        .col(ColumnDef::new(P::Status).string_len(16).not_null())
                        .col(ts(P::UpdatedAt))
                        .col(ts(P::LastSeenAt))
                        .col(ts_null(P::LastAssignedAt))
                        .primary_key(Index::create().col(P::TenantId).col(P::AgentId))
                        .to_owned(),
                )
                .await?;

            use LivechatOutbox as O;
            manager
                .create_table(
                    Table::create()
                        .table(O::Table)
                        .col(ColumnDef::new(O::Id).uuid().not_null().primary_key())
                        .col(ColumnDef::new(O::TenantId).big_integer().not_null())
                        .col(ColumnDef::new(O::SessionId).uuid().null())
                        .col(ColumnDef::new(O::Kind).string_len(64).not_null())
                        .col(ColumnDef::new(O::Payload).text().not_null())
                        .col(ts(O::CreatedAt))
                        .col(ColumnDef::new(O::Attempts).integer().not_null().default(0))
                        .col(ts(O::AvailableAt))
                        .col(ts_null(O::ClaimedUntil))
                        .col(ColumnDef::new(O::LastError).text().null())
                        .col(ts_null(O::DispatchedAt))
                        .col(ts_null(O::FailedAt))
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("livechat_outbox_tenant_id")
                        .table(O::Table)
                        .col(O::TenantId)
                        .col(O::Id)
                        .to_owned(),
                )
                .await?;

            use LivechatCustomers as C;
            manager
                .create_table(
                    Table::create()
                        .table(C::Table)
                        .col(ColumnDef::new(C::Id).uuid().not_null().primary_key())
                        .col(ColumnDef::new(C::TenantId).big_integer().not_null())
                        .col(ColumnDef::new(C::UserId).big_integer().null())
                        .col(ColumnDef::new(C::BrowserUuid).uuid().null())
                        .col(ColumnDef::new(C::LinkedTo).uuid().null())
                        .col(ts(C::CreatedAt))
                        .to_owned(),
                )
                .await?;

            use LivechatRouting as R;
            manager
                .create_table(
                    Table::create()
                        .table(R::Table)
                        .col(
                            ColumnDef::new(R::TenantId)
                                .big_integer()
                                .not_null()
                                .primary_key(),
                        )
                        .col(ColumnDef::new(R::AgentCapacity).big_integer().null())
                        .col(
                            ColumnDef::new(R::LockVersion)
                                .big_integer()
                                .not_null()
                                .default(0),
                        )
                        .to_owned(),
                )
                .await?;

            use LivechatConnections as W;
            manager
                .create_table(
                    Table::create()
                        .table(W::Table)
                        .col(ColumnDef::new(W::Id).uuid().not_null().primary_key())
                        .col(ColumnDef::new(W::TenantId).big_integer().not_null())
                        .col(ColumnDef::new(W::Role).string_len(16).not_null())
                        .col(ColumnDef::new(W::AgentId).big_integer().null())
                        .col(ColumnDef::new(W::CustomerId).uuid().null())
                        .col(ColumnDef::new(W::NodeId).string_len(64).not_null())
                        .col(ts(W::ExpiresAt))
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("livechat_connections_agent")
                        .table(W::Table)
                        .col(W::TenantId)
                        .col(W::AgentId)
                        .to_owned(),
                )
                .await?;
            use LivechatConnectionJoins as J;
            manager
                .create_table(
                    Table::create()
                        .table(J::Table)
                        .col(ColumnDef::new(J::ConnectionId).uuid().not_null())
                        .col(ColumnDef::new(J::SessionId).uuid().not_null())
                        .col(ColumnDef::new(J::TenantId).big_integer().not_null())
                        .primary_key(Index::create().col(J::ConnectionId).col(J::SessionId))
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("livechat_connection_joins_session")
                        .table(J::Table)
                        .col(J::SessionId)
                        .to_owned(),
                )
                .await?;

            let db = manager.get_connection();
            for sql in PARTIAL_INDEXES {
                db.execute_unprepared(sql).await?;
            }
            Ok(())
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            for table in [
                LivechatConnectionJoins::Table.into_iden(),
                LivechatConnections::Table.into_iden(),
                LivechatRouting::Table.into_iden(),
                LivechatCustomers::Table.into_iden(),
                LivechatOutbox::Table.into_iden(),
                LivechatAgentPresence::Table.into_iden(),
                LivechatMessages::Table.into_iden(),
                LivechatSessions::Table.into_iden(),
            ] {
                manager
                    .drop_table(Table::drop().table(table).to_owned())
                    .await?;
            }
            Ok(())
        }
    }
}

/// The dispatcher's claim scan reads undispatched events in id order
/// (`WHERE dispatched_at IS NULL ORDER BY id`). The index on
/// `(available_at, id)` could not serve that order, so both databases
/// walked the primary key over every event ever dispatched: each claim cost
/// grew with the outbox's history (issue #5 profile). This index holds only
/// undispatched events, in id order; the per-session index no query used
/// goes, one B-tree less for every event written.
mod m0002_outbox_scan {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0002_outbox_scan"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        /// The change and its record commit together, on SQLite too (where
        /// `sea-orm-migration` uses no transaction unless asked): a failure
        /// in between would leave the change without its record, and every
        /// later start failing on it.
        fn use_transaction(&self) -> Option<bool> {
            Some(true)
        }

        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            let db = manager.get_connection();
            for sql in [
                "DROP INDEX IF EXISTS livechat_outbox_pending",
                "DROP INDEX IF EXISTS livechat_outbox_pending_session",
                "CREATE INDEX livechat_outbox_undispatched \
                 ON livechat_outbox (id) WHERE dispatched_at IS NULL",
            ] {
                db.execute_unprepared(sql).await?;
            }
            Ok(())
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            let db = manager.get_connection();
            for sql in [
                "DROP INDEX IF EXISTS livechat_outbox_undispatched",
                "CREATE INDEX livechat_outbox_pending \
                 ON livechat_outbox (available_at, id) WHERE dispatched_at IS NULL",
                "CREATE INDEX livechat_outbox_pending_session \
                 ON livechat_outbox (session_id, id) WHERE dispatched_at IS NULL",
            ] {
                db.execute_unprepared(sql).await?;
            }
            Ok(())
        }
    }
}

/// When an agent's last connection closed and the grace period passed, the
/// tenant's agents are told the agent is offline; this column records that
/// it was said, so that the agent's next connection can tell them the
/// agent is back (with the chosen status) exactly once, on whichever node
/// it opens. `NULL`: no offline announcement stands.
mod m0003_presence_announced {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0003_presence_announced"
        }
    }

    #[derive(DeriveIden)]
    enum LivechatAgentPresence {
        Table,
        OfflineAnnouncedAt,
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        /// The change and its record commit together, on SQLite too (where
        /// `sea-orm-migration` uses no transaction unless asked): a failure
        /// in between would leave the change without its record, and every
        /// later start failing on it.
        fn use_transaction(&self) -> Option<bool> {
            Some(true)
        }

        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .alter_table(
                    Table::alter()
                        .table(LivechatAgentPresence::Table)
                        .add_column(
                            ColumnDef::new(LivechatAgentPresence::OfflineAnnouncedAt)
                                .timestamp_with_time_zone()
                                .null(),
                        )
                        .to_owned(),
                )
                .await
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .alter_table(
                    Table::alter()
                        .table(LivechatAgentPresence::Table)
                        .drop_column(LivechatAgentPresence::OfflineAnnouncedAt)
                        .to_owned(),
                )
                .await
        }
    }
}

/// On SQLite, `livechat_messages`' foreign key to its session is checked
/// at commit (`DEFERRABLE INITIALLY DEFERRED`) instead of after each
/// statement, so that a batch's messages go in as multi-row inserts
/// without a statement journal (issue #5; `sqlite_statement` in
/// `store/messages.rs`): a statement that writes several rows and may
/// abort half-way makes SQLite copy every page it touches into that
/// journal, and SQLite decides that from the constraint's declaration.
/// An insert with no session still fails: its transaction's commit does,
/// and nothing of it is stored. SQLite cannot alter a constraint, so the
/// table is rebuilt in one transaction (its rows copied, its indexes made
/// again): on a large table this migration takes as long as that copy.
/// Nothing references `livechat_messages`. PostgreSQL is left as it is:
/// there a multi-row insert needs no such journal.
mod m0004_messages_deferred_fk {
    use sea_orm_migration::prelude::*;
    use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0004_messages_deferred_fk"
        }
    }

    /// The columns of `livechat_messages`, copied by name.
    const COLUMNS: &str = "id, tenant_id, session_id, sender_type, sender_id, customer_id, \
                           seq, body, client_msg_id, created_at";

    /// `livechat_messages` as m0001 makes it on SQLite, with `deferral`
    /// after its foreign key.
    fn rebuild(deferral: &str) -> [String; 6] {
        [
            format!(
                "CREATE TABLE livechat_messages_rebuilt ( \
                 id uuid_text NOT NULL PRIMARY KEY, \
                 tenant_id integer NOT NULL, \
                 session_id uuid_text NOT NULL, \
                 sender_type varchar(16) NOT NULL, \
                 sender_id integer NULL, \
                 customer_id uuid_text NULL, \
                 seq integer NOT NULL, \
                 body text NOT NULL, \
                 client_msg_id varchar(128) NULL, \
                 created_at timestamp_with_timezone_text NOT NULL, \
                 CONSTRAINT livechat_messages_session_fk FOREIGN KEY (session_id) \
                 REFERENCES livechat_sessions (id) ON DELETE CASCADE {deferral})"
            ),
            format!(
                "INSERT INTO livechat_messages_rebuilt ({COLUMNS}) \
                 SELECT {COLUMNS} FROM livechat_messages"
            ),
            "DROP TABLE livechat_messages".to_owned(),
            "ALTER TABLE livechat_messages_rebuilt RENAME TO livechat_messages".to_owned(),
            "CREATE UNIQUE INDEX livechat_messages_session_seq \
             ON livechat_messages (session_id, seq)"
                .to_owned(),
            "CREATE UNIQUE INDEX livechat_messages_client_msg_id \
             ON livechat_messages (session_id, client_msg_id) \
             WHERE client_msg_id IS NOT NULL"
                .to_owned(),
        ]
    }

    async fn run(manager: &SchemaManager<'_>, deferral: &str) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() != DbBackend::Sqlite {
            return Ok(());
        }
        // Rows whose session is gone (only possible if something wrote
        // with foreign keys off) would fail the copy at commit.
        let orphans: i64 = db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT count(*) AS n FROM livechat_messages \
                 WHERE session_id NOT IN (SELECT id FROM livechat_sessions)",
            ))
            .await?
            .map_or(Ok(0), |row| row.try_get("", "n"))?;
        if orphans > 0 {
            return Err(DbErr::Migration(format!(
                "{orphans} rows of livechat_messages reference no session in livechat_sessions \
                 (written with foreign keys off); delete them or restore their sessions, \
                 then migrate again"
            )));
        }
        for sql in rebuild(deferral) {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            run(manager, "DEFERRABLE INITIALLY DEFERRED").await
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            run(manager, "").await
        }

        /// The rebuild and its record commit together, on SQLite too.
        fn use_transaction(&self) -> Option<bool> {
            Some(true)
        }
    }
}

/// The `message.missed` events of a session: a reply that several of a
/// customer's connections counted (tabs closed or purged one after the
/// other) is written missed once, and the writer looks for one already
/// written. The index holds only those events (rare), so it costs nothing
/// on a message's write.
mod m0010_outbox_missed {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0010_outbox_missed"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        /// The change and its record commit together, on SQLite too (where
        /// `sea-orm-migration` uses no transaction unless asked): a failure
        /// in between would leave the change without its record, and every
        /// later start failing on it.
        fn use_transaction(&self) -> Option<bool> {
            Some(true)
        }

        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared(
                    "CREATE INDEX livechat_outbox_missed \
                     ON livechat_outbox (session_id) WHERE kind = 'message.missed'",
                )
                .await?;
            Ok(())
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared("DROP INDEX IF EXISTS livechat_outbox_missed")
                .await?;
            Ok(())
        }
    }
}

/// m0009 fills `ticket_closed_at` in from the `ticket.closed` events
/// already stored, on both databases: `db` is migrated up to m0008. The
/// rows are written with bound values, as the store writes them (a UUID
/// is a blob on SQLite).
#[cfg(test)]
async fn check_the_ticket_closures_filled_in(db: &sea_orm::DatabaseConnection) {
    use sea_orm::ConnectionTrait;
    use sea_orm_migration::MigratorTrait;
    use sea_orm_migration::prelude::{Alias, Expr, Query};
    let (closed, reopened, open) = (
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
    );
    let (t1, t2, t3) = (
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
    );
    let at = chrono::Utc::now();
    // `reopened`'s close is of an earlier ticket than the one it has.
    for (session, ticket) in [(closed, t1), (reopened, t2), (open, t3)] {
        let insert = Query::insert()
            .into_table(Alias::new("livechat_sessions"))
            .columns(
                [
                    "id",
                    "tenant_id",
                    "origin",
                    "status",
                    "ticket_id",
                    "created_at",
                    "updated_at",
                ]
                .map(Alias::new),
            )
            .values_panic([
                session.into(),
                1i64.into(),
                "customer".into(),
                "OPEN".into(),
                ticket.into(),
                at.into(),
                at.into(),
            ])
            .to_owned();
        db.execute(&insert).await.unwrap();
    }
    for (session, ticket) in [(closed, t1), (reopened, uuid::Uuid::now_v7())] {
        let payload = serde_json::json!({"ticket_id": ticket, "tenant_id": 1, "closed_by": 7});
        let insert = Query::insert()
            .into_table(Alias::new("livechat_outbox"))
            .columns(
                [
                    "id",
                    "tenant_id",
                    "session_id",
                    "kind",
                    "payload",
                    "created_at",
                    "available_at",
                    "dispatched_at",
                ]
                .map(Alias::new),
            )
            .values_panic([
                uuid::Uuid::now_v7().into(),
                1i64.into(),
                session.into(),
                "ticket.closed".into(),
                payload.to_string().into(),
                at.into(),
                at.into(),
                at.into(),
            ])
            .to_owned();
        db.execute(&insert).await.unwrap();
    }
    Migrator::up(db, None).await.unwrap();
    let marked = db
        .query_all(
            &Query::select()
                .column(Alias::new("id"))
                .from(Alias::new("livechat_sessions"))
                .and_where(Expr::col(Alias::new("ticket_closed_at")).is_not_null())
                .to_owned(),
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.try_get::<uuid::Uuid>("", "id").unwrap())
        .collect::<Vec<_>>();
    assert_eq!(marked, vec![closed]);
}

#[cfg(all(test, feature = "postgres"))]
mod postgres_tests {
    use sea_orm_migration::MigratorTrait;

    use super::Migrator;

    #[tokio::test]
    async fn the_ticket_closures_are_filled_in_on_postgres() {
        let admin = livechat_tests::postgres_admin_url();
        let url = livechat_tests::create_database(&admin, "lc_migration").await;
        let db = crate::store::connect(&url).await.unwrap();
        Migrator::up(&db, Some(8)).await.unwrap();
        super::check_the_ticket_closures_filled_in(&db).await;
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
    use sea_orm_migration::MigratorTrait;

    use super::Migrator;

    async fn strings(db: &DatabaseConnection, sql: &str) -> Vec<String> {
        db.query_all_raw(Statement::from_string(DbBackend::Sqlite, sql))
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get_by_index::<String>(0).unwrap())
            .collect()
    }

    /// The messages table as it stands: its `CREATE TABLE`, and its
    /// columns, foreign keys, indexes and rows (id, seq, body).
    async fn messages_table(db: &DatabaseConnection) -> (String, Vec<String>) {
        let table = strings(
            db,
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'livechat_messages'",
        )
        .await
        .concat();
        let mut shape = Vec::new();
        for sql in [
            "SELECT name || ' ' || type || ' ' || \"notnull\" || ' ' || pk \
             FROM pragma_table_info('livechat_messages') ORDER BY cid",
            "SELECT \"table\" || ' ' || \"from\" || ' ' || \"to\" || ' ' || on_delete \
             FROM pragma_foreign_key_list('livechat_messages')",
            "SELECT name || ' ' || \"unique\" || ' ' || partial \
             FROM pragma_index_list('livechat_messages') ORDER BY name",
            "SELECT id || ' ' || seq || ' ' || body FROM livechat_messages ORDER BY seq",
        ] {
            shape.extend(strings(db, sql).await);
        }
        (table, shape)
    }

    /// m0004 rebuilds `livechat_messages` on SQLite with a deferred foreign
    /// key and keeps its rows, its indexes and its cascade; its down
    /// migration restores the immediate key, rows kept too.
    #[tokio::test]
    async fn the_messages_rebuild_keeps_rows_and_indexes() {
        let db = crate::store::connect("sqlite::memory:").await.unwrap();
        Migrator::up(&db, Some(3)).await.unwrap();
        let session = uuid::Uuid::now_v7();
        db.execute_unprepared(&format!(
            "INSERT INTO livechat_sessions (id, tenant_id, origin, status, created_at, updated_at) \
             VALUES ('{session}', 1, 'customer', 'OPEN', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
        ))
        .await
        .unwrap();
        for (seq, key) in [(1, "'k1'"), (2, "NULL")] {
            db.execute_unprepared(&format!(
                "INSERT INTO livechat_messages (id, tenant_id, session_id, sender_type, seq, body, \
                 client_msg_id, created_at) VALUES ('{}', 1, '{session}', 'agent', {seq}, \
                 'hello {seq}', {key}, '2026-01-01 00:00:00')",
                uuid::Uuid::now_v7()
            ))
            .await
            .unwrap();
        }
        let (before, shape) = messages_table(&db).await;
        assert!(!before.contains("DEFERRABLE"), "{before}");
        for part in [
            "livechat_messages_client_msg_id 1 1",
            "livechat_messages_session_seq 1 0",
            "livechat_sessions session_id id CASCADE",
        ] {
            assert!(shape.iter().any(|s| s == part), "{part}: {shape:?}");
        }
        assert_eq!(shape.iter().filter(|s| s.contains("hello")).count(), 2);

        Migrator::up(&db, None).await.unwrap();
        let (after, after_shape) = messages_table(&db).await;
        assert!(after.contains("DEFERRABLE INITIALLY DEFERRED"), "{after}");
        assert_eq!(after_shape, shape);
        // The unique indexes hold.
        for (seq, key) in [(2, "NULL"), (3, "'k1'")] {
            let duplicate = db
                .execute_unprepared(&format!(
                    "INSERT INTO livechat_messages (id, tenant_id, session_id, sender_type, seq, \
                     body, client_msg_id, created_at) VALUES ('{}', 1, '{session}', 'agent', \
                     {seq}, 'again', {key}, '2026-01-01 00:00:00')",
                    uuid::Uuid::now_v7()
                ))
                .await;
            assert!(duplicate.is_err(), "seq {seq}, key {key}");
        }

        // Back past m0004 (and m0005 to m0010, applied after it).
        Migrator::down(&db, Some(7)).await.unwrap();
        let (down, down_shape) = messages_table(&db).await;
        assert!(!down.contains("DEFERRABLE"), "{down}");
        assert_eq!(down_shape, shape);

        // The cascade from the session stays.
        Migrator::up(&db, None).await.unwrap();
        db.execute_unprepared(&format!(
            "DELETE FROM livechat_sessions WHERE id = '{session}'"
        ))
        .await
        .unwrap();
        let (_, emptied) = messages_table(&db).await;
        assert!(!emptied.iter().any(|s| s.contains("hello")), "{emptied:?}");
    }

    /// On SQLite each migration's change commits with its record: a
    /// migration whose record could not be written (here refused by a
    /// trigger; a crash has the same effect) leaves nothing behind, and the
    /// next start applies it. Without the transaction, the column or index
    /// stayed and every later start failed on "duplicate column" or "index
    /// already exists".
    #[tokio::test]
    async fn a_migration_whose_record_fails_leaves_nothing_behind() {
        let migrations = Migrator::migrations();
        for (done, migration) in migrations.iter().enumerate() {
            let name = migration.name().to_owned();
            let db = crate::store::connect("sqlite::memory:").await.unwrap();
            Migrator::install(&db).await.unwrap();
            if done > 0 {
                Migrator::up(&db, Some(u32::try_from(done).unwrap()))
                    .await
                    .unwrap();
            }
            db.execute_unprepared(&format!(
                "CREATE TRIGGER refuse_record BEFORE INSERT ON livechat_migrations \
                 WHEN NEW.version = '{name}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            ))
            .await
            .unwrap();
            let refused = Migrator::up(&db, None).await;
            assert!(refused.is_err(), "{name}: the record was refused");
            db.execute_unprepared("DROP TRIGGER refuse_record")
                .await
                .unwrap();
            Migrator::up(&db, None)
                .await
                .unwrap_or_else(|e| panic!("{name} applies again: {e}"));
        }
    }

    #[tokio::test]
    async fn the_ticket_closures_are_filled_in_on_sqlite() {
        let db = crate::store::connect("sqlite::memory:").await.unwrap();
        Migrator::up(&db, Some(8)).await.unwrap();
        super::check_the_ticket_closures_filled_in(&db).await;
    }

    /// Messages whose session is gone (written with foreign keys off) stop
    /// the rebuild with an error that says so, and leave the table as it
    /// was.
    #[tokio::test]
    async fn orphaned_messages_stop_the_rebuild_with_a_clear_error() {
        let db = crate::store::connect("sqlite::memory:").await.unwrap();
        Migrator::up(&db, Some(3)).await.unwrap();
        db.execute_unprepared("PRAGMA foreign_keys = OFF")
            .await
            .unwrap();
        db.execute_unprepared(&format!(
            "INSERT INTO livechat_messages (id, tenant_id, session_id, sender_type, seq, body, \
             created_at) VALUES ('{}', 1, '{}', 'agent', 1, 'hello', '2026-01-01 00:00:00')",
            uuid::Uuid::now_v7(),
            uuid::Uuid::now_v7()
        ))
        .await
        .unwrap();
        db.execute_unprepared("PRAGMA foreign_keys = ON")
            .await
            .unwrap();
        let error = Migrator::up(&db, None).await.unwrap_err().to_string();
        assert!(
            error.contains("1 rows of livechat_messages reference no session"),
            "{error}"
        );
        let (table, shape) = messages_table(&db).await;
        assert!(!table.contains("DEFERRABLE"), "{table}");
        assert!(shape.iter().any(|s| s.contains("hello")), "{shape:?}");
    }
}

/// The visitors linked to an identified customer, looked up each time the
/// customer lists or marks its notifications
/// (`ChatService::notification_recipients`): few customers are linked, so
/// the index holds only those rows.
mod m0005_customers_linked {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0005_customers_linked"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        /// The change and its record commit together, on SQLite too (where
        /// `sea-orm-migration` uses no transaction unless asked): a failure
        /// in between would leave the change without its record, and every
        /// later start failing on it.
        fn use_transaction(&self) -> Option<bool> {
            Some(true)
        }

        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared(
                    "CREATE INDEX livechat_customers_linked \
                     ON livechat_customers (tenant_id, linked_to) \
                     WHERE linked_to IS NOT NULL",
                )
                .await?;
            Ok(())
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared("DROP INDEX IF EXISTS livechat_customers_linked")
                .await?;
            Ok(())
        }
    }
}

/// The receivers an outbox event is still owed to after an attempt
/// (`livechat_outbox.pending_for`, a JSON array of receiver names; `NULL`
/// on the first attempt: all of them): a retry calls only those, and the
/// session's later events go on to the other receivers while these wait
/// (the ticket bridge's sinks; `OutboxConsumer::claim_pending`). A
/// nullable column, so that nodes of the version before keep writing
/// events during an upgrade.
mod m0006_outbox_pending_for {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0006_outbox_pending_for"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        /// The change and its record commit together, on SQLite too (where
        /// `sea-orm-migration` uses no transaction unless asked): a failure
        /// in between would leave the change without its record, and every
        /// later start failing on it.
        fn use_transaction(&self) -> Option<bool> {
            Some(true)
        }

        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared("ALTER TABLE livechat_outbox ADD COLUMN pending_for TEXT NULL")
                .await?;
            Ok(())
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared("ALTER TABLE livechat_outbox DROP COLUMN pending_for")
                .await?;
            Ok(())
        }
    }
}

/// An agent's own sessions, newest first (`GET /sessions?agent_id=`, an
/// agent's "mine" view): the agent load index holds only OPEN sessions,
/// and an agent's CLOSED ones grow without bound. Customer chats still
/// waiting have no agent, so the index leaves them out.
mod m0007_sessions_agent {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0007_sessions_agent"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        /// The change and its record commit together, on SQLite too (where
        /// `sea-orm-migration` uses no transaction unless asked): a failure
        /// in between would leave the change without its record, and every
        /// later start failing on it.
        fn use_transaction(&self) -> Option<bool> {
            Some(true)
        }

        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared(
                    "CREATE INDEX livechat_sessions_agent \
                     ON livechat_sessions (tenant_id, agent_id, created_at, id) \
                     WHERE agent_id IS NOT NULL",
                )
                .await?;
            Ok(())
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared("DROP INDEX IF EXISTS livechat_sessions_agent")
                .await?;
            Ok(())
        }
    }
}

/// The departments each agent serves (`livechat_agent_presence.departments`,
/// a JSON array; `NULL`: every department), which routing matches with a
/// chat's department. Nullable, so that nodes of the version before keep
/// writing presence during an upgrade.
mod m0008_presence_departments {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0008_presence_departments"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        /// The change and its record commit together, on SQLite too (where
        /// `sea-orm-migration` uses no transaction unless asked): a failure
        /// in between would leave the change without its record, and every
        /// later start failing on it.
        fn use_transaction(&self) -> Option<bool> {
            Some(true)
        }

        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE livechat_agent_presence ADD COLUMN departments TEXT NULL",
                )
                .await?;
            Ok(())
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared("ALTER TABLE livechat_agent_presence DROP COLUMN departments")
                .await?;
            Ok(())
        }
    }
}

/// When a session's ticket was closed (`livechat_sessions.ticket_closed_at`,
/// set with the `ticket.closed` event; `NULL` while the session has no
/// ticket or its ticket is open): a chat handed back to the queue with a
/// closed ticket gets a new one. The answer was found by reading every
/// event of the tenant in the outbox (the tenant index was the only one
/// the read's terms matched), inside a write transaction, and it would
/// not survive the outbox's pruning. Filled in from the `ticket.closed`
/// events already stored. Nullable, so that nodes of the version before
/// keep writing sessions during an upgrade (a ticket such a node closes
/// is not marked: its chat, if handed back, keeps the closed ticket).
mod m0009_sessions_ticket_closed {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0009_sessions_ticket_closed"
        }
    }

    #[derive(DeriveIden)]
    enum LivechatSessions {
        Table,
        TicketClosedAt,
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .alter_table(
                    Table::alter()
                        .table(LivechatSessions::Table)
                        .add_column(
                            ColumnDef::new(LivechatSessions::TicketClosedAt)
                                .timestamp_with_time_zone()
                                .null(),
                        )
                        .to_owned(),
                )
                .await?;
            // One statement over the outbox: the ticket each close names,
            // if it is still its session's. SQLite keeps a UUID as a
            // 16-byte blob, which the text from the JSON payload is
            // compared with as hex digits.
            let (ticket, session_ticket) = match manager.get_database_backend() {
                sea_orm::DbBackend::Postgres => (
                    "(payload::jsonb ->> 'ticket_id')::uuid",
                    "livechat_sessions.ticket_id",
                ),
                _ => (
                    "upper(replace(json_extract(payload, '$.ticket_id'), '-', ''))",
                    "hex(livechat_sessions.ticket_id)",
                ),
            };
            manager
                .get_connection()
                .execute_unprepared(&format!(
                    "UPDATE livechat_sessions SET ticket_closed_at = closed.at \
                     FROM (SELECT session_id, {ticket} AS ticket_id, max(created_at) AS at \
                     FROM livechat_outbox \
                     WHERE kind = 'ticket.closed' AND session_id IS NOT NULL \
                     GROUP BY session_id, {ticket}) AS closed \
                     WHERE livechat_sessions.id = closed.session_id \
                     AND {session_ticket} = closed.ticket_id"
                ))
                .await?;
            Ok(())
        }

        /// The column and its backfill commit together, on SQLite too: a
        /// failure in between would leave the column without the
        /// migration's record, and every later start failing.
        fn use_transaction(&self) -> Option<bool> {
            Some(true)
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared("ALTER TABLE livechat_sessions DROP COLUMN ticket_closed_at")
                .await?;
            Ok(())
        }
    }
}
