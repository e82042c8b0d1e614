"""Celery canvas from a real Python Celery 5.7 client, for tests/canvas.rs.

    canvas.py chord '[n, ...]'       chord([cpu_bound.s(n) ...])(xsum.s()).get(), and the same as
                                     group(...) | xsum.s(); prints both values
    canvas.py retry                  chord([flaky(1, countdown=0), cpu_bound(10)])(xsum): 1 + 4
    canvas.py big N                  send the same with N members cpu_bound(10) and return; prints the
                                     body's id and how long sending took
    canvas.py fail                   a chord whose second member fails (xsum([1, "a"])); the body has a
                                     link_error errback (io_bound, task id ERRBACK_ID); prints what
                                     .get() raised, and what the body's own result raises
    canvas.py keys CASE              send the fixed-id chord of a fixture case and return at once:
                                     'ordered'/'list' (member 1 goes to queue 'hold'; the body to
                                     queue 'bodyq'), 'fail' (member 1, xsum([1, "a"]), fails; errback to queue 'errq')
    canvas.py maps                   task.map / .starmap / .chunks(...).group() and a map over a task
                                     nobody registered; prints each outcome
    canvas.py send N                 send a chord of N members (cpu_bound(200 + i)) whose body goes
                                     to queue 'bodyq'; prints the group id and the member ids

Configured by BROKER_URL and BACKEND_URL.
"""
import json
import os
import sys
import time

from celery import Celery, chord, group, signature
from celery.canvas import chunks, xmap, xstarmap

app = Celery("client", broker=os.environ["BROKER_URL"], backend=os.environ["BACKEND_URL"])

GROUP_ID = "00000000-0000-4000-8000-00000000c000"
ERRBACK_ID = "00000000-0000-4000-8000-00000000c004"


def sig(name, *args, **options):
    return signature(name, args=list(args), app=app).set(**options)


def fixed(n):
    return f"00000000-0000-4000-8000-00000000c00{n}"


def exception(exc):
    return {"ok": False, "exc_module": type(exc).__module__, "exc_type": type(exc).__name__,
            "exc_args": [a if isinstance(a, (str, int, float)) else repr(a) for a in exc.args]}


def main():
    mode = sys.argv[1]
    if mode == "chord":
        ns = json.loads(sys.argv[2])
        result = chord([sig("tasks.cpu_bound", n) for n in ns])(sig("tasks.xsum"))
        # group(...) | task: Celery turns it into the same chord.
        piped = (group([sig("tasks.cpu_bound", n) for n in ns]) | sig("tasks.xsum")).apply_async()
        print(json.dumps({"value": result.get(timeout=60), "id": result.id, "piped": piped.get(timeout=60)}))
    elif mode == "retry":
        # A member that retries once (tasks.flaky) still counts once, in its place.
        header = [signature("tasks.flaky", args=[1], kwargs={"countdown": 0}, app=app), sig("tasks.cpu_bound", 10)]
        result = chord(header)(sig("tasks.xsum"))
        print(json.dumps({"value": result.get(timeout=60), "id": result.id}))
    elif mode == "big":
        n = int(sys.argv[2])
        started = time.monotonic()
        result = chord([sig("tasks.cpu_bound", 10) for _ in range(n)])(sig("tasks.xsum"))
        print(json.dumps({"body": result.id, "send_seconds": time.monotonic() - started}))
    elif mode == "fail":
        body = sig("tasks.xsum").on_error(sig("tasks.io_bound", task_id=ERRBACK_ID))
        result = chord([sig("tasks.cpu_bound", 10), sig("tasks.xsum", [1, "a"])])(body)
        out = {}
        # .get() on the chord re-raises the failed header member's error (Celery's
        # _maybe_reraise_parent_error); the body itself holds the ChordError.
        for what, r in (("get", result), ("body", app.AsyncResult(result.id))):
            try:
                out[what] = {"ok": True, "value": r.get(timeout=60)}
            except Exception as exc:  # the test asserts on it
                out[what] = exception(exc)
        out.update({"id": result.id, "state": result.state, "errback_id": ERRBACK_ID})
        print(json.dumps(out))
    elif mode == "keys":
        case = sys.argv[2]
        if case == "fail":
            # xsum([1, "a"]) fails with the same TypeError on both workers.
            header = [sig("tasks.cpu_bound", 100, task_id=fixed(1)), sig("tasks.xsum", [1, "a"], task_id=fixed(2))]
            errback = sig("tasks.io_bound", task_id=ERRBACK_ID, queue="errq")
            body = sig("tasks.xsum", task_id=fixed(3), queue="bodyq").on_error(errback)
        else:
            header = [sig("tasks.cpu_bound", 100, task_id=fixed(1)),
                      sig("tasks.cpu_bound", 1000, task_id=fixed(2), queue="hold")]
            body = sig("tasks.xsum", task_id=fixed(3), queue="bodyq")
        c = chord(header, body)
        c.options["task_id"] = GROUP_ID  # the header group's id
        c.apply_async()
        print(json.dumps({"group": GROUP_ID}))
    elif mode == "maps":
        cpu, xsum = sig("tasks.cpu_bound"), sig("tasks.xsum")
        calls = {
            "map": xmap(cpu, [10, 100, 1000]),
            "starmap": xstarmap(xsum, [[[1, 2]], [[3, 4, 5]], [[]]]),
            "chunks": chunks(cpu, [(10,), (100,), (1000,), (2,), (0,)], 2).group(),
            "map_bad_item": xmap(cpu, [10, "x"]),
            "map_not_registered": xmap(sig("tasks.nobody_has_this"), [1]),
        }
        out = {}
        for what, call in calls.items():
            try:
                out[what] = {"ok": True, "value": call.apply_async().get(timeout=60)}
            except Exception as exc:  # the test asserts on it
                out[what] = exception(exc)
        print(json.dumps(out))
    elif mode == "send":
        n = int(sys.argv[2])
        header = [sig("tasks.cpu_bound", 200 + i) for i in range(n)]
        result = chord(header)(sig("tasks.xsum", queue="bodyq"))
        print(json.dumps({"group": result.parent.id, "members": [r.id for r in result.parent.results],
                          "body": result.id}))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
