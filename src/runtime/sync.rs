//! The one lock-poison policy: a lock whose holder panicked is used as it is.
//!
//! Every critical section under our `std::sync::Mutex`es is one map, set or value update that
//! cannot be left half-made by a panic elsewhere in the holder, and nothing awaits while
//! holding one. So a poisoned lock holds consistent data, and refusing it (`lock().expect`)
//! would only turn one panic into a panic on every later use — a worker wedged on each message
//! it touches.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// [`Mutex::lock`] under this module's policy.
pub trait Locked<T> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_used_as_it_is() {
        let m = std::sync::Arc::new(Mutex::new(vec![1]));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut v = m2.lock().unwrap();
            v.push(2);
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.locked(), vec![1, 2]);
    }
}
