//! Metric handles kept by their labels, so a request records into a handle
//! it looks up with a borrowed key instead of building owned labels and
//! having the recorder hash and find them on every request (several
//! allocations and a locked map per metric).
//!
//! Only for labels of bounded cardinality (configured routes, aliases,
//! providers, status codes): a handle is kept for every key ever seen.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{PoisonError, RwLock};

/// Handles of type `H` (a counter, a histogram, or a tuple of them) by key.
pub struct Handles<H> {
    map: RwLock<HashMap<String, H>>,
}

impl<H> Default for Handles<H> {
    fn default() -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
        }
    }
}

thread_local! {
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<H: Clone> Handles<H> {
    /// The handle for the key made of `parts`, registered with `make` the
    /// first time the key is seen.
    pub fn get(&self, parts: &[&dyn std::fmt::Display], make: impl FnOnce() -> H) -> H {
        KEY.with(|key| {
            let mut own = String::new();
            let mut borrowed = key.try_borrow_mut();
            let key = match borrowed.as_deref_mut() {
                Ok(k) => k,
                Err(_) => &mut own,
            };
            key.clear();
            for p in parts {
                let _ = write!(key, "{p}\u{1f}");
            }
            if let Some(h) = self
                .map
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(key.as_str())
            {
                return h.clone();
            }
            let h = make();
            self.map
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key.clone())
                .or_insert(h)
                .clone()
        })
    }

    /// Keys registered so far.
    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_key_is_made_once_and_parts_do_not_run_together() {
        let handles: Handles<Arc<AtomicUsize>> = Handles::default();
        let made = AtomicUsize::new(0);
        let make = || {
            made.fetch_add(1, Ordering::Relaxed);
            Arc::new(AtomicUsize::new(0))
        };
        for _ in 0..3 {
            handles
                .get(&[&"/v1/chat", &"gpt", &200], make)
                .fetch_add(1, Ordering::Relaxed);
        }
        // "ab" + "c" must not be the same key as "a" + "bc".
        handles.get(&[&"ab", &"c"], make);
        handles.get(&[&"a", &"bc"], make);
        assert_eq!(made.load(Ordering::Relaxed), 3);
        assert_eq!(handles.len(), 3);
        let h = handles.get(&[&"/v1/chat", &"gpt", &200], make);
        assert_eq!(h.load(Ordering::Relaxed), 3);
    }
}
