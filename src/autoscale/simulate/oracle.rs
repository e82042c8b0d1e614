//! The just-in-time oracle: the reference every closed-loop policy is measured against.
//!
//! It runs on the same model as [`super::closed_loop`] (same arrivals, FIFO queue, service time,
//! concurrency, pod start-up, step) but instead of an HPA it knows the arrival curve:
//! - at every step it has exactly `ceil((waiting + running) / concurrency)` pods ready, within
//!   the HPA's `minReplicas..=maxReplicas`, so a task starts the moment it arrives unless
//!   `maxReplicas` binds;
//! - every pod it adds was created one pod start-up earlier (it knew), and that start-up is paid
//!   in replica-seconds like any starting pod; it cannot act before t = 0, so until `pod_startup`
//!   only the pods present at t = 0 are ready (a burst at t = 0 waits for the first new pods);
//! - it never keeps an idle pod, except through a gap shorter than a pod start, where keeping it
//!   idle costs less than stopping it and starting another (it pays `min(gap, pod_startup)`);
//! - with unlimited `maxReplicas` nobody waits; replica-seconds are then the work divided by the
//!   concurrency (rounded up to whole pods per step), plus one pod start per pod added.
//!
//! Pods are counted as levels (the k-th pod exists while at least k are needed), which is the
//! cheapest assignment of identical pods to a demand curve.

use std::collections::VecDeque;
use std::time::Duration;

use super::closed_loop::{Summary, Workload, p95};

/// The oracle's figures on `workload` for an HPA bounded by `min_replicas..=max_replicas`.
/// `workload` must have passed [`Workload::validate`]. `scale_events` and `reversals` of the
/// result are 0 (the oracle's pool follows demand at every step; they are not comparable).
pub fn oracle(workload: &Workload, min_replicas: i32, max_replicas: i32) -> Summary {
    let ms = |d: Duration| d.as_millis() as i64;
    let step = ms(workload.step).max(1);
    let service = ms(workload.service_time);
    let startup = ms(workload.pod_startup);
    let load_end = ms(workload.load.duration());
    let end = ms(workload.duration.unwrap_or(workload.max_duration));
    let concurrency = i64::from(workload.concurrency.max(1));
    let total = workload.load.total();
    let (min_replicas, max_replicas) = (i64::from(min_replicas.max(0)), i64::from(max_replicas.max(0)));
    let initial = i64::from(workload.initial_replicas.unwrap_or(min_replicas as i32).max(0));

    let mut queue: VecDeque<i64> = VecDeque::new();
    // Finish times; the service time is constant, so they are in order.
    let mut running: VecDeque<i64> = VecDeque::new();
    let mut waits: Vec<i64> = Vec::new();
    let (mut sent, mut completed) = (0u64, 0u64);
    let mut first_arrival: Option<i64> = None;
    let mut drained_at: Option<i64> = None;
    let (mut ready_ms, mut peak_backlog, mut most_pods) = (0i64, 0usize, 0i64);
    // Per pod level k (index k − 1): when it was last stopped, `None` if it never existed.
    // The pods present at t = 0 exist (stopped at 0 if not needed then: no start-up to pay).
    let mut stopped_at: Vec<Option<i64>> = Vec::new();
    let mut extra_ms = 0i64;
    let mut pods = 0i64;

    let mut t = 0i64;
    loop {
        let due = (workload.load.cumulative(Duration::from_millis(t as u64)).round() as u64).min(total);
        while sent < due {
            queue.push_back(t);
            sent += 1;
            first_arrival.get_or_insert(t);
        }
        while running.front().is_some_and(|&finish| finish <= t) {
            running.pop_front();
            completed += 1;
        }
        let cap = if t < startup { initial.min(max_replicas) } else { max_replicas };
        let demand = (queue.len() as i64 + running.len() as i64 + concurrency - 1) / concurrency;
        let wanted = demand.max(min_replicas).min(cap);
        if t == 0 {
            stopped_at = (0..initial.max(wanted)).map(|k| (k < initial).then_some(0)).collect();
            pods = initial.min(wanted).max(0);
        }
        if wanted > pods {
            if stopped_at.len() < wanted as usize {
                stopped_at.resize(wanted as usize, None);
            }
            for level in pods..wanted {
                // Restarting after a short gap costs the gap (the pod stayed), else a start-up.
                extra_ms += match stopped_at[level as usize] {
                    Some(stop) => (t - stop).min(startup),
                    None => startup,
                };
            }
        } else {
            for level in wanted..pods {
                stopped_at[level as usize] = Some(t);
            }
        }
        pods = wanted;
        most_pods = most_pods.max(pods);
        while (running.len() as i64) < pods * concurrency {
            let Some(arrival) = queue.pop_front() else {
                break;
            };
            waits.push(t - arrival);
            running.push_back(t + service);
        }
        peak_backlog = peak_backlog.max(queue.len());

        let drained = sent == total && t >= load_end && queue.is_empty() && running.is_empty();
        if drained && drained_at.is_none() && first_arrival.is_some() {
            drained_at = Some(t);
        }
        let finished = t >= end || (workload.duration.is_none() && drained && pods <= min_replicas);
        if finished {
            break;
        }
        ready_ms += pods * step;
        t += step;
    }

    Summary {
        replica_seconds: (ready_ms + extra_ms) as f64 / 1000.0,
        peak_backlog,
        time_to_drain: drained_at.zip(first_arrival).map(|(d, f)| (d - f) as f64 / 1000.0),
        p95_wait: p95(&mut waits),
        max_replicas: most_pods as i32,
        scale_events: 0,
        reversals: 0,
        interrupted: 0,
        tasks: total,
        completed,
        simulated: t as f64 / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::simulate::Signal;

    fn workload(load: &str, service_ms: u64, concurrency: u32, startup_s: u64) -> Workload {
        Workload {
            load: load.parse().unwrap(),
            service_time: Duration::from_millis(service_ms),
            concurrency,
            pod_startup: Duration::from_secs(startup_s),
            scrape_delay: Duration::from_secs(15),
            sync_period: Duration::from_secs(15),
            step: Duration::from_millis(100),
            duration: None,
            max_duration: Duration::from_secs(3600),
            initial_replicas: None,
            signal: Signal::Depth,
            rate_window: Duration::from_secs(30),
            scale_in: crate::autoscale::simulate::ScaleIn::Newest,
        }
    }

    #[test]
    fn constant_rate_costs_the_work_over_the_concurrency() {
        // ramp:10:10:100 sends one task per 0.1 s step, at steps 1..=1000; each runs 1 s, i.e.
        // during 10 steps, 2 per pod, pods start instantly. At step k, min(k, 10) tasks run
        // while arriving, then 9, 8, … 1 after the last arrival; the oracle holds
        // max(1, ceil(running / 2)) pods. Work alone: 1000 × 1 s / 2 = 500 pod-s.
        let s = oracle(&workload("ramp:10:10:100", 1000, 2, 0), 1, 100);
        let half_up = |k: i64| (k + 1) / 2;
        let pod_steps = 1 // step 0: minReplicas, nothing runs yet
            + (1..=9).map(half_up).sum::<i64>() // 25
            + 991 * 5 // steps 10..=1000
            + (1..=9).map(half_up).sum::<i64>(); // the tail, 25
        assert_eq!(pod_steps, 5006);
        assert!((s.replica_seconds - 500.6).abs() < 1e-9, "{}", s.replica_seconds);
        assert_eq!((s.tasks, s.completed, s.peak_backlog, s.max_replicas), (1000, 1000, 0, 5));
        assert_eq!(s.p95_wait, Some(0.0), "nobody waits");
        assert_eq!(s.time_to_drain, Some(100.9), "first arrival 0.1 s, last task done at 101.0 s");
    }

    #[test]
    fn an_idle_pod_is_kept_only_through_a_gap_shorter_than_a_pod_start() {
        // The same load with a 10 s pod start and 5 pods at t = 0: no pod has to start. Pods
        // 2..5 are not needed at t = 0 but again at steps 3, 5, 7 and 9, sooner than a pod start,
        // so they stay idle until then: 0.3 + 0.5 + 0.7 + 0.9 s more than the run above.
        let w = Workload { initial_replicas: Some(5), ..workload("ramp:10:10:100", 1000, 2, 10) };
        let s = oracle(&w, 1, 100);
        assert!((s.replica_seconds - 503.0).abs() < 1e-9, "{}", s.replica_seconds);
        assert_eq!(s.p95_wait, Some(0.0));
        // From one pod at t = 0 instead, the first 10 s are served by that pod alone, the backlog
        // then asks for many pods at once, and each pays its 10 s start.
        let cold = oracle(&workload("ramp:10:10:100", 1000, 2, 10), 1, 100);
        assert!(cold.p95_wait.unwrap() > 0.0);
        assert!(cold.replica_seconds > s.replica_seconds + 40.0);
    }

    #[test]
    fn burst_is_capped_by_max_replicas_and_the_first_pod_start() {
        // burst:400, 0.5 s, 2 per pod, 10 s start, 1..=20 pods: one pod runs 40 tasks in the
        // first 10 s, then 20 pods take 360 in 9 waves of 40, 0.5 s each.
        let s = oracle(&workload("burst:400", 500, 2, 10), 1, 20);
        assert_eq!(s.time_to_drain, Some(14.5));
        assert_eq!(s.max_replicas, 20);
        // Pod 1: 14.5 s. Pods 2..20: 10 s start each, then ready until they empty: in the last
        // wave 40 tasks occupy all 20 pods, so all 19 are ready for 4.5 s.
        let expected = 14.5 + 19.0 * (10.0 + 4.5);
        assert!((s.replica_seconds - expected).abs() < 1e-9, "{}", s.replica_seconds);
        assert_eq!(s.peak_backlog, 398);
    }
}
