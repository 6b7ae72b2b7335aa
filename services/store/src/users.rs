//! Accounts: registration, password checks (argon2id), lookup and search, last seen.

use std::collections::BTreeMap;

use chat_proto::envelope::{Credentials, Search, UserInfo};
use chat_proto::limits::{valid_password, valid_username};
use chat_proto::{ErrorBody, ErrorCode, UserId};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait,
    QueryFilter, Set, SqlErr, Statement,
};

use crate::entity::users;
use crate::error::Error;
use crate::messages::{filled_lists, placeholders};
use crate::password;

/// Creates an account. Usernames are unique case-insensitively (the column's collation).
pub(crate) async fn register(
    db: &DatabaseConnection,
    req: Credentials,
) -> Result<Result<UserInfo, ErrorBody>, Error> {
    if !valid_username(&req.username) {
        return Ok(Err(ErrorBody::new(
            ErrorCode::InvalidUsername,
            "a username is 3 to 32 characters of letters, digits, '_', '.' and '-'",
        )));
    }
    if !valid_password(&req.password) {
        return Ok(Err(ErrorBody::new(
            ErrorCode::InvalidPassword,
            "a password is 8 to 256 characters",
        )));
    }
    let password_hash = password::hash(req.password).await;
    let user = users::ActiveModel {
        username: Set(req.username),
        password_hash: Set(password_hash),
        created_at: Set(chat_proto::now_ms()),
        ..Default::default()
    };
    match user.insert(db).await {
        Ok(u) => Ok(Ok(u.info())),
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => Ok(Err(
            ErrorBody::new(ErrorCode::UsernameTaken, "that username is taken"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Checks a password. An unknown user costs the same hashing as a known one, so timing does
/// not tell which usernames exist.
pub(crate) async fn login(
    db: &DatabaseConnection,
    req: Credentials,
) -> Result<Result<UserInfo, ErrorBody>, Error> {
    let user = users::Entity::find()
        .filter(users::Column::Username.eq(req.username.as_str()))
        .one(db)
        .await?;
    let stored = user.as_ref().map(|u| u.password_hash.clone());
    let ok = verify(req.password, stored).await;
    match user {
        Some(u) if ok => Ok(Ok(u.info())),
        _ => Ok(Err(ErrorBody::new(
            ErrorCode::BadCredentials,
            "wrong username or password",
        ))),
    }
}

/// A hash of a random password nobody knows, to verify against when the user is unknown.
static DECOY_HASH: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

async fn verify(password: String, stored: Option<String>) -> bool {
    let known = stored.is_some();
    let stored = match stored {
        Some(s) => s,
        None => DECOY_HASH
            .get_or_init(|| password::hash(uuid::Uuid::new_v4().to_string()))
            .await
            .clone(),
    };
    password::verify(password, stored).await && known
}

pub(crate) async fn get(db: &DatabaseConnection, id: UserId) -> Result<Option<UserInfo>, Error> {
    Ok(users::Entity::find_by_id(id)
        .one(db)
        .await?
        .map(|u| u.info()))
}

/// Users whose name starts with the prefix (case-insensitively), in name order.
pub(crate) async fn search(db: &DatabaseConnection, req: Search) -> Result<Vec<UserInfo>, Error> {
    // LIKE with '!' as the escape character, so '%' and '_' in the prefix match themselves.
    let escaped: String = req
        .prefix
        .chars()
        .flat_map(|c| match c {
            '!' | '%' | '_' => vec!['!', c],
            c => vec![c],
        })
        .collect();
    let rows = users::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::MySql,
            "SELECT * FROM users WHERE username LIKE ? ESCAPE '!' AND id <> ? \
             ORDER BY username LIMIT ?",
            [
                format!("{escaped}%").into(),
                req.exclude.into(),
                req.limit.into(),
            ],
        ))
        .all(db)
        .await?;
    Ok(rows.iter().map(users::Model::info).collect())
}

/// Records when users were last online, one statement per 256 of them: a gateway that stops
/// takes thousands offline at once, and one commit each kept the store (and every connect
/// waiting for it to settle) busy for seconds. Never moves a time backwards; a user named
/// twice keeps the later time.
pub(crate) async fn seen(db: &impl ConnectionTrait, seen: &[(UserId, i64)]) -> Result<(), Error> {
    let mut latest: BTreeMap<UserId, i64> = BTreeMap::new();
    for &(id, at) in seen {
        let time = latest.entry(id).or_insert(at);
        *time = (*time).max(at);
    }
    let latest: Vec<(UserId, i64)> = latest.into_iter().collect();
    if latest.is_empty() {
        return Ok(());
    }
    for list in filled_lists(&latest) {
        let sql = format!(
            "UPDATE users SET last_seen = GREATEST(COALESCE(last_seen, 0), CASE id {} END) \
             WHERE id IN ({})",
            vec!["WHEN ? THEN ?"; list.len()].join(" "),
            placeholders(list.len(), "?"),
        );
        let times = list.iter().flat_map(|&(id, at)| [id.into(), at.into()]);
        let ids = list.iter().map(|&(id, _)| id.into());
        let values: Vec<sea_orm::Value> = times.chain(ids).collect();
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            sql,
            values,
        ))
        .await?;
    }
    Ok(())
}
