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
        vec![Box::new(m0001_chat::Migration)]
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
        Origin,
        Status,
        LastSeq,
        CreatedAt,
        UpdatedAt,
        ClosedAt,
    }

    #[derive(DeriveIden)]
    enum LivechatMessages {
        Table,
        Id,
        TenantId,
        SessionId,
        SenderId,
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
        DispatchedAt,
    }

    /// Partial indexes: sea-query's index builder has no `WHERE`, and this
    /// SQL is the same on both databases.
    const PARTIAL_INDEXES: &[&str] = &[
        // DESIGN.md invariant 2: one OPEN agent-started session per (tenant, agent).
        "CREATE UNIQUE INDEX livechat_sessions_one_open_per_agent \
         ON livechat_sessions (tenant_id, agent_id) \
         WHERE status = 'OPEN' AND origin = 'agent'",
        // DESIGN.md invariant 6: one message per client idempotency key.
        "CREATE UNIQUE INDEX livechat_messages_client_msg_id \
         ON livechat_messages (session_id, client_msg_id) \
         WHERE client_msg_id IS NOT NULL",
        // Undispatched events, oldest first.
        "CREATE INDEX livechat_outbox_pending \
         ON livechat_outbox (created_at) WHERE dispatched_at IS NULL",
    ];

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .create_table(
                    Table::create()
                        .table(LivechatSessions::Table)
                        .col(
                            ColumnDef::new(LivechatSessions::Id)
                                .uuid()
                                .not_null()
                                .primary_key(),
                        )
                        .col(
                            ColumnDef::new(LivechatSessions::TenantId)
                                .big_integer()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatSessions::AgentId)
                                .big_integer()
                                .null(),
                        )
                        .col(
                            ColumnDef::new(LivechatSessions::Origin)
                                .string_len(16)
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatSessions::Status)
                                .string_len(16)
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatSessions::LastSeq)
                                .big_integer()
                                .not_null()
                                .default(0),
                        )
                        .col(
                            ColumnDef::new(LivechatSessions::CreatedAt)
                                .timestamp_with_time_zone()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatSessions::UpdatedAt)
                                .timestamp_with_time_zone()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatSessions::ClosedAt)
                                .timestamp_with_time_zone()
                                .null(),
                        )
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("livechat_sessions_tenant_created")
                        .table(LivechatSessions::Table)
                        .col(LivechatSessions::TenantId)
                        .col(LivechatSessions::CreatedAt)
                        .to_owned(),
                )
                .await?;

            manager
                .create_table(
                    Table::create()
                        .table(LivechatMessages::Table)
                        .col(
                            ColumnDef::new(LivechatMessages::Id)
                                .uuid()
                                .not_null()
                                .primary_key(),
                        )
                        .col(
                            ColumnDef::new(LivechatMessages::TenantId)
                                .big_integer()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatMessages::SessionId)
                                .uuid()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatMessages::SenderId)
                                .big_integer()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatMessages::Seq)
                                .big_integer()
                                .not_null(),
                        )
                        .col(ColumnDef::new(LivechatMessages::Body).text().not_null())
                        .col(
                            ColumnDef::new(LivechatMessages::ClientMsgId)
                                .string_len(128)
                                .null(),
                        )
                        .col(
                            ColumnDef::new(LivechatMessages::CreatedAt)
                                .timestamp_with_time_zone()
                                .not_null(),
                        )
                        .foreign_key(
                            ForeignKey::create()
                                .name("livechat_messages_session_fk")
                                .from(LivechatMessages::Table, LivechatMessages::SessionId)
                                .to(LivechatSessions::Table, LivechatSessions::Id)
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
                        .table(LivechatMessages::Table)
                        .col(LivechatMessages::SessionId)
                        .col(LivechatMessages::Seq)
                        .unique()
                        .to_owned(),
                )
                .await?;

            manager
                .create_table(
                    Table::create()
                        .table(LivechatAgentPresence::Table)
                        .col(
                            ColumnDef::new(LivechatAgentPresence::TenantId)
                                .big_integer()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatAgentPresence::AgentId)
                                .big_integer()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatAgentPresence::Status)
                                .string_len(16)
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatAgentPresence::UpdatedAt)
                                .timestamp_with_time_zone()
                                .not_null(),
                        )
                        .primary_key(
                            Index::create()
                                .col(LivechatAgentPresence::TenantId)
                                .col(LivechatAgentPresence::AgentId),
                        )
                        .to_owned(),
                )
                .await?;

            manager
                .create_table(
                    Table::create()
                        .table(LivechatOutbox::Table)
                        .col(
                            ColumnDef::new(LivechatOutbox::Id)
                                .uuid()
                                .not_null()
                                .primary_key(),
                        )
                        .col(
                            ColumnDef::new(LivechatOutbox::TenantId)
                                .big_integer()
                                .not_null(),
                        )
                        .col(ColumnDef::new(LivechatOutbox::SessionId).uuid().null())
                        .col(
                            ColumnDef::new(LivechatOutbox::Kind)
                                .string_len(64)
                                .not_null(),
                        )
                        .col(ColumnDef::new(LivechatOutbox::Payload).text().not_null())
                        .col(
                            ColumnDef::new(LivechatOutbox::CreatedAt)
                                .timestamp_with_time_zone()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(LivechatOutbox::DispatchedAt)
                                .timestamp_with_time_zone()
                                .null(),
                        )
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("livechat_outbox_tenant_id")
                        .table(LivechatOutbox::Table)
                        .col(LivechatOutbox::TenantId)
                        .col(LivechatOutbox::Id)
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
            manager
                .drop_table(Table::drop().table(LivechatOutbox::Table).to_owned())
                .await?;
            manager
                .drop_table(Table::drop().table(LivechatAgentPresence::Table).to_owned())
                .await?;
            manager
                .drop_table(Table::drop().table(LivechatMessages::Table).to_owned())
                .await?;
            manager
                .drop_table(Table::drop().table(LivechatSessions::Table).to_owned())
                .await
        }
    }
}
