//! A bounded LRU cache of loaded data, shared by readers and read-ahead threads: decoded
//! blocks and packs of a snapshot reader ([`super::reader`]), read windows of packs on object
//! storage ([`super::backend::window`]).
//!
//! An entry being loaded is marked, so that a second thread that wants it waits for the first
//! instead of loading it again; a failed load leaves no entry (the next one tries again and
//! gets its own error). Read-ahead threads [`LoadCache::claim`] an entry before loading it, so
//! that they never load what a reader is loading or has loaded.

use crate::error::Result;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A bounded LRU cache whose entries are loaded once (thread-safe).
pub(crate) struct LoadCache<K, V> {
    state: Mutex<State<K, V>>,
    loaded: Condvar,
    capacity: usize,
}

struct State<K, V> {
    slots: HashMap<K, Slot<V>>,
    /// The ready slots by last use: eviction takes the first (a cache of 4 KiB blocks holds
    /// thousands of entries, so it is never scanned).
    order: BTreeMap<u64, K>,
    clock: u64,
}

enum Slot<V> {
    Loading,
    Ready { data: Arc<V>, used: u64 },
}

impl<K: Hash + Eq + Clone, V> LoadCache<K, V> {
    /// A cache of at most `capacity` entries (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        LoadCache {
            state: Mutex::new(State {
                slots: HashMap::new(),
                order: BTreeMap::new(),
                clock: 0,
            }),
            loaded: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<K, V>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries kept at most.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The data of `key`, from the cache (waiting while another thread loads it) or from
    /// `load` now.
    pub(crate) fn get(&self, key: K, load: impl FnOnce() -> Result<V>) -> Result<Arc<V>> {
        let mut st = self.lock();
        loop {
            st.clock += 1;
            let now = st.clock;
            match st.slots.get_mut(&key) {
                Some(Slot::Ready { data, used }) => {
                    let before = std::mem::replace(used, now);
                    let data = data.clone();
                    st.order.remove(&before);
                    st.order.insert(now, key);
                    return Ok(data);
                }
                Some(Slot::Loading) => {
                    st = self.loaded.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                None => break,
            }
        }
        st.slots.insert(key.clone(), Slot::Loading);
        drop(st);
        self.load(key, load)
    }

    /// Runs `load` for `key` (whose slot the caller marked loading: [`LoadCache::get`] or
    /// [`LoadCache::claim`]) and publishes the result.
    pub(crate) fn load(&self, key: K, load: impl FnOnce() -> Result<V>) -> Result<Arc<V>> {
        let result = load();
        let mut st = self.lock();
        let out = match result {
            Ok(value) => {
                let data = Arc::new(value);
                st.clock += 1;
                let used = st.clock;
                let old = st.slots.insert(
                    key.clone(),
                    Slot::Ready {
                        data: data.clone(),
                        used,
                    },
                );
                if let Some(Slot::Ready { used: before, .. }) = old {
                    st.order.remove(&before);
                }
                st.order.insert(used, key);
                self.evict(&mut st);
                Ok(data)
            }
            Err(e) => {
                st.slots.remove(&key);
                Err(e)
            }
        };
        drop(st);
        self.loaded.notify_all();
        out
    }

    fn evict(&self, st: &mut State<K, V>) {
        while st.slots.len() > self.capacity {
            match st.order.pop_first() {
                Some((_, k)) => {
                    st.slots.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Claims `key` for read-ahead: true when nobody has it or is loading it (the caller
    /// must then [`LoadCache::load`] it).
    pub(crate) fn claim(&self, key: K) -> bool {
        let mut st = self.lock();
        if st.slots.contains_key(&key) {
            return false;
        }
        st.slots.insert(key, Slot::Loading);
        true
    }

    /// True when `key` is kept or being loaded.
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.lock().slots.contains_key(key)
    }

    /// True when `key` is loaded and kept.
    #[cfg(test)]
    pub(crate) fn is_ready(&self, key: &K) -> bool {
        matches!(self.lock().slots.get(key), Some(Slot::Ready { .. }))
    }

    /// Entries kept or being loaded.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    /// Loaded once, evicted least recently used first, failures not kept.
    #[test]
    fn loads_once_evicts_the_oldest_and_keeps_no_failure() {
        let c: LoadCache<u32, u32> = LoadCache::new(2);
        assert_eq!(*c.get(1, || Ok(10)).unwrap(), 10);
        assert_eq!(*c.get(1, || panic!("loaded twice")).unwrap(), 10);
        c.get(2, || Ok(20)).unwrap();
        c.get(1, || Ok(0)).unwrap();
        c.get(3, || Ok(30)).unwrap();
        assert!(c.contains(&1) && c.contains(&3) && !c.contains(&2));
        assert!(c.get(4, || Err(Error::internal("test", "no"))).is_err());
        assert!(!c.contains(&4));
        assert!(c.claim(5));
        assert!(!c.claim(5));
        c.load(5, || Ok(50)).unwrap();
        assert!(c.is_ready(&5));
        assert_eq!(c.len(), 2);
    }
}
