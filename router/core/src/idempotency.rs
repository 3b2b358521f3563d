//! The idempotency window: which recent keys of a channel map to which offset, within a
//! node-wide budget.
//!
//! It owns each channel's [`Window`] (every key held once, shared by the lookup map and the
//! expiry queue) and the node's [`Budget`] of keys and bytes that all windows draw from.
//! Keys expire by time, whether or not the channel sees another publish (the owner expires
//! every window on each maintenance snapshot). Over budget, a window first gives up its own
//! oldest keys; a key it still cannot hold is not remembered, and the metric says so. It
//! must never touch the store or block: it is plain memory inside one owner task.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes a remembered key costs beyond its own length (map and queue entries).
const ENTRY_OVERHEAD: usize = 64;

/// The node-wide allowance every channel's window draws from.
#[derive(Debug)]
pub struct Budget {
    /// Keys held now, over all windows.
    keys: AtomicUsize,
    /// Bytes held now, over all windows.
    bytes: AtomicUsize,
    /// Most keys.
    max_keys: usize,
    /// Most bytes.
    max_bytes: usize,
}

impl Budget {
    /// A budget of `max_keys` keys and `max_bytes` bytes.
    pub fn new(max_keys: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self { keys: AtomicUsize::new(0), bytes: AtomicUsize::new(0), max_keys, max_bytes })
    }

    /// Keys held now.
    pub fn keys(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Reserves one key of `cost` bytes; false (nothing reserved) when over budget.
    fn take(&self, cost: usize) -> bool {
        let keys = self.keys.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = self.bytes.fetch_add(cost, Ordering::Relaxed) + cost;
        if keys > self.max_keys || bytes > self.max_bytes {
            self.give(cost);
            return false;
        }
        true
    }

    fn give(&self, cost: usize) {
        self.keys.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(cost, Ordering::Relaxed);
    }
}

fn cost(key: &str) -> usize {
    key.len() + ENTRY_OVERHEAD
}

/// Recently used idempotency keys of one channel.
#[derive(Debug)]
pub(crate) struct Window {
    offsets: HashMap<Arc<str>, u64>,
    /// Accept time (ms) and key, oldest first.
    order: VecDeque<(u64, Arc<str>)>,
    budget: Arc<Budget>,
}

impl Window {
    pub(crate) fn new(budget: Arc<Budget>) -> Self {
        Self { offsets: HashMap::new(), order: VecDeque::new(), budget }
    }

    /// The offset a key was stored at, if it is still remembered.
    pub(crate) fn get(&self, key: &str) -> Option<u64> {
        self.offsets.get(key).copied()
    }

    /// Forgets keys accepted before `cutoff_ms`.
    pub(crate) fn expire(&mut self, cutoff_ms: u64) {
        while self.order.front().is_some_and(|(ts, _)| *ts < cutoff_ms) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) -> bool {
        let Some((_, key)) = self.order.pop_front() else { return false };
        if self.offsets.remove(&key).is_some() {
            self.budget.give(cost(&key));
        }
        true
    }

    /// Remembers `key` → `offset`. False when the node's budget has no room even after this
    /// window gave up all its older keys: the key is then not remembered.
    pub(crate) fn insert(&mut self, key: &str, offset: u64, ts: u64) -> bool {
        let c = cost(key);
        while !self.budget.take(c) {
            if !self.pop_oldest() {
                return false;
            }
        }
        let key: Arc<str> = key.into();
        if let Some(_old) = self.offsets.insert(key.clone(), offset) {
            // Re-inserted while still held (a restart rebuild): one reservation per key.
            self.budget.give(c);
        }
        self.order.push_back((ts, key));
        true
    }

    /// True when it holds no key.
    pub(crate) fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Keys held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.offsets.len()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        for key in self.offsets.keys() {
            self.budget.give(cost(key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_expire_by_time_and_give_their_budget_back() {
        let budget = Budget::new(100, 1 << 20);
        let mut w = Window::new(budget.clone());
        assert!(w.insert("a", 1, 10));
        assert!(w.insert("b", 2, 20));
        assert_eq!((w.get("a"), w.get("b"), budget.keys()), (Some(1), Some(2), 2));
        w.expire(15);
        assert_eq!((w.get("a"), w.get("b"), budget.keys()), (None, Some(2), 1));
        drop(w);
        assert_eq!((budget.keys(), budget.bytes()), (0, 0));
    }

    #[test]
    fn over_budget_a_window_gives_up_its_oldest_then_refuses() {
        let budget = Budget::new(3, 1 << 20);
        let mut busy = Window::new(budget.clone());
        let mut other = Window::new(budget.clone());
        assert!(other.insert("x", 1, 0));
        for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
            assert!(busy.insert(k, i as u64 + 1, i as u64));
        }
        // Three keys at most: busy dropped its own oldest ("a", then "b") to make room.
        assert_eq!((busy.len(), other.len(), budget.keys()), (2, 1, 3));
        assert_eq!((busy.get("a"), busy.get("d")), (None, Some(4)));
        // A window with nothing to give up is refused when the node is full.
        let full = Budget::new(1, 1 << 20);
        let mut first = Window::new(full.clone());
        let mut second = Window::new(full.clone());
        assert!(first.insert("k", 1, 0));
        assert!(!second.insert("k", 1, 0));
        assert_eq!(second.get("k"), None);
    }

    #[test]
    fn bytes_are_bounded_too() {
        let budget = Budget::new(1000, 3 * (ENTRY_OVERHEAD + 10));
        let mut w = Window::new(budget.clone());
        for i in 0..10u64 {
            assert!(w.insert(&format!("{i:010}"), i, i));
        }
        assert_eq!(w.len(), 3);
        assert!(budget.bytes() <= 3 * (ENTRY_OVERHEAD + 10));
    }
}
