"""A Python Celery client driven by the Rust integration tests.

    client.py run '<json spec>'        send every call, then wait for each result
    client.py send '<json spec>'       send only; print the task ids

A spec is a list of calls: {"task": name, "args": [...], "kwargs": {...},
"options": {apply_async options: countdown, eta (ISO string), expires (seconds or ISO),
time_limit, soft_time_limit, priority, queue, ignore_result, link, link_error,
task_id}, "timeout": seconds}. link/link_error are {"task", "args", "kwargs",
"immutable"} signatures. Output: one JSON list with, per call, {"id", "ok": true, "value"}
or {"id", "ok": false, "exc_module", "exc_type", "exc_args", "state"}.
"""
import datetime
import json
import os
import sys

from celery import Celery, signature

app = Celery(
    "client",
    broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("BACKEND_URL", "redis://127.0.0.1:6379/1"),
)
# GLOBAL_KEYPREFIX: kombu's and Celery's `global_keyprefix`, in both transport options.
if os.environ.get("GLOBAL_KEYPREFIX"):
    app.conf.broker_transport_options = {"global_keyprefix": os.environ["GLOBAL_KEYPREFIX"]}
    app.conf.result_backend_transport_options = {"global_keyprefix": os.environ["GLOBAL_KEYPREFIX"]}


def options(call):
    opts = dict(call.get("options", {}))
    if isinstance(opts.get("eta"), str):
        opts["eta"] = datetime.datetime.fromisoformat(opts["eta"])
    if isinstance(opts.get("expires"), str):
        opts["expires"] = datetime.datetime.fromisoformat(opts["expires"])
    for key in ("link", "link_error"):
        if key in opts:
            s = opts[key]
            opts[key] = signature(s["task"], args=s.get("args", []), kwargs=s.get("kwargs", {}),
                                  immutable=s.get("immutable", False), app=app,
                                  options=s.get("options", {}))
    return opts


def send(spec):
    return [app.send_task(c["task"], args=c.get("args"), kwargs=c.get("kwargs"), **options(c)) for c in spec]


def outcome(result, timeout):
    try:
        value = result.get(timeout=timeout, propagate=True)
        return {"id": result.id, "ok": True, "value": value, "state": result.state}
    except Exception as exc:  # the test asserts on what came back
        return {"id": result.id, "ok": False, "exc_module": type(exc).__module__,
                "exc_type": type(exc).__name__, "exc_args": [repr(a) if not isinstance(a, (str, int, float)) else a for a in exc.args],
                "state": result.state}


def main():
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    results = send(spec)
    if mode == "send":
        print(json.dumps([r.id for r in results]))
        return
    print(json.dumps([outcome(r, c.get("timeout", 30)) for r, c in zip(results, spec)]))


if __name__ == "__main__":
    main()
