//! Remembers what may be used once: approval ids until their token expires,
//! DPoP proof `jti`s for as long as their proof could be accepted.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// A set of keys, each remembered until a Unix time. Bounded: expired keys
/// are pruned when it fills up, and if it is still full the tenth expiring
/// soonest are dropped (a flood can only be made of validly signed tokens and
/// proofs, so reaching the bound means the API is under a scale of load
/// where memory, not replay, is the danger).
#[derive(Debug)]
pub(crate) struct ReplayCache {
    seen: Mutex<HashMap<String, u64>>,
    capacity: usize,
}

impl ReplayCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            seen: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// Records `key` until `until` and says whether it was unseen. Check and
    /// record are one step, so two concurrent arrivals cannot both pass.
    pub(crate) fn first_use(&self, key: &str, until: u64, now: u64) -> bool {
        // The map stays consistent even if a holder panicked: take it back.
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.get(key).is_some_and(|&expiry| expiry >= now) {
            return false;
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, expiry| *expiry >= now);
        }
        if seen.len() >= self.capacity {
            let mut expiries: Vec<u64> = seen.values().copied().collect();
            let nth = expiries.len() / 10;
            let (_, threshold, _) = expiries.select_nth_unstable(nth);
            let threshold = *threshold;
            seen.retain(|_, expiry| *expiry > threshold);
        }
        seen.insert(key.to_owned(), until);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_until_expiry_then_again() {
        let cache = ReplayCache::new(10);
        assert!(cache.first_use("a", 100, 50));
        assert!(!cache.first_use("a", 100, 60));
        assert!(!cache.first_use("a", 100, 100));
        assert!(cache.first_use("a", 200, 101), "forgotten once expired");
    }

    #[test]
    fn stays_bounded() {
        let cache = ReplayCache::new(100);
        for i in 0..1000 {
            assert!(cache.first_use(&i.to_string(), 10_000 + i, 0));
        }
        assert!(cache.seen.lock().unwrap().len() <= 100);
        assert!(!cache.first_use("999", 20_000, 0), "the latest are kept");
    }
}
