//! Names built from the namespace: NATS subjects, streams, consumers, Redis keys.
//!
//! Every deployment (and every test) picks a namespace; nothing it creates on the shared NATS
//! and Redis is named without it, so several live side by side without seeing each other.

use crate::UserId;

/// The operations the store answers over NATS request/reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Register,
    Login,
    User,
    Search,
    Conversations,
    History,
    Backlog,
    LookupClientId,
    Peers,
}

impl StoreOp {
    pub const ALL: [StoreOp; 9] = [
        StoreOp::Register,
        StoreOp::Login,
        StoreOp::User,
        StoreOp::Search,
        StoreOp::Conversations,
        StoreOp::History,
        StoreOp::Backlog,
        StoreOp::LookupClientId,
        StoreOp::Peers,
    ];

    /// The operation's name, as in its subject.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Register => "register",
            StoreOp::Login => "login",
            StoreOp::User => "user",
            StoreOp::Search => "search",
            StoreOp::Conversations => "conversations",
            StoreOp::History => "history",
            StoreOp::Backlog => "backlog",
            StoreOp::LookupClientId => "lookup_client_id",
            StoreOp::Peers => "peers",
        }
    }
}

/// The kinds of work on the store stream, one subject each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreWork {
    /// Persist a message (`Message`). Messages come into the store stream from the in stream,
    /// which it sources, under the in stream's subject.
    Msg,
    /// A device received messages (`StoreAck`).
    Ack,
    /// The recipient read up to a message (`StoreRead`).
    Read,
    /// A user went offline at a time (`StoreSeen`).
    Seen,
}

/// The last token of the in stream's subject (`<ns>.in`).
const IN: &str = "in";

/// Where routers published messages for the store before the store stream sourced the in
/// stream (`<ns>.store.msg`). Still read as messages, so that what an older version left in
/// the store stream is written after an upgrade, not dead-lettered.
const LEGACY_MSG: &str = "msg";

impl StoreWork {
    /// The last token of the subject of a mark (`<ns>.store.<token>`); none for a message.
    fn mark(self) -> Option<&'static str> {
        match self {
            StoreWork::Msg => None,
            StoreWork::Ack => Some("ack"),
            StoreWork::Read => Some("read"),
            StoreWork::Seen => Some("seen"),
        }
    }
}

/// A namespace that is not `[a-z0-9_]{1,32}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceError(pub String);

impl std::fmt::Display for NamespaceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "namespace {:?} must be 1 to 32 characters of [a-z0-9_]",
            self.0
        )
    }
}

impl std::error::Error for NamespaceError {}

/// Generator of every name derived from the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    ns: String,
}

impl Subjects {
    pub fn new(ns: &str) -> Result<Self, NamespaceError> {
        let ok = (1..=32).contains(&ns.len())
            && ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(Subjects { ns: ns.to_owned() })
        } else {
            Err(NamespaceError(ns.to_owned()))
        }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// JetStream stream of messages accepted by gateways.
    pub fn in_stream(&self) -> String {
        format!("{}_IN", self.ns.to_uppercase())
    }

    /// The subject gateways publish accepted messages to.
    pub fn inbound(&self) -> String {
        format!("{}.{IN}", self.ns)
    }

    /// JetStream stream of work for the store.
    pub fn store_stream(&self) -> String {
        format!("{}_STORE", self.ns.to_uppercase())
    }

    /// The store stream's own subjects: the marks. Messages come into it from the in stream.
    pub fn store_all(&self) -> String {
        format!("{}.store.>", self.ns)
    }

    /// The subject of a kind of store work; a message's is the in stream's.
    pub fn store(&self, work: StoreWork) -> String {
        match work.mark() {
            None => self.inbound(),
            Some(mark) => format!("{}.store.{mark}", self.ns),
        }
    }

    /// Which kind of store work a subject carries, if any.
    /// Called for every message the store takes, so it builds no names.
    pub fn store_work_of(&self, subject: &str) -> Option<StoreWork> {
        let rest = subject.strip_prefix(&self.ns)?.strip_prefix('.')?;
        if rest == IN {
            return Some(StoreWork::Msg);
        }
        let rest = rest.strip_prefix("store.")?;
        if rest == LEGACY_MSG {
            return Some(StoreWork::Msg);
        }
        [StoreWork::Ack, StoreWork::Read, StoreWork::Seen]
            .into_iter()
            .find(|w| w.mark() == Some(rest))
    }

    /// Where payloads that can never be processed are moved (core NATS; observe with a
    /// subscription or a stream of your own).
    pub fn dead_letter(&self) -> String {
        format!("{}.dead", self.ns)
    }

    /// Events for every device of one user (core NATS).
    pub fn user(&self, id: UserId) -> String {
        format!("{}.user.{}", self.ns, id)
    }

    /// A session opened (request/reply, router queue group).
    pub fn presence_up(&self) -> String {
        format!("{}.presence.up", self.ns)
    }

    /// A session closed.
    pub fn presence_down(&self) -> String {
        format!("{}.presence.down", self.ns)
    }

    /// A gateway's periodic list of its live sessions.
    pub fn presence_heartbeat(&self) -> String {
        format!("{}.presence.heartbeat", self.ns)
    }

    /// Which of some users are online (request/reply).
    pub fn presence_query(&self) -> String {
        format!("{}.presence.query", self.ns)
    }

    /// A store operation (request/reply, store queue group).
    pub fn rpc(&self, op: StoreOp) -> String {
        format!("{}.rpc.store.{}", self.ns, op.as_str())
    }

    /// Which store operation a subject names, if any.
    pub fn rpc_op_of(&self, subject: &str) -> Option<StoreOp> {
        let rest = subject
            .strip_prefix(&self.ns)?
            .strip_prefix(".rpc.store.")?;
        StoreOp::ALL.into_iter().find(|op| op.as_str() == rest)
    }

    /// Every store operation, for the store's one queue subscription.
    pub fn rpc_all(&self) -> String {
        format!("{}.rpc.store.*", self.ns)
    }

    /// Durable consumer of the router on the in stream.
    pub fn router_consumer(&self) -> &'static str {
        "router"
    }

    /// Durable consumer of the store on the store stream.
    pub fn store_consumer(&self) -> &'static str {
        "store"
    }

    /// Queue group shared by the replicas of a service.
    pub fn queue_group(&self, service: &str) -> String {
        format!("{}.{}", self.ns, service)
    }

    /// Prefix of every Redis key of this namespace.
    pub fn redis_prefix(&self) -> String {
        format!("{}:", self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_namespace() {
        let s = Subjects::new("t1").unwrap();
        assert_eq!(s.in_stream(), "T1_IN");
        assert_eq!(s.inbound(), "t1.in");
        assert_eq!(s.user(42), "t1.user.42");
        assert_eq!(s.store(StoreWork::Ack), "t1.store.ack");
        assert_eq!(s.store(StoreWork::Msg), "t1.in");
        assert_eq!(s.store_work_of("t1.in"), Some(StoreWork::Msg));
        assert_eq!(s.store_work_of("t1.store.msg"), Some(StoreWork::Msg));
        assert_eq!(s.store_work_of("t1.store.other"), None);
        assert_eq!(s.store_work_of("t1.inx"), None);
        assert_eq!(s.store_work_of("t10.in"), None);
        assert_eq!(s.store_work_of("t1.store.read"), Some(StoreWork::Read));
        assert_eq!(s.store_work_of("t2.store.read"), None);
        for op in StoreOp::ALL {
            assert_eq!(s.rpc_op_of(&s.rpc(op)), Some(op));
        }
    }

    #[test]
    fn rejects_namespaces_that_would_break_subjects() {
        for bad in ["", "a.b", "A", "a b", "a>", &"a".repeat(33)] {
            assert!(Subjects::new(bad).is_err(), "{bad:?}");
        }
    }
}
