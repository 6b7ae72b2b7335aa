//! The MySQL schema, as sea-orm migrations. The store applies pending ones when it starts
//! (and `chat-store --migrate-only` applies them and exits). Plain SQL that both MySQL 8 and
//! MariaDB accept; utf8mb4 throughout so emoji round-trip.

pub use sea_orm_migration::prelude::*;

mod m20261128_000001_initial;
mod m20261207_000001_conversations_unindexed;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_initial::Migration),
            Box::new(m20261207_000001_conversations_unindexed::Migration),
        ]
    }
}
