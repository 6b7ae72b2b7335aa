//! Messages: writing batches idempotently, delivery and read marks, backlog and history pages,
//! and the conversation list.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chat_proto::envelope::{ConversationRow, History, Page};
use chat_proto::limits::BACKLOG_PAGE_BYTES;
use chat_proto::{Message, Status, UserId};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement, TransactionTrait, Value,
};
use uuid::Uuid;

use crate::entity::{conversations, messages, users};
use crate::error::Error;

/// A message id from the wire; the caller has validated its shape.
pub(crate) fn parse_id(id: &str) -> Option<Uuid> {
    Uuid::try_parse(id).ok()
}

pub(crate) fn placeholders(n: usize, one: &str) -> String {
    vec![one; n].join(",")
}

/// The most items one list of [`filled_lists`] holds.
const LIST_MAX: usize = 256;

/// Splits items into lists of up to [`LIST_MAX`], each filled up to a power of two by
/// repeating its last item: as few statements as there are 256s, and a statement with one
/// placeholder group per item comes in at most nine shapes (1, 2, 4, ..., 256). Only for
/// statements where an item twice is the same as once: an `IN (...)` list of ids, an insert
/// that skips a row already there, or an upsert whose update keeps the greater value.
///
/// Why the shapes: sqlx caches 100 prepared statements per connection and closes the oldest
/// when a new shape comes. The close has no reply, and sqlx 0.9.0 does not set TCP_NODELAY on
/// its sockets (sqlx issue #4335), so the statement written right after it waits for the
/// server's delayed ACK: ~40 ms per batch when every batch size was a statement of its own
/// (measured with `chat-bench backlog`: 35 ms mean per persist before, see
/// docs/benchmarks.md). Why filled rather than cut into power-of-two runs: one statement, one
/// round trip, where runs took up to eight.
pub(crate) fn filled_lists<T: Clone>(items: &[T]) -> impl Iterator<Item = Vec<T>> + '_ {
    items.chunks(LIST_MAX).map(|chunk| {
        let mut list = chunk.to_vec();
        let last = chunk[chunk.len() - 1].clone();
        list.resize(chunk.len().next_power_of_two(), last);
        list
    })
}

/// What one batch of store work wrote: see [`persist`] and [`deliver`].
#[derive(Debug, Default)]
pub(crate) struct Written {
    /// For each message, whether it is stored now.
    pub(crate) stored: Vec<bool>,
    /// For each delivery mark, what it found.
    pub(crate) marked: Vec<Marked>,
}

/// Writes a batch's messages, then its delivery marks (which may name those messages), in
/// one transaction: one commit, so one flush of the redo log, for the whole batch. Running it
/// again with the same input changes nothing but the receipts it reports again. The marks'
/// read sees the transaction's snapshot (taken by the messages' read-back): a message another
/// replica commits meanwhile counts as not stored yet, and its mark is retried.
pub(crate) async fn write(
    db: &DatabaseConnection,
    batch: &[(Uuid, &Message)],
    marks: &[(UserId, Vec<Uuid>)],
) -> Result<Written, Error> {
    if batch.is_empty() && marks.is_empty() {
        return Ok(Written::default());
    }
    let txn = db.begin().await?;
    let stored = persist(&txn, batch).await?;
    let marked = deliver(&txn, marks).await?;
    txn.commit().await?;
    Ok(Written { stored, marked })
}

/// Inserts the messages that are not stored yet and moves each conversation's newest-message
/// pointer. Returns, for each input, whether a message with its id is stored now: `false`
/// only when the sender already has another message with that `client_id` (a retry that came
/// after JetStream's de-dup window), which is not written. Running it again with the same
/// input changes nothing: redelivery is harmless.
async fn persist(
    txn: &impl ConnectionTrait,
    batch: &[(Uuid, &Message)],
) -> Result<Vec<bool>, Error> {
    // A row twice is inserted once: the second finds the first and changes nothing.
    for run in filled_lists(batch) {
        let mut values: Vec<Value> = Vec::with_capacity(run.len() * 8);
        for (id, m) in &run {
            values.extend([
                (*id).into(),
                m.from.into(),
                m.to.into(),
                m.from.min(m.to).into(),
                m.from.max(m.to).into(),
                m.client_id.clone().into(),
                m.body.clone().into(),
                m.ts.into(),
            ]);
        }
        let sql = format!(
            "INSERT INTO messages (msg_id, sender_id, recipient_id, user_lo, user_hi, client_id, body, created_at) \
             VALUES {} ON DUPLICATE KEY UPDATE msg_id = msg_id",
            placeholders(run.len(), "(?,?,?,?,?,?,?,?)")
        );
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            sql,
            values,
        ))
        .await?;
    }
    // Which ids are stored now is read back: the count of affected rows cannot tell. sqlx
    // connects with CLIENT_FOUND_ROWS, so a row whose (sender, client_id) another id holds
    // counts as found, like one inserted.
    let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
    let mut stored = HashSet::new();
    for run in filled_lists(&ids) {
        stored.extend(
            messages::Entity::find()
                .select_only()
                .column(messages::Column::MsgId)
                .filter(messages::Column::MsgId.is_in(run.iter().copied()))
                .into_tuple::<Uuid>()
                .all(txn)
                .await?,
        );
    }
    // Both users' rows of each conversation, newest id per row, in key order so that
    // concurrent stores lock rows in the same order.
    let mut pointers: BTreeMap<(UserId, UserId), Uuid> = BTreeMap::new();
    for (id, m) in batch.iter().filter(|(id, _)| stored.contains(id)) {
        for key in [(m.from, m.to), (m.to, m.from)] {
            let newest = pointers.entry(key).or_insert(*id);
            *newest = (*newest).max(*id);
        }
    }
    let pointers: Vec<((UserId, UserId), Uuid)> = pointers.into_iter().collect();
    for run in filled_lists(&pointers) {
        let mut values: Vec<Value> = Vec::with_capacity(run.len() * 3);
        for ((user, peer), id) in &run {
            values.extend([(*user).into(), (*peer).into(), (*id).into()]);
        }
        let sql = format!(
            "INSERT INTO conversations (user_id, peer_id, last_msg_id) VALUES {} \
             ON DUPLICATE KEY UPDATE last_msg_id = GREATEST(last_msg_id, VALUES(last_msg_id))",
            placeholders(run.len(), "(?,?,?)")
        );
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            sql,
            values,
        ))
        .await?;
    }
    Ok(batch.iter().map(|(id, _)| stored.contains(id)).collect())
}

/// What a delivery or read mark found.
#[derive(Debug, Default)]
pub(crate) struct Marked {
    /// (message, its sender) pairs whose sender is to be told.
    pub(crate) receipts: Vec<(Uuid, UserId)>,
    /// Ids not stored (yet): the mark came before the message's write.
    pub(crate) missing: usize,
}

/// Marks, for each `(user, ids)` of a batch of delivery marks, the named messages to `user` as
/// delivered, with one SELECT and one UPDATE per 256 ids for the whole batch (not per mark:
/// a receiver acks a few ids at a time, so marks outnumber everything else the store does).
/// Receipts are due for every named message to `user` that is delivered now (one already
/// read keeps its stronger receipt); a message to someone else is ignored.
async fn deliver(
    db: &impl ConnectionTrait,
    marks: &[(UserId, Vec<Uuid>)],
) -> Result<Vec<Marked>, Error> {
    let ids: Vec<Uuid> = marks
        .iter()
        .flat_map(|(_, ids)| ids.iter().copied())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // msg_id → (sender, recipient, status)
    let mut found: HashMap<Uuid, (UserId, UserId, Status)> = HashMap::with_capacity(ids.len());
    for run in filled_lists(&ids) {
        let rows: Vec<(Uuid, UserId, UserId, i16)> = messages::Entity::find()
            .select_only()
            .columns([
                messages::Column::MsgId,
                messages::Column::SenderId,
                messages::Column::RecipientId,
                messages::Column::Status,
            ])
            .filter(messages::Column::MsgId.is_in(run.iter().copied()))
            .into_tuple()
            .all(db)
            .await?;
        found.extend(
            rows.into_iter()
                .map(|(id, from, to, status)| (id, (from, to, Status::from_i16(status)))),
        );
    }
    // Only the recipient's own acks count, and only messages not delivered yet change.
    let fresh: Vec<Uuid> = marks
        .iter()
        .flat_map(|(user, ids)| ids.iter().map(move |id| (*user, *id)))
        .filter(|(user, id)| {
            found
                .get(id)
                .is_some_and(|(_, to, status)| to == user && *status == Status::Sent)
        })
        .map(|(_, id)| id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let now = chat_proto::now_ms();
    for run in filled_lists(&fresh) {
        let mut values: Vec<Value> = vec![now.into()];
        values.extend(run.iter().map(|id| Value::from(*id)));
        let sql = format!(
            "UPDATE messages SET status = 1, delivered_at = ? WHERE status = 0 AND msg_id IN ({})",
            placeholders(run.len(), "?")
        );
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            sql,
            values,
        ))
        .await?;
    }
    Ok(marks
        .iter()
        .map(|(user, ids)| {
            let distinct: BTreeSet<&Uuid> = ids.iter().collect();
            Marked {
                missing: distinct.iter().filter(|id| !found.contains_key(id)).count(),
                receipts: distinct
                    .into_iter()
                    .filter_map(|id| {
                        let (from, to, status) = found.get(id)?;
                        (to == user && *status != Status::Read).then_some((*id, *from))
                    })
                    .collect(),
            }
        })
        .collect())
}

/// Marks every message from `peer` to `user` up to `up_to` as read. `None` when `up_to` is not
/// a stored message of their conversation (yet).
pub(crate) async fn read(
    db: &DatabaseConnection,
    user: UserId,
    peer: UserId,
    up_to: Uuid,
) -> Result<Option<()>, Error> {
    let exists = messages::Entity::find_by_id(up_to)
        .filter(messages::Column::UserLo.eq(user.min(peer)))
        .filter(messages::Column::UserHi.eq(user.max(peer)))
        .one(db)
        .await?;
    if exists.is_none() {
        return Ok(None);
    }
    let now = chat_proto::now_ms();
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::MySql,
        "UPDATE messages SET status = 2, read_at = ?, delivered_at = COALESCE(delivered_at, ?) \
         WHERE recipient_id = ? AND status < 2 AND msg_id <= ? AND sender_id = ?",
        [
            now.into(),
            now.into(),
            user.into(),
            up_to.into(),
            peer.into(),
        ],
    ))
    .await?;
    Ok(Some(()))
}

/// Messages to `user` that no device has acknowledged, after `after`, oldest first; a page
/// stops early once its bodies reach [`BACKLOG_PAGE_BYTES`].
pub(crate) async fn backlog(
    db: &DatabaseConnection,
    user: UserId,
    after: Option<Uuid>,
    limit: u32,
) -> Result<Page, Error> {
    let mut query = messages::Entity::find()
        .filter(messages::Column::RecipientId.eq(user))
        .filter(messages::Column::Status.eq(Status::Sent.as_i16()));
    if let Some(after) = after {
        query = query.filter(messages::Column::MsgId.gt(after));
    }
    let rows = query
        .order_by_asc(messages::Column::MsgId)
        .limit(u64::from(limit) + 1)
        .all(db)
        .await?;
    let mut has_more = rows.len() > limit as usize;
    let mut bytes = 0;
    let mut messages = Vec::new();
    for row in rows.into_iter().take(limit as usize) {
        if bytes >= BACKLOG_PAGE_BYTES {
            has_more = true;
            break;
        }
        bytes += row.body.len() + 200;
        messages.push(Message::from(row));
    }
    Ok(Page { messages, has_more })
}

/// A page of a conversation, oldest first, ending just before `before` (or the newest page).
pub(crate) async fn history(
    db: &DatabaseConnection,
    req: &History,
    before: Option<Uuid>,
) -> Result<Page, Error> {
    let mut query = messages::Entity::find()
        .filter(messages::Column::UserLo.eq(req.user_id.min(req.peer)))
        .filter(messages::Column::UserHi.eq(req.user_id.max(req.peer)));
    if let Some(before) = before {
        query = query.filter(messages::Column::MsgId.lt(before));
    }
    let mut rows = query
        .order_by_desc(messages::Column::MsgId)
        .limit(u64::from(req.limit) + 1)
        .all(db)
        .await?;
    let has_more = rows.len() > req.limit as usize;
    rows.truncate(req.limit as usize);
    rows.reverse();
    Ok(Page {
        messages: rows.into_iter().map(Message::from).collect(),
        has_more,
    })
}

/// The message a sender made with a client id, if stored.
pub(crate) async fn by_client_id(
    db: &DatabaseConnection,
    from: UserId,
    client_id: &str,
) -> Result<Option<Message>, Error> {
    Ok(messages::Entity::find()
        .filter(messages::Column::SenderId.eq(from))
        .filter(messages::Column::ClientId.eq(client_id))
        .one(db)
        .await?
        .map(Message::from))
}

/// How many conversations the list shows at most.
const CONVERSATIONS_MAX: u64 = 200;

/// The user's conversations, newest first, with the peer, last message and unread count.
pub(crate) async fn conversations(
    db: &DatabaseConnection,
    user: UserId,
) -> Result<Vec<ConversationRow>, Error> {
    let rows = conversations::Entity::find()
        .filter(conversations::Column::UserId.eq(user))
        .order_by_desc(conversations::Column::LastMsgId)
        .limit(CONVERSATIONS_MAX)
        .all(db)
        .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let last: HashMap<Uuid, messages::Model> = messages::Entity::find()
        .filter(messages::Column::MsgId.is_in(rows.iter().map(|r| r.last_msg_id)))
        .all(db)
        .await?
        .into_iter()
        .map(|m| (m.msg_id, m))
        .collect();
    let peers: HashMap<UserId, users::Model> = users::Entity::find()
        .filter(users::Column::Id.is_in(rows.iter().map(|r| r.peer_id)))
        .all(db)
        .await?
        .into_iter()
        .map(|u| (u.id, u))
        .collect();
    let unread: HashMap<UserId, i64> = messages::Entity::find()
        .select_only()
        .column(messages::Column::SenderId)
        .column_as(messages::Column::MsgId.count(), "unread")
        .filter(messages::Column::RecipientId.eq(user))
        .filter(messages::Column::Status.lt(Status::Read.as_i16()))
        .group_by(messages::Column::SenderId)
        .into_tuple::<(UserId, i64)>()
        .all(db)
        .await?
        .into_iter()
        .collect();
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            Some(ConversationRow {
                peer: peers.get(&r.peer_id)?.info(),
                last_message: last.get(&r.last_msg_id)?.clone().into(),
                unread: unread.get(&r.peer_id).copied().unwrap_or(0).max(0) as u64,
            })
        })
        .collect())
}

/// Everyone who shares a conversation with the user: who hears of their presence.
pub(crate) async fn peers(db: &DatabaseConnection, user: UserId) -> Result<Vec<UserId>, Error> {
    Ok(conversations::Entity::find()
        .select_only()
        .column(conversations::Column::PeerId)
        .filter(conversations::Column::UserId.eq(user))
        .into_tuple::<UserId>()
        .all(db)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::{LIST_MAX, filled_lists};
    use uuid::Uuid;

    #[test]
    fn filled_lists_are_powers_of_two_holding_every_item_in_order() {
        let ids: Vec<Uuid> = (0..300u128).map(Uuid::from_u128).collect();
        for n in [1, 2, 3, 10, 255, 256, 257, 300] {
            let lists: Vec<Vec<Uuid>> = filled_lists(&ids[..n]).collect();
            for list in &lists {
                assert!(list.len().is_power_of_two() && list.len() <= LIST_MAX);
            }
            let mut distinct: Vec<Uuid> = lists.concat();
            distinct.dedup();
            assert_eq!(distinct, ids[..n], "{n} ids");
            assert_eq!(lists.len(), n.div_ceil(LIST_MAX), "{n} ids");
        }
        assert_eq!(filled_lists::<Uuid>(&[]).count(), 0);
    }
}
