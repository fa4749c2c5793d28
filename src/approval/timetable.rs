//! When each approval this process polls is due: one ordered timetable
//! instead of a sleeping task per approval, so that a pending approval costs
//! a few hundred bytes, not a task with a CIBA and a store future inside.
//!
//! Pure bookkeeping (no clock, no I/O): the engine's scheduler takes what is
//! due, polls it with a bounded number of pollers, and puts it back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;

use tokio::time::Instant;

/// Why an entry is handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// Its time came.
    Timer,
    /// Ping mode: the authorization server said the person answered.
    Notified,
}

#[derive(Debug)]
struct Slot<T> {
    /// `None` while handed out (a poll in flight).
    entry: Option<T>,
    at: Option<(Instant, u64)>,
    /// A notification came while the entry was handed out.
    notified: bool,
}

/// Entries of type `T` under keys `K`, each due at one instant.
#[derive(Debug)]
pub(super) struct Timetable<K, T> {
    slots: HashMap<K, Slot<T>>,
    order: BTreeMap<(Instant, u64), (K, Due)>,
    /// Notifications for keys not added yet (a notification may overtake
    /// the add that follows the authorization request).
    early: HashSet<K>,
    seq: u64,
}

impl<K: Hash + Eq + Clone, T> Default for Timetable<K, T> {
    fn default() -> Self {
        Self {
            slots: HashMap::new(),
            order: BTreeMap::new(),
            early: HashSet::new(),
            seq: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, T> Timetable<K, T> {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn schedule(&mut self, key: K, at: Instant, why: Due) -> (Instant, u64) {
        self.seq += 1;
        let slot = (at, self.seq);
        self.order.insert(slot, (key, why));
        slot
    }

    /// Adds `entry` due at `at` (at once if a notification for it came
    /// first). Replaces an entry already under `key`.
    pub(super) fn add(&mut self, key: K, entry: T, at: Instant, now: Instant) {
        let early = self.early.remove(&key);
        self.remove(&key);
        let (at, why) = if early {
            (now, Due::Notified)
        } else {
            (at, Due::Timer)
        };
        let slot = self.schedule(key.clone(), at, why);
        self.slots.insert(
            key,
            Slot {
                entry: Some(entry),
                at: Some(slot),
                notified: false,
            },
        );
    }

    /// Makes `key` due now. Returns whether that moved its next poll
    /// earlier (the scheduler must then wake up).
    pub(super) fn notify(&mut self, key: &K, now: Instant) -> bool {
        let Some(slot) = self.slots.get_mut(key) else {
            self.early.insert(key.clone());
            return false;
        };
        let Some(at) = slot.at.take() else {
            slot.notified = true; // handed out: due again when put back
            return false;
        };
        self.order.remove(&at);
        let new = self.schedule(key.clone(), now, Due::Notified);
        if let Some(slot) = self.slots.get_mut(key) {
            slot.at = Some(new);
        }
        true
    }

    /// Forgets `key`, whether waiting or handed out (a handed-out entry is
    /// then not taken back).
    pub(super) fn remove(&mut self, key: &K) -> bool {
        self.early.remove(key);
        match self.slots.remove(key) {
            Some(slot) => {
                if let Some(at) = slot.at {
                    self.order.remove(&at);
                }
                true
            }
            None => false,
        }
    }

    /// When the earliest entry is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.order.keys().next().map(|(at, _)| *at)
    }

    /// Hands out the earliest entry due at or before `now`; it stays known
    /// (a notification is remembered) until put back or removed.
    pub(super) fn take_due(&mut self, now: Instant) -> Option<(K, T, Due)> {
        loop {
            let (&(at, seq), _) = self.order.first_key_value()?;
            if at > now {
                return None;
            }
            let (key, why) = self.order.remove(&(at, seq))?;
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            slot.at = None;
            if let Some(entry) = slot.entry.take() {
                return Some((key, entry, why));
            }
        }
    }

    /// Takes back a handed-out entry, due at `at`, or at once if it was
    /// notified meanwhile. `false` (and the entry dropped) if it was removed
    /// meanwhile.
    pub(super) fn put_back(&mut self, key: K, entry: T, at: Instant, now: Instant) -> bool {
        let Some(slot) = self.slots.get_mut(&key) else {
            return false;
        };
        let (at, why) = if std::mem::take(&mut slot.notified) {
            (now, Due::Notified)
        } else {
            (at, Due::Timer)
        };
        slot.entry = Some(entry);
        let new = self.schedule(key.clone(), at, why);
        if let Some(slot) = self.slots.get_mut(&key) {
            slot.at = Some(new);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn entries_come_out_in_time_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut table = Timetable::default();
        table.add("b", 2, t0 + secs(2), t0);
        table.add("a", 1, t0 + secs(1), t0);
        table.add("c", 3, t0 + secs(2), t0);
        assert_eq!(table.next_due(), Some(t0 + secs(1)));
        assert!(table.take_due(t0).is_none());
        assert_eq!(table.take_due(t0 + secs(1)), Some(("a", 1, Due::Timer)));
        assert!(table.take_due(t0 + secs(1)).is_none());
        // Same instant: in the order they were scheduled.
        assert_eq!(table.take_due(t0 + secs(5)), Some(("b", 2, Due::Timer)));
        assert_eq!(table.take_due(t0 + secs(5)), Some(("c", 3, Due::Timer)));
        assert_eq!(table.len(), 3, "handed out, not forgotten");
        assert!(table.put_back("a", 1, t0 + secs(6), t0 + secs(5)));
        assert_eq!(table.next_due(), Some(t0 + secs(6)));
    }

    #[test]
    fn a_notification_makes_an_entry_due_at_once_even_while_polled_or_not_yet_added() {
        let t0 = Instant::now();
        let mut table = Timetable::default();
        table.add("a", (), t0 + secs(60), t0);
        assert!(table.notify(&"a", t0 + secs(1)));
        assert_eq!(table.next_due(), Some(t0 + secs(1)));
        assert_eq!(table.take_due(t0 + secs(1)), Some(("a", (), Due::Notified)));

        // Notified while its poll is in flight: due again when put back.
        assert!(!table.notify(&"a", t0 + secs(2)));
        table.put_back("a", (), t0 + secs(60), t0 + secs(3));
        assert_eq!(table.take_due(t0 + secs(3)), Some(("a", (), Due::Notified)));

        // Before it is added (the notification overtook the add).
        assert!(!table.notify(&"b", t0));
        table.add("b", (), t0 + secs(60), t0 + secs(4));
        assert_eq!(table.take_due(t0 + secs(4)), Some(("b", (), Due::Notified)));
    }

    #[test]
    fn a_removed_entry_is_never_handed_out_or_taken_back() {
        let t0 = Instant::now();
        let mut table = Timetable::default();
        table.add("a", (), t0, t0);
        table.add("b", (), t0, t0);
        assert!(table.remove(&"a"));
        assert_eq!(table.take_due(t0), Some(("b", (), Due::Timer)));
        assert!(table.remove(&"b"));
        assert!(!table.put_back("b", (), t0, t0));
        assert!(table.is_empty());
        assert_eq!(table.next_due(), None);
        assert!(!table.remove(&"b"));
    }
}
