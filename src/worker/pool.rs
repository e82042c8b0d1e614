//! The worker's run slots (its concurrency) and its prefetch budget, which `control pool_grow` /
//! `pool_shrink` change live. One process runs every task (tokio); a "slot" is a permit to run
//! one task at a time, where Celery's prefork pool has a child process. The prefetch budget is
//! `slots × --prefetch-multiplier` and follows the slots, as Celery's `_update_prefetch_count`.
//!
//! Growing adds permits at once. Shrinking takes free permits at once and, for the ones in
//! use, takes each as its task ends, so nothing running is stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::sync::Semaphore;

/// The most run slots a worker takes (`--concurrency`'s ceiling).
pub const MAX_SLOTS: u32 = 1024;

pub struct Pool {
    run: Arc<Semaphore>,
    fetch: Arc<Semaphore>,
    multiplier: u32,
    slots: AtomicU32,
    /// Called with the new slot count (the concurrency gauge).
    on_change: Box<dyn Fn(u32) + Send + Sync>,
}

impl Pool {
    pub fn new(slots: u32, multiplier: u32, on_change: impl Fn(u32) + Send + Sync + 'static) -> Self {
        Pool {
            run: Arc::new(Semaphore::new(slots as usize)),
            fetch: Arc::new(Semaphore::new((slots * multiplier) as usize)),
            multiplier,
            slots: AtomicU32::new(slots),
            on_change: Box::new(on_change),
        }
    }

    /// Permits to run a task.
    pub fn run_slots(&self) -> &Arc<Semaphore> {
        &self.run
    }

    /// Permits to hold a message (the prefetch budget).
    pub fn fetch_slots(&self) -> &Arc<Semaphore> {
        &self.fetch
    }

    /// Tasks run at a time now (`stats`' `max-concurrency`).
    pub fn slots(&self) -> u32 {
        self.slots.load(Ordering::Relaxed)
    }

    /// Messages held at most now (`stats`' `prefetch_count`).
    pub fn prefetch(&self) -> u32 {
        self.slots() * self.multiplier
    }

    /// `pool_grow n`. Err: Python's error repr, for the reply.
    pub fn grow(&self, n: u32) -> Result<u32, String> {
        let now = self
            .slots
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_add(n).filter(|&t| t <= MAX_SLOTS));
        let before = now.map_err(|s| {
            format!("ValueError(\"can't grow the pool by {n}: it has {s} run slots, at most {MAX_SLOTS}\")")
        })?;
        self.run.add_permits(n as usize);
        self.fetch.add_permits((n * self.multiplier) as usize);
        (self.on_change)(before + n);
        Ok(before + n)
    }

    /// `pool_shrink n`: never below one slot. Err: Python's error repr, for the reply.
    pub fn shrink(&self, n: u32) -> Result<u32, String> {
        let now =
            self.slots.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_sub(n).filter(|&t| t >= 1));
        let before = now.map_err(|s| {
            format!("ValueError(\"can't shrink the pool by {n}: it has {s} run slots and keeps at least one\")")
        })?;
        take_away(&self.run, n as usize);
        take_away(&self.fetch, (n * self.multiplier) as usize);
        (self.on_change)(before - n);
        Ok(before - n)
    }
}

/// Remove `n` permits from `sem`: the free ones now, the others as they are released.
fn take_away(sem: &Arc<Semaphore>, n: usize) {
    let now = sem.forget_permits(n);
    for _ in now..n {
        let sem = sem.clone();
        tokio::spawn(async move {
            if let Ok(p) = sem.acquire_owned().await {
                p.forget();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grow_and_shrink_move_run_and_fetch_slots_together() {
        let pool = Pool::new(2, 3, |_| {});
        assert_eq!((pool.slots(), pool.prefetch()), (2, 6));
        assert_eq!(pool.grow(2), Ok(4));
        assert_eq!((pool.run_slots().available_permits(), pool.fetch_slots().available_permits()), (4, 12));
        let busy = pool.run_slots().clone().acquire_many_owned(4).await.unwrap();
        assert_eq!(pool.shrink(3), Ok(1));
        assert!(pool.shrink(1).is_err(), "keeps one slot");
        assert!(pool.grow(MAX_SLOTS).is_err());
        assert_eq!(pool.fetch_slots().available_permits(), 3);
        drop(busy); // the shrink takes three of the four as they come back
        tokio::task::yield_now().await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.run_slots().available_permits(), 1);
    }
}
