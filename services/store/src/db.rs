//! Connecting to MySQL: the database is created when missing and migrated under a lock, so
//! several stores starting at once migrate it once.

use std::time::Duration;

use chat_migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
    TransactionTrait,
};

use crate::error::Error;

/// Connects to `url`, creating its database (utf8mb4) if it does not exist.
pub(crate) async fn connect(url: &str) -> Result<DatabaseConnection, Error> {
    let parsed = url::Url::parse(url).map_err(|_| Error::DatabaseUrl(url.to_owned()))?;
    let name = parsed.path().trim_start_matches('/');
    let valid = parsed.scheme() == "mysql"
        && !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(Error::DatabaseUrl(url.to_owned()));
    }
    let shown = redacted(&parsed);
    let unreachable = |source| Error::DbConnect {
        url: shown.clone(),
        source,
    };
    let mut server = parsed.clone();
    server.set_path("/");
    let admin = Database::connect(options(server.as_str(), 1))
        .await
        .map_err(unreachable)?;
    // The name was checked above to be [A-Za-z0-9_]: safe to quote as an identifier.
    admin
        .execute_unprepared(&format!(
            "CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ))
        .await?;
    admin.close().await?;
    Database::connect(options(url, 16))
        .await
        .map_err(unreachable)
}

fn options(url: &str, max: u32) -> ConnectOptions {
    let mut o = ConnectOptions::new(url);
    o.max_connections(max)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10))
        // A ping only for a connection idle 10 s or more, not before every query (pings were
        // half of all commands the server saw under load, a round trip each). A hot
        // connection that died fails its query instead, and every caller retries.
        .test_before_acquire_if_idle_for(Duration::from_secs(10))
        .sqlx_logging(false);
    o
}

/// The URL without its password, for messages.
fn redacted(url: &url::Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

/// Applies pending migrations. A MySQL named lock (held by one pinned connection) makes
/// concurrent stores take turns; the second finds nothing left to do.
pub(crate) async fn migrate(db: &DatabaseConnection) -> Result<(), Error> {
    let lock = db.begin().await?;
    let name = "CONCAT('chat_migrate_', DATABASE())";
    lock.execute_raw(Statement::from_string(
        DbBackend::MySql,
        format!("SELECT GET_LOCK({name}, 120)"),
    ))
    .await?;
    let result = Migrator::up(db, None).await;
    lock.execute_raw(Statement::from_string(
        DbBackend::MySql,
        format!("SELECT RELEASE_LOCK({name})"),
    ))
    .await?;
    lock.commit().await?;
    Ok(result?)
}
