"""The project's task set in Python, for a real Celery worker in the tests and the benchmark.

Same names and algorithms as src/task/builtin.rs, so a Python worker and a Rust worker are
interchangeable on a queue and benchmarks compare like with like. Configured from the
environment: BROKER_URL, BACKEND_URL, VISIBILITY_TIMEOUT (seconds), ACKS_LATE (1/0),
PREFETCH_MULTIPLIER, UNACKED_RESTORE_INTERVAL (seconds between kombu's restore checks) and
UNACKED_RESTORE_THROTTLE (kombu scans on every Nth check; 1 = every check) and GLOBAL_KEYPREFIX
(`global_keyprefix` in the broker and result backend transport options).
"""
import os
import time

from celery import Celery

app = Celery(
    "tasks",
    broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("BACKEND_URL", "redis://127.0.0.1:6379/1"),
)
app.conf.update(
    task_acks_late=os.environ.get("ACKS_LATE", "1") == "1",
    worker_prefetch_multiplier=int(os.environ.get("PREFETCH_MULTIPLIER", "1")),
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("VISIBILITY_TIMEOUT", "3600")),
        "unacked_restore_interval": float(os.environ.get("UNACKED_RESTORE_INTERVAL", "10")),
        "unacked_restore_throttle": int(os.environ.get("UNACKED_RESTORE_THROTTLE", "10")),
    },
    # CHORD_ORDERED=0: the chord join's list form (Celery's result_chord_ordered=False).
    result_backend_transport_options={"result_chord_ordered": os.environ.get("CHORD_ORDERED", "1") == "1"},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
# GLOBAL_KEYPREFIX: kombu's and Celery's `global_keyprefix`, in both transport options.
if os.environ.get("GLOBAL_KEYPREFIX"):
    app.conf.broker_transport_options["global_keyprefix"] = os.environ["GLOBAL_KEYPREFIX"]
    app.conf.result_backend_transport_options["global_keyprefix"] = os.environ["GLOBAL_KEYPREFIX"]


@app.task(name="tasks.cpu_bound")
def cpu_bound(n):
    """Number of primes <= n by trial division over odd divisors (as count_primes in Rust)."""
    count = 0
    for i in range(2, n + 1):
        if i < 4:
            count += 1
            continue
        if i % 2 == 0:
            continue
        d = 3
        prime = True
        while d * d <= i:
            if i % d == 0:
                prime = False
                break
            d += 2
        if prime:
            count += 1
    return count


@app.task(name="tasks.io_bound")
def io_bound(seconds):
    time.sleep(seconds)
    return seconds


@app.task(name="tasks.flaky", bind=True, max_retries=3)
def flaky(self, fail_times, countdown=1.0):
    """Fails with a retry until retried `fail_times` times, then returns the retry count."""
    if self.request.retries >= fail_times:
        return self.request.retries
    attempt = self.request.retries + 1
    raise self.retry(exc=RuntimeError(f"flaky: attempt {attempt} of {fail_times + 1} fails on purpose"),
                     countdown=countdown)


@app.task(name="tasks.xsum")
def xsum(numbers):
    """sum(numbers): a chord body (it receives the header's results as one list)."""
    return sum(numbers)
