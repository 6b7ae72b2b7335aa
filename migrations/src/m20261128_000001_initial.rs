//! Users, messages and the per-user conversation index.

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000001_initial"
    }
}

const UP: &[&str] = &[
    // Usernames are unique case-insensitively: the _ci collation compares them so.
    "CREATE TABLE users (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        username VARCHAR(32) NOT NULL,
        password_hash VARCHAR(255) NOT NULL,
        created_at BIGINT NOT NULL,
        last_seen BIGINT NULL,
        UNIQUE KEY uq_users_username (username)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
    // msg_id is a UUIDv7: its bytes sort in time order, so it is both key and order.
    // user_lo/user_hi name the conversation whichever way the message went (history index);
    // client_id compares byte for byte (utf8mb4_bin), as the sender's idempotency key must.
    "CREATE TABLE messages (
        msg_id BINARY(16) NOT NULL PRIMARY KEY,
        sender_id BIGINT NOT NULL,
        recipient_id BIGINT NOT NULL,
        user_lo BIGINT NOT NULL,
        user_hi BIGINT NOT NULL,
        client_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
        body TEXT NOT NULL,
        status SMALLINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        delivered_at BIGINT NULL,
        read_at BIGINT NULL,
        UNIQUE KEY uq_messages_sender_client (sender_id, client_id),
        KEY ix_messages_backlog (recipient_id, status, msg_id),
        KEY ix_messages_pair (user_lo, user_hi, msg_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
    // One row per user and peer, pointing at the newest message between them: the
    // conversation list is one indexed scan. (The index on the pointer was dropped again
    // by m20261207_000001: moving it on every message cost more than it saved.)
    "CREATE TABLE conversations (
        user_id BIGINT NOT NULL,
        peer_id BIGINT NOT NULL,
        last_msg_id BINARY(16) NOT NULL,
        PRIMARY KEY (user_id, peer_id),
        KEY ix_conversations_recent (user_id, last_msg_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
];

const DOWN: &[&str] = &[
    "DROP TABLE conversations",
    "DROP TABLE messages",
    "DROP TABLE users",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for sql in UP {
            manager.get_connection().execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for sql in DOWN {
            manager.get_connection().execute_unprepared(sql).await?;
        }
        Ok(())
    }
}
