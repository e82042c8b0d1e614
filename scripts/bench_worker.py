#!/usr/bin/env python3
"""Worker benchmark: our Rust worker vs the Python Celery worker, same Redis, same run.

    .venv/bin/python scripts/bench_worker.py [--tasks 5000] [--rounds 5] [--binary target/release/celery-autoscale]
                                             [--baseline another/celery-autoscale]

Three configurations, each draining N tasks.cpu_bound(10) with results stored:
  rust           ours: concurrency 2, prefetch one message per slot (the default)
  python         like for like: prefork, concurrency 2, acks_late, prefetch multiplier 1
  python-default Celery's defaults: prefork, concurrency 2, acks early, prefetch multiplier 4
  baseline       (with --baseline) another build of ours, e.g. the previous commit, same flags
Every run starts the same way: the N messages are queued under a parking key, the worker starts
and is idle (ready), then the parking key is RENAMEd onto the queue, which is t0. Completion is
watched cheaply (DBSIZE of the result db every 50 ms, one O(1) command), so the watcher takes
no CPU from the worker it measures; results are checked once, after the clock stops.
Rounds alternate the configurations (rust, python, python-default, rust, ...) so load drift on
the machine hits all of them alike; the table shows each run and the median of the rounds.
Reported: tasks/s from t0 to the last result (wall) and between the first and the last result's
own date_done (span), CPU time per task of the worker's whole process tree and of Redis (from
/proc, t0 to the last result), peak RSS of the worker's whole process tree (Python prefork =
parent + children), and pickup latency on an idle worker: LPUSH of one io_bound(0) message to the PUBLISH
of its result, seen by a subscriber, 200 times. Everything runs on loopback and stops by itself.
"""
import argparse
import datetime
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import redis
from celery import Celery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid):
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def over_tree(pid, path, value):
    """Sum of value(text of /proc/<p>/<path>) over pid and its live descendants."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/{path}") as f:
                total += value(f.read())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def tree_rss_kb(pid):
    """RSS of pid and all its descendants, in kB."""
    rss = lambda status: sum(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return over_tree(pid, "status", rss)


def tree_cpu_s(pid):
    """CPU time (user + system) of pid and all its live descendants, in seconds."""
    def cpu(stat):
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    return over_tree(pid, "stat", cpu) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, n, binary):
        self.n, self.binary = n, binary
        self.tmp = tempfile.mkdtemp(prefix="bench-worker-")
        self.port = free_port()
        self.redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.tmp], stdout=subprocess.DEVNULL)
        self.broker = f"redis://127.0.0.1:{self.port}/0"
        self.backend = f"redis://127.0.0.1:{self.port}/1"
        self.r0 = redis.Redis(port=self.port, db=0)
        self.r1 = redis.Redis(port=self.port, db=1)
        for _ in range(100):
            try:
                self.r0.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        self.app = Celery("bench", broker=self.broker, backend=self.backend)

    def close(self):
        self.redis_proc.terminate()
        self.redis_proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def env(self):
        return dict(os.environ, BROKER_URL=self.broker, BACKEND_URL=self.backend, PYTHONPATH=os.path.join(ROOT, "tests/python"))

    def start_rust(self, binary=None):
        metrics = free_port()
        proc = subprocess.Popen(
            [binary or self.binary, "worker", "--concurrency", "2", "--metrics-addr", f"127.0.0.1:{metrics}"],
            env=dict(self.env(), RUST_LOG="warn"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: http_status(metrics, "/readyz") == 200, 30, "rust worker ready")
        return proc

    def start_python(self, acks_late=True, prefetch=1):
        log = os.path.join(self.tmp, f"python-{uuid.uuid4().hex}.log")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "prefork", "--concurrency", "2",
             "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat", "--logfile", log],
            cwd=os.path.join(ROOT, "tests/python"),
            env=dict(self.env(), ACKS_LATE="1" if acks_late else "0", PREFETCH_MULTIPLIER=str(prefetch)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: " ready." in read_text(log), 60, "python worker ready")
        return proc

    def enqueue(self, n, task="tasks.cpu_bound", args=(10,)):
        ids = [str(uuid.uuid4()) for _ in range(n)]
        with self.app.producer_or_acquire() as producer:
            for i in ids:
                self.app.send_task(task, args=list(args), task_id=i, producer=producer)
        return ids

    def drain(self, start_worker, label):
        self.r0.flushall()
        ids = self.enqueue(self.n)
        self.r0.rename("celery", PARKED)
        proc = start_worker()  # idle and ready: nothing to take yet
        peak = tree_rss_kb(proc.pid)
        cpu0 = (tree_cpu_s(proc.pid), tree_cpu_s(self.redis_proc.pid))
        t0 = time.monotonic()
        self.r0.rename(PARKED, "celery")
        while self.r1.dbsize() < self.n:
            time.sleep(0.05)
            peak = max(peak, tree_rss_kb(proc.pid))
            if time.monotonic() - t0 > 600:
                raise SystemExit(f"{label}: only {self.r1.dbsize()}/{self.n} results after 600 s")
        wall = time.monotonic() - t0
        cpu = (tree_cpu_s(proc.pid) - cpu0[0], tree_cpu_s(self.redis_proc.pid) - cpu0[1])
        metas = [redis_json(v) for v in self.r1.mget([f"celery-task-meta-{i}" for i in ids])]
        bad = [m for m in metas if m is None or m["status"] != "SUCCESS" or m["result"] != 4]
        if bad:
            raise SystemExit(f"{label}: {len(bad)} missing or wrong results, e.g. {bad[0]}")
        dates = sorted(datetime.datetime.fromisoformat(m["date_done"]) for m in metas)
        span = (dates[-1] - dates[0]).total_seconds()
        latency = self.pickup_latency(proc)
        proc.terminate()
        proc.wait(timeout=60)
        return {"label": label, "rate": self.n / wall, "span_rate": (self.n - 1) / span if span > 0 else float("inf"),
                "wall": wall, "rss_mb": peak / 1024, "latency": latency,
                "worker_us": cpu[0] / self.n * 1e6, "redis_us": cpu[1] / self.n * 1e6}

    def pickup_latency(self, proc, samples=200):
        """LPUSH → PUBLISH of the result on an idle worker, measured by a subscriber."""
        time.sleep(1.0)  # idle: blocked in BRPOP
        sub = self.r1.pubsub()
        out = []
        for _ in range(samples):
            tid = str(uuid.uuid4())
            sub.subscribe(f"celery-task-meta-{tid}")
            sub.get_message(timeout=1)  # subscribe confirmation
            msg = self.app.amqp.create_task_message(tid, "tasks.io_bound", [0], {})
            body = build_envelope(self.app, msg)
            t = time.perf_counter()
            self.r0.lpush("celery", body)
            while True:
                m = sub.get_message(timeout=5)
                if m is None:
                    raise SystemExit("no result published within 5 s")
                if m["type"] == "message":
                    break
            out.append((time.perf_counter() - t) * 1000)
            sub.unsubscribe()
            sub.get_message(timeout=1)
            time.sleep(0.01)
        sub.close()
        out.sort()
        return {"p50": statistics.median(out), "p99": out[int(len(out) * 0.99) - 1]}


PARKED = "bench-parked"


def redis_json(v):
    import json
    return None if v is None else json.loads(v)


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def http_status(port, path):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return int(s.recv(64).split()[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def build_envelope(app, msg):
    """The exact bytes kombu would LPUSH for a task message."""
    import base64
    import json
    headers, properties, body, _ = msg
    payload = json.dumps(body).encode()
    return json.dumps({
        "body": base64.b64encode(payload).decode(), "content-encoding": "utf-8", "content-type": "application/json",
        "headers": headers,
        "properties": {"correlation_id": headers["id"], "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/celery-autoscale"))
    ap.add_argument("--baseline", help="another build of the worker to run alongside, same flags")
    a = ap.parse_args()
    for binary in filter(None, (a.binary, a.baseline)):
        if not os.access(binary, os.X_OK):
            raise SystemExit(f"{binary} not found: cargo build --release")
    b = Bench(a.tasks, a.binary)
    configs = [
        ("rust", b.start_rust),
        ("python", lambda: b.start_python(acks_late=True, prefetch=1)),
        ("python-default", lambda: b.start_python(acks_late=False, prefetch=4)),
    ]
    if a.baseline:
        configs.insert(1, ("baseline", lambda: b.start_rust(a.baseline)))
    runs = {label: [] for label, _ in configs}
    try:
        for rnd in range(a.rounds):
            for label, start in configs:
                r = b.drain(start, label)
                runs[label].append(r)
                print(f"round {rnd + 1} {label:<15} {r['rate']:>7.0f} tasks/s", file=sys.stderr, flush=True)
    finally:
        b.close()
    med = lambda xs: statistics.median(xs)
    print(f"\nDrain {a.tasks} × tasks.cpu_bound(10), results stored, concurrency 2, one Redis on loopback;"
          f" {a.rounds} alternated rounds")
    print(f"{'worker':<16}{'tasks/s (each run)':>34}{'median':>8}{'span/s':>8}{'CPU µs/task':>13}"
          f"{'Redis µs/task':>15}{'RSS MB':>8}{'pickup p50 ms':>15}{'p99 ms':>8}")
    summary = {}
    for label, rs in runs.items():
        each = " ".join(f"{r['rate']:.0f}" for r in rs)
        summary[label] = s = {
            "rate": med([r["rate"] for r in rs]), "span_rate": med([r["span_rate"] for r in rs]),
            "rss_mb": med([r["rss_mb"] for r in rs]), "p50": med([r["latency"]["p50"] for r in rs]),
            "p99": med([r["latency"]["p99"] for r in rs]), "worker_us": med([r["worker_us"] for r in rs]),
            "redis_us": med([r["redis_us"] for r in rs])}
        print(f"{label:<16}{each:>34}{s['rate']:>8.0f}{s['span_rate']:>8.0f}{s['worker_us']:>13.0f}"
              f"{s['redis_us']:>15.0f}{s['rss_mb']:>8.1f}{s['p50']:>15.2f}{s['p99']:>8.2f}")
    rust, py, pyd = summary["rust"], summary["python"], summary["python-default"]
    print(f"\nthroughput rust/python (like for like): {rust['rate'] / py['rate']:.1f}×   (goal ≥ 10×)")
    print(f"throughput rust/python-default:         {rust['rate'] / pyd['rate']:.1f}×")
    print(f"CPU per task python/rust (worker tree): {py['worker_us'] / rust['worker_us']:.1f}×")
    print(f"memory python/rust:                     {py['rss_mb'] / rust['rss_mb']:.1f}×")
    print(f"idle pickup p50 rust:                   {rust['p50']:.2f} ms (goal < 1 ms)")
    if a.baseline:
        print(f"throughput rust/baseline:               {rust['rate'] / summary['baseline']['rate']:.2f}×")


if __name__ == "__main__":
    main()
