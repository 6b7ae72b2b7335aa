use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub username: String,
    /// argon2id, PHC string format.
    pub password_hash: String,
    pub created_at: i64,
    pub last_seen: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

impl Model {
    pub(crate) fn info(&self) -> chat_proto::envelope::UserInfo {
        chat_proto::envelope::UserInfo {
            user_id: self.id,
            username: self.username.clone(),
            last_seen: self.last_seen,
        }
    }
}
