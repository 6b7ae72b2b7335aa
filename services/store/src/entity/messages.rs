use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "messages")]
pub struct Model {
    /// UUIDv7 as BINARY(16): byte order is time order is conversation order.
    #[sea_orm(primary_key, auto_increment = false)]
    pub msg_id: Uuid,
    pub sender_id: i64,
    pub recipient_id: i64,
    /// min(sender, recipient) and max(...): the conversation, whichever way a message went.
    pub user_lo: i64,
    pub user_hi: i64,
    pub client_id: String,
    #[sea_orm(column_type = "Text")]
    pub body: String,
    /// `chat_proto::Status` as a number.
    pub status: i16,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
    pub read_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

impl From<Model> for chat_proto::Message {
    fn from(m: Model) -> Self {
        chat_proto::Message {
            msg_id: m.msg_id.hyphenated().to_string(),
            from: m.sender_id,
            to: m.recipient_id,
            body: m.body,
            ts: m.created_at,
            client_id: m.client_id,
            status: chat_proto::Status::from_i16(m.status),
        }
    }
}
