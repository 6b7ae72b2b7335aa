//! SeaORM entities of the tables in `migrations/`.

#![allow(unreachable_pub)] // the derive macros make every item pub

pub(crate) mod conversations;
pub(crate) mod messages;
pub(crate) mod users;
