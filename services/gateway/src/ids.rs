//! Message ids, and the per-connection memory of ids already pushed.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use uuid::Uuid;

/// Hands out UUIDv7 ids that strictly increase within this process, even when the clock
/// stalls or steps back: a sender's messages keep the order its connection sent them in.
#[derive(Default)]
pub(crate) struct MsgIds {
    // A plain mutex: the critical section is a comparison and an add.
    last: Mutex<u128>,
}

impl MsgIds {
    pub(crate) fn next(&self) -> Uuid {
        let fresh = Uuid::now_v7().as_u128();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // Past the last id, bump the random tail by one: still a valid v7 (the version and
        // variant bits sit above the low 62 bits being incremented).
        let id = if fresh > *last { fresh } else { *last + 1 };
        *last = id;
        Uuid::from_u128(id)
    }
}

/// The ids of messages already pushed to one connection, so the fast and sure paths and the
/// backlog deliver each message to it once. Bounded to the most recent `capacity` ids, except
/// while `grow` is set (during a backlog replay every replayed id must be remembered until
/// the messages that arrived meanwhile are flushed).
pub(crate) struct RecentIds {
    set: HashSet<u128>,
    order: VecDeque<u128>,
    capacity: usize,
    grow: bool,
}

impl RecentIds {
    pub(crate) fn new(capacity: usize) -> Self {
        RecentIds {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity,
            grow: false,
        }
    }

    /// Records `id`; false when it was already there.
    pub(crate) fn insert(&mut self, id: Uuid) -> bool {
        let key = id.as_u128();
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if !self.grow {
            self.trim();
        }
        true
    }

    pub(crate) fn set_grow(&mut self, grow: bool) {
        self.grow = grow;
        if !grow {
            self.trim();
        }
    }

    fn trim(&mut self) {
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_strictly_increase_and_stay_v7() {
        let ids = MsgIds::default();
        let mut prev = ids.next();
        for _ in 0..10_000 {
            let id = ids.next();
            assert!(id > prev);
            assert!(id.to_string() > prev.to_string());
            assert_eq!(id.get_version_num(), 7);
            prev = id;
        }
    }

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut r = RecentIds::new(2);
        let [a, b, c] = [1u128, 2, 3].map(Uuid::from_u128);
        assert!(r.insert(a));
        assert!(!r.insert(a));
        assert!(r.insert(b));
        assert!(r.insert(c));
        assert!(r.insert(a), "a was evicted");
        r.set_grow(true);
        for i in 10..20 {
            r.insert(Uuid::from_u128(i));
        }
        assert!(!r.insert(Uuid::from_u128(10)), "kept while growing");
        r.set_grow(false);
        assert!(r.insert(Uuid::from_u128(10)), "trimmed after");
    }
}
