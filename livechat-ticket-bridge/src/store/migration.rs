//! Schema of the default SeaORM sinks, for SQLite and PostgreSQL.

use sea_orm_migration::prelude::*;

/// Creates `livechat_tickets` and `livechat_notifications`.
///
/// Run it on the host's connection with `BridgeMigrator::up(&db, None)`
/// (from [`MigratorTrait`]). Its bookkeeping table is
/// `livechat_bridge_migrations`, so it neither disturbs nor depends on
/// livechat-core's `Migrator` (table `livechat_migrations`) or the host's
/// own migrations (`seaql_migrations`).
pub struct BridgeMigrator;

#[async_trait::async_trait]
impl MigratorTrait for BridgeMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_tickets::Migration),
            Box::new(m0002_tickets_department::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        "livechat_bridge_migrations".into_iden()
    }
}

mod m0001_tickets {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0001_bridge_tickets"
        }
    }

    #[derive(DeriveIden)]
    enum LivechatTickets {
        Table,
        Id,
        TenantId,
        Reason,
        SessionId,
        CustomerId,
        AgentId,
        Subject,
        Priority,
        Status,
        CreatedAt,
        ClosedAt,
    }

    #[derive(DeriveIden)]
    enum LivechatNotifications {
        Table,
        Id,
        TenantId,
        CustomerId,
        SessionId,
        TicketId,
        Kind,
        Title,
        Body,
        CreatedAt,
        ReadAt,
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
            use LivechatNotifications as N;
            use LivechatTickets as T;

            manager
                .create_table(
                    Table::create()
                        .table(T::Table)
                        .col(ColumnDef::new(T::Id).uuid().not_null().primary_key())
                        .col(ColumnDef::new(T::TenantId).big_integer().not_null())
                        .col(ColumnDef::new(T::Reason).string_len(32).not_null())
                        .col(ColumnDef::new(T::SessionId).uuid().null())
                        .col(ColumnDef::new(T::CustomerId).uuid().null())
                        .col(ColumnDef::new(T::AgentId).big_integer().null())
                        .col(ColumnDef::new(T::Subject).text().not_null())
                        .col(ColumnDef::new(T::Priority).string_len(16).not_null())
                        .col(ColumnDef::new(T::Status).string_len(16).not_null())
                        .col(
                            ColumnDef::new(T::CreatedAt)
                                .timestamp_with_time_zone()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(T::ClosedAt)
                                .timestamp_with_time_zone()
                                .null(),
                        )
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("livechat_tickets_tenant_created")
                        .table(T::Table)
                        .col(T::TenantId)
                        .col(T::CreatedAt)
                        .to_owned(),
                )
                .await?;

            manager
                .create_table(
                    Table::create()
                        .table(N::Table)
                        .col(ColumnDef::new(N::Id).uuid().not_null().primary_key())
                        .col(ColumnDef::new(N::TenantId).big_integer().not_null())
                        .col(ColumnDef::new(N::CustomerId).uuid().not_null())
                        .col(ColumnDef::new(N::SessionId).uuid().null())
                        .col(ColumnDef::new(N::TicketId).uuid().null())
                        .col(ColumnDef::new(N::Kind).string_len(64).not_null())
                        .col(ColumnDef::new(N::Title).text().not_null())
                        .col(ColumnDef::new(N::Body).text().not_null())
                        .col(
                            ColumnDef::new(N::CreatedAt)
                                .timestamp_with_time_zone()
                                .not_null(),
                        )
                        .col(ColumnDef::new(N::ReadAt).timestamp_with_time_zone().null())
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("livechat_notifications_customer_created")
                        .table(N::Table)
                        .col(N::TenantId)
                        .col(N::CustomerId)
                        .col(N::CreatedAt)
                        .to_owned(),
                )
                .await
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .drop_table(Table::drop().table(LivechatNotifications::Table).to_owned())
                .await?;
            manager
                .drop_table(Table::drop().table(LivechatTickets::Table).to_owned())
                .await
        }
    }
}

/// The department a ticket's customer asked for
/// (`TicketRequested::department`), so that agents list one team's
/// tickets (`GET /tickets?department=`). Nullable: tickets opened before
/// have none, and nodes of the version before keep inserting tickets
/// during an upgrade.
mod m0002_tickets_department {
    use sea_orm_migration::prelude::*;

    pub(super) struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0002_tickets_department"
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
            db.execute_unprepared("ALTER TABLE livechat_tickets ADD COLUMN department TEXT NULL")
                .await?;
            db.execute_unprepared(
                "CREATE INDEX livechat_tickets_department \
                 ON livechat_tickets (tenant_id, department, created_at, id) \
                 WHERE department IS NOT NULL",
            )
            .await?;
            Ok(())
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            let db = manager.get_connection();
            db.execute_unprepared("DROP INDEX IF EXISTS livechat_tickets_department")
                .await?;
            db.execute_unprepared("ALTER TABLE livechat_tickets DROP COLUMN department")
                .await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use sea_orm_migration::MigratorTrait;
    use sea_orm_migration::sea_orm::ConnectionTrait;

    use super::BridgeMigrator as Migrator;

    /// On SQLite each migration's change commits with its record: a
    /// migration whose record could not be written (refused here by a
    /// trigger; a crash has the same effect) leaves nothing behind, and the
    /// next start applies it.
    #[tokio::test]
    async fn a_migration_whose_record_fails_leaves_nothing_behind() {
        for (done, migration) in Migrator::migrations().iter().enumerate() {
            let name = migration.name().to_owned();
            let db = livechat_core::store::connect("sqlite::memory:")
                .await
                .unwrap();
            livechat_core::store::Migrator::up(&db, None).await.unwrap();
            Migrator::install(&db).await.unwrap();
            if done > 0 {
                Migrator::up(&db, Some(u32::try_from(done).unwrap()))
                    .await
                    .unwrap();
            }
            db.execute_unprepared(&format!(
                "CREATE TRIGGER refuse_record BEFORE INSERT ON livechat_bridge_migrations \
                 WHEN NEW.version = '{name}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            ))
            .await
            .unwrap();
            assert!(Migrator::up(&db, None).await.is_err(), "{name}: refused");
            db.execute_unprepared("DROP TRIGGER refuse_record")
                .await
                .unwrap();
            Migrator::up(&db, None)
                .await
                .unwrap_or_else(|e| panic!("{name} applies again: {e}"));
        }
    }
}
