#!/usr/bin/env python3
"""Worker benchmark: our Rust worker vs the Python Celery worker, same Redis, same run.

    .venv/bin/python scripts/bench_worker.py [--tasks 3000] [--binary target/release/celery-autoscale]

For each worker: drain N pre-enqueued tasks.cpu_bound(10) with results stored, and report
tasks/s (first to last result, from the results' own date_done), the wall time from start,
and the peak RSS of the worker's whole process tree (Python prefork = parent + children).
Then the pickup latency on an idle worker: LPUSH of one io_bound(0) message to the result's
PUBLISH, measured by a subscriber, 200 times. The Python worker runs prefork, concurrency 2,
acks_late, prefetch multiplier 1; ours runs concurrency 2, prefetch 1 per slot.
Everything runs on loopback and stops by itself. Prints a table and the ratios.
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


def tree_rss_kb(pid):
    """RSS of pid and all its descendants, in kB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


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

    def start_rust(self):
        metrics = free_port()
        return subprocess.Popen(
            [self.binary, "worker", "--concurrency", "2", "--metrics-addr", f"127.0.0.1:{metrics}"],
            env=dict(self.env(), RUST_LOG="warn"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start_python(self):
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "prefork", "--concurrency", "2",
             "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=os.path.join(ROOT, "tests/python"), env=dict(self.env(), ACKS_LATE="1", PREFETCH_MULTIPLIER="1"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def enqueue(self, n, task="tasks.cpu_bound", args=(10,)):
        ids = [str(uuid.uuid4()) for _ in range(n)]
        with self.app.producer_or_acquire() as producer:
            for i in ids:
                self.app.send_task(task, args=list(args), task_id=i, producer=producer)
        return ids

    def drain(self, start_worker, label):
        self.r0.flushall()
        ids = self.enqueue(self.n)
        keys = [f"celery-task-meta-{i}" for i in ids]
        t0 = time.monotonic()
        proc = start_worker()
        peak = 0
        done = 0
        while done < self.n:
            time.sleep(0.05)
            peak = max(peak, tree_rss_kb(proc.pid))
            done = sum(1 for v in self.r1.mget(keys) if v is not None)
            if time.monotonic() - t0 > 600:
                raise SystemExit(f"{label}: only {done}/{self.n} results after 600 s")
        wall = time.monotonic() - t0
        metas = [redis_json(v) for v in self.r1.mget(keys)]
        bad = [m for m in metas if m["status"] != "SUCCESS" or m["result"] != 4]
        if bad:
            raise SystemExit(f"{label}: {len(bad)} wrong results, e.g. {bad[0]}")
        dates = sorted(datetime.datetime.fromisoformat(m["date_done"]) for m in metas)
        span = (dates[-1] - dates[0]).total_seconds()
        latency = self.pickup_latency(proc)
        proc.terminate()
        proc.wait(timeout=60)
        return {"label": label, "rate": (self.n - 1) / span if span > 0 else float("inf"), "wall": wall,
                "rss_mb": peak / 1024, "latency": latency}

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


def redis_json(v):
    import json
    return json.loads(v)


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
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/celery-autoscale"))
    a = ap.parse_args()
    if not os.access(a.binary, os.X_OK):
        raise SystemExit(f"{a.binary} not found: cargo build --release")
    b = Bench(a.tasks, a.binary)
    try:
        rust = b.drain(b.start_rust, "rust worker")
        py = b.drain(b.start_python, "python celery")
    finally:
        b.close()
    print(f"\nDrain {a.tasks} × tasks.cpu_bound(10), results stored, concurrency 2, one Redis on loopback")
    print(f"{'worker':<16}{'tasks/s':>10}{'wall s':>9}{'peak RSS MB':>13}{'pickup p50 ms':>15}{'p99 ms':>9}")
    for r in (rust, py):
        print(f"{r['label']:<16}{r['rate']:>10.0f}{r['wall']:>9.2f}{r['rss_mb']:>13.1f}"
              f"{r['latency']['p50']:>15.2f}{r['latency']['p99']:>9.2f}")
    print(f"\nthroughput ratio rust/python: {rust['rate'] / py['rate']:.1f}×   (goal ≥ 10×)")
    print(f"memory ratio python/rust:     {py['rss_mb'] / rust['rss_mb']:.1f}×   (goal ≥ 10×)")
    print(f"idle pickup p50 rust:         {rust['latency']['p50']:.2f} ms (goal < 2 ms)")


if __name__ == "__main__":
    main()
