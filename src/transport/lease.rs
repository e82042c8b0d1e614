//! Leases and prompt restore: the two background jobs that make a short visibility timeout safe.
//!
//! * **Renewal.** Every `visibility_timeout / 4` a worker rewrites the `unacked_index` score of
//!   every message it holds (waiting, running, or held for its ETA) to "now", in one
//!   `ZADD unacked_index XX` per round. kombu's `restore_visible` (and ours) restores an entry
//!   when its score is older than `now - visibility_timeout`, so a renewed message is never
//!   restored while its worker lives, however long its task or ETA. `XX` only updates members
//!   that are still there: a message acked or put back meanwhile is never re-added.
//! * **Prompt restore.** Instead of a fixed tick, a worker sleeps until the oldest entry in
//!   `unacked_index` falls due (its score + visibility timeout), plus a little jitter so a fleet
//!   does not wake at the same instant, and then runs a restore round (`unacked_mutex` still
//!   serializes rounds). An entry nobody renews — a dead worker's message, or a take whose reply
//!   never reached its worker — is back in its queue within about a second of falling due.
//!   `--restore-interval` remains the longest sleep between rounds.
//!
//! Python workers do not renew: in a mixed fleet their messages are still restored after the
//! visibility timeout, so it must exceed their longest task and ETA wait.

use crate::transport::broker::{Broker, RestoreReport};
use crate::transport::connection::Backoff;
use crate::wire::time::unix_seconds;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;

/// Enumerates the delivery tags a worker currently holds. Whatever owns the in-flight messages
/// provides it; the renewal only needs the tags.
pub type HeldTags = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Renewals never run more often than this, however short the visibility timeout.
const MIN_RENEW_PERIOD: Duration = Duration::from_millis(100);

/// The largest random delay added to a restore wake-up. Small against the one-second promise,
/// large enough that twenty workers do not all queue on `unacked_mutex` at once.
const MAX_JITTER: Duration = Duration::from_millis(200);

/// How often held messages are renewed for a visibility timeout: a quarter of it, so two
/// renewals may fail (a Redis blip) before anything is at risk.
pub fn renew_period(visibility_timeout: Duration) -> Duration {
    (visibility_timeout / 4).max(MIN_RENEW_PERIOD)
}

/// Renew the leases of `held` forever (the caller aborts the task when the worker stops).
pub async fn renew_loop(broker: Broker, held: HeldTags, visibility_timeout: Duration) {
    let mut tick = tokio::time::interval(renew_period(visibility_timeout));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; a fresh take already carries "now"
    loop {
        tick.tick().await;
        let tags = held();
        if tags.is_empty() {
            continue;
        }
        if let Err(e) = broker.renew(&tags, unix_seconds(Utc::now())).await {
            // The next round retries; three rounds fit in one visibility timeout.
            tracing::warn!(error = %e, held = tags.len(), "could not renew held messages' leases");
        }
    }
}

/// How long the restore loop sleeps before its next round, given when the oldest entry falls
/// due (`None`: nothing is unacked). An entry taken while we sleep falls due a full visibility
/// timeout later, so sleeping at most that long never misses one.
fn next_wait(
    due_in: Option<f64>,
    visibility_timeout: Duration,
    longest: Duration,
    last: Option<&RestoreReport>,
) -> Duration {
    let cap = visibility_timeout.min(longest);
    let due_in = due_in.unwrap_or(f64::INFINITY);
    if due_in > 0.0 {
        return Duration::try_from_secs_f64(due_in).unwrap_or(cap).min(cap);
    }
    // Already due. Right after a round that moved something, or that found the mutex held,
    // more may be coming (batches, another worker mid-round): look again soon. After a round
    // that moved nothing, the oldest entry is one that cannot be restored (unroutable,
    // unreadable): waiting the longest interval keeps it from spinning the loop.
    match last {
        Some(r) if r.restored == 0 && !r.skipped_locked => cap,
        _ => Duration::ZERO,
    }
}

fn jitter() -> Duration {
    MAX_JITTER.mul_f64(rand::random::<f64>())
}

/// Restore orphans promptly: sleep until the oldest `unacked_index` entry falls due (at most
/// `longest`), then run a round. `on_round` sees every round's report (metrics, logs).
pub async fn restore_loop(
    broker: Broker,
    visibility_timeout: Duration,
    longest: Duration,
    on_round: impl Fn(&RestoreReport) + Send,
) {
    let mut backoff = Backoff::default();
    let mut last: Option<RestoreReport> = None;
    loop {
        match broker.next_due(visibility_timeout).await {
            Ok(due) => {
                backoff = Backoff::default();
                let due_in = due.map(|d| d - unix_seconds(Utc::now()));
                let wait = next_wait(due_in, visibility_timeout, longest, last.as_ref());
                tokio::time::sleep(wait + jitter()).await;
            }
            Err(e) => {
                // Redis is away: come back soon, so entries stranded by the outage (a take
                // whose reply was lost) are restored as soon as they fall due.
                tracing::debug!(error = %e, "restore check skipped: Redis unavailable");
                tokio::time::sleep(backoff.next_delay().min(longest)).await;
                continue;
            }
        }
        match broker.restore_visible(visibility_timeout, unix_seconds(Utc::now())).await {
            Ok(report) => {
                on_round(&report);
                last = Some(report);
            }
            Err(e) => {
                tracing::debug!(error = %e, "restore round skipped: Redis unavailable");
                last = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONGEST: Duration = Duration::from_secs(30);

    #[test]
    fn renews_four_times_per_timeout_with_a_floor() {
        assert_eq!(renew_period(Duration::from_secs(60)), Duration::from_secs(15));
        assert_eq!(renew_period(Duration::from_millis(200)), MIN_RENEW_PERIOD);
    }

    #[test]
    fn sleeps_until_the_oldest_entry_falls_due() {
        let vt = Duration::from_secs(60);
        assert_eq!(next_wait(Some(2.5), vt, LONGEST, None), Duration::from_millis(2500));
        assert_eq!(next_wait(Some(3600.0), vt, LONGEST, None), LONGEST);
        assert_eq!(next_wait(Some(-1.0), vt, LONGEST, None), Duration::ZERO);
    }

    #[test]
    fn never_sleeps_past_a_message_taken_meanwhile() {
        // Nothing unacked: a message taken right after the check falls due one timeout later.
        let short = Duration::from_secs(5);
        assert_eq!(next_wait(None, short, LONGEST, None), short);
        assert_eq!(next_wait(None, Duration::from_secs(3600), LONGEST, None), LONGEST);
        assert_eq!(next_wait(Some(20.0), short, LONGEST, None), short);
    }

    #[test]
    fn a_due_entry_that_cannot_move_does_not_spin_the_loop() {
        let vt = Duration::from_secs(3600);
        let stuck = RestoreReport { unroutable: 1, ..Default::default() };
        assert_eq!(next_wait(Some(-1.0), vt, LONGEST, Some(&stuck)), LONGEST);
        let moved = RestoreReport { restored: 1000, ..Default::default() };
        assert_eq!(next_wait(Some(-1.0), vt, LONGEST, Some(&moved)), Duration::ZERO);
        let locked = RestoreReport { skipped_locked: true, ..Default::default() };
        assert_eq!(next_wait(Some(-1.0), vt, LONGEST, Some(&locked)), Duration::ZERO);
    }
}
