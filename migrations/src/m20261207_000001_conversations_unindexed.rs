//! The conversations' newest-message index goes: every message moved two of its entries
//! (its two users' pointers), which cost MariaDB a sixth of its CPU under load, to speed up
//! a list that reads one user's rows anyway (docs/benchmarks.md, the changes table).

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261207_000001_conversations_unindexed"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE conversations DROP INDEX ix_conversations_recent")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "ALTER TABLE conversations ADD INDEX ix_conversations_recent (user_id, last_msg_id)",
            )
            .await?;
        Ok(())
    }
}
