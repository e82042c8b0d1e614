#!/usr/bin/env python3
"""Enqueue and exporter benchmark, one Redis on loopback, one run.

    .venv/bin/python scripts/bench_enqueue.py [--tasks 200000] [--python-tasks 20000]

1. Enqueue rate: `celery-autoscale loadgen burst` vs a Python Celery `send_task` loop vs
   `redis-benchmark -t lpush` (pipelined, 64 per round trip, with values as large as a task
   message). Ratios against both.
2. Exporter poll time (its own poll_duration histogram): 10 queues × 4 priority lists filled,
   and 100k entries in kombu's `unacked` hash.
Stops by itself; nothing leaves loopback.
"""
import argparse
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import redis
from celery import Celery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(body, name):
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name + " "))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=200_000, help="tasks loadgen sends")
    ap.add_argument("--python-tasks", type=int, default=20_000, help="tasks the Python loop sends")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/celery-autoscale"))
    a = ap.parse_args()
    if not os.access(a.binary, os.X_OK):
        raise SystemExit(f"{a.binary} not found: cargo build --release")
    if not shutil.which("redis-benchmark"):
        raise SystemExit("redis-benchmark not found: apt-get install redis-tools")
    tmp = tempfile.mkdtemp(prefix="bench-enqueue-")
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        # 1a. Python send_task loop (one producer connection, as an application would).
        app = Celery("bench", broker=url)
        t = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for i in range(a.python_tasks):
                app.send_task("tasks.cpu_bound", args=[3_000_000], producer=producer)
        py_rate = a.python_tasks / (time.perf_counter() - t)
        size = len(r.lindex("celery", 0))
        r.flushall()

        # 1b. loadgen burst.
        out = subprocess.run([a.binary, "loadgen", "burst", "--n", str(a.tasks), "--task", "cpu"],
                             env=dict(os.environ, BROKER_URL=url, RUST_LOG="warn"), capture_output=True, text=True,
                             check=True).stdout
        lg_rate = float(re.search(r"([\d.]+) tasks/s", out).group(1))
        assert r.llen("celery") == a.tasks, "every task arrived"
        lg_size = len(r.lindex("celery", 0))
        r.flushall()

        # 1c. redis-benchmark LPUSH, pipelined, values the size of a task message.
        rb = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "lpush", "-n", str(a.tasks), "-P", "64",
                             "-d", str(lg_size), "-q"], capture_output=True, text=True, check=True).stdout
        rb_rate = float(re.search(r"LPUSH: ([\d.]+) requests per second", rb.replace("\r", "\n")).group(1))
        r.flushall()

        # 2. Exporter poll time.
        pipe = r.pipeline()
        queues = [f"q{i}" for i in range(10)]
        for q in queues:
            for key in (q, f"{q}\x06\x163", f"{q}\x06\x166", f"{q}\x06\x169"):
                pipe.lpush(key, *["x" * 10] * 100)
        pipe.execute()
        small = exporter_poll_ms(a.binary, url, ",".join(queues))
        subprocess.run([a.binary, "loadgen", "burst", "--n", "1", "--task", "cpu"],
                             env=dict(os.environ, BROKER_URL=url, RUST_LOG="warn"), capture_output=True, check=True)
        body = r.rpop("celery")
        entry = b"[" + body + b', "", "celery"]'
        for chunk in range(100):
            pipe = r.pipeline()
            for i in range(1000):
                pipe.hset("unacked", f"tag-{chunk}-{i}", entry)
            pipe.execute()
        big = exporter_poll_ms(a.binary, url, "celery")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nEnqueue, one Redis on loopback (task message ≈ {lg_size} bytes; Python's ≈ {size})")
    print(f"{'producer':<44}{'tasks/s':>12}")
    print(f"{'loadgen burst --n ' + str(a.tasks):<44}{lg_rate:>12.0f}")
    print(f"{'python send_task loop (' + str(a.python_tasks) + ')':<44}{py_rate:>12.0f}")
    print(f"{'redis-benchmark -t lpush -P 64 -d ' + str(lg_size):<44}{rb_rate:>12.0f}")
    print(f"\nloadgen / python:           {lg_rate / py_rate:.1f}×   (goal ≥ 20×)")
    print(f"loadgen / redis-benchmark:  {100 * lg_rate / rb_rate:.0f} %  (goal ≥ 50 %)")
    print(f"\nExporter poll, mean: 10 queues × 4 priority lists: {small:.2f} ms; "
          f"1 queue with 100k unacked entries: {big:.1f} ms")


def exporter_poll_ms(binary, url, queues, polls=20):
    port = free_port()
    proc = subprocess.Popen([binary, "exporter", "--queues", queues, "--interval", "0.25",
                             "--listen", f"127.0.0.1:{port}"], env=dict(os.environ, BROKER_URL=url, RUST_LOG="warn"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                n = metric(body, "celery_queue_exporter_poll_duration_seconds_count")
                if n >= polls:
                    if metric(body, "celery_queue_exporter_last_poll_ok") != 1:
                        raise SystemExit("exporter polls failed")
                    return 1000 * metric(body, "celery_queue_exporter_poll_duration_seconds_sum") / n
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("exporter did not complete its polls")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
