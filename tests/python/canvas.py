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
                                     queue 'bodyq'), 'expired' (member 1 expired 30 s ago),
                                     'terminate' (member 1 is io_bound(60)), 'fail' (member 1, xsum([1, "a"]), fails; errback to queue 'errq')
    canvas.py maps                   task.map / .starmap / .chunks(...).group() and a map over a task
                                     nobody registered; prints each outcome
    canvas.py followups              a chain step, two links and two errbacks with their own options, each
                                     parked on a queue nobody consumes (hold, links, errq, errs)
    canvas.py errback_countdown      chain(cpu_bound(10), xsum([1, "a"]) with countdown=2 and its own
                                     link_error io_bound(0), task id ERRBACK_ID)
    canvas.py routed                 chain(cpu_bound(10), xsum) with no queue on the step
    canvas.py nested                 a | group(b, c); a | group(b, c, d) | xsum; a with link=group(...);
                                     a with link=chain(...); prints each value
    canvas.py bodies                 chords whose body is a group, a chain, a chord, a chain ending in a
                                     group, and a group body whose chord fails; prints each outcome
    canvas.py parked_bodies          the fixed-id chords of 'bodies' (header c001, c002) with the body's
                                     messages parked on queue 'hold': a group body (c003, c004), a chain
                                     body (c005 then c006)
    canvas.py parked_group_chain     chain(cpu_bound(100) c001, group(chain(cpu_bound c002 on 'hold',
                                     cpu_bound c003), cpu_bound c004 on 'hold')): the group as a worker
                                     sends it
    canvas.py headers                chord headers holding a group and a chain, sent by the client, and a
                                     chord step of a chain whose header holds a chain (or a group), sent
                                     by the worker; prints each outcome
    canvas.py chunks_task            the celery.chunks message itself (send_task), and one whose n is 0;
                                     prints the stored GroupResult's shape and its values
    canvas.py send N                 send a chord of N members (cpu_bound(200 + i)) whose body goes
                                     to queue 'bodyq'; prints the group id and the member ids

Configured by BROKER_URL and BACKEND_URL.
"""
import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone

from celery import Celery, chain, chord, group, signature
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


def outcome(get):
    """{"ok": True, "value": get()}, or what get() raised, in the form the tests compare."""
    try:
        return {"ok": True, "value": get()}
    except Exception as exc:  # the test asserts on it
        return exception(exc)


def outcomes(calls):
    """outcome() of each canvas call's result, by name."""
    return {what: outcome(lambda: call().get(timeout=60)) for what, call in calls.items()}


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
        # .get() on the chord re-raises the failed header member's error (Celery's
        # _maybe_reraise_parent_error); the body itself holds the ChordError.
        out = outcomes({"get": lambda: result, "body": lambda: app.AsyncResult(result.id)})
        out.update({"id": result.id, "state": result.state, "errback_id": ERRBACK_ID})
        print(json.dumps(out))
    elif mode == "keys":
        case = sys.argv[2]
        if case == "fail":
            # xsum([1, "a"]) fails with the same TypeError on both workers.
            header = [sig("tasks.cpu_bound", 100, task_id=fixed(1)), sig("tasks.xsum", [1, "a"], task_id=fixed(2))]
            errback = sig("tasks.io_bound", task_id=ERRBACK_ID, queue="errq")
            body = sig("tasks.xsum", task_id=fixed(3), queue="bodyq").on_error(errback)
        elif case == "expired":
            # Member 2 expired before anyone could run it.
            past = datetime.now(timezone.utc) - timedelta(seconds=30)
            header = [sig("tasks.cpu_bound", 100, task_id=fixed(1)),
                      sig("tasks.cpu_bound", 1000, task_id=fixed(2), expires=past)]
            body = sig("tasks.xsum", task_id=fixed(3), queue="bodyq")
        elif case == "terminate":
            # Member 2 runs for a minute unless it is terminated.
            header = [sig("tasks.cpu_bound", 100, task_id=fixed(1)),
                      sig("tasks.io_bound", 60, task_id=fixed(2))]
            body = sig("tasks.xsum", task_id=fixed(3), queue="bodyq")
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
        print(json.dumps(outcomes({what: c.apply_async for what, c in calls.items()})))
    elif mode == "followups":
        # Follow-ups with their own options, parked on queues nobody consumes: a chain step
        # (countdown, expires, priority, time limits, its own link_error), two link callbacks
        # (sent as one group) and two errbacks of a failing task (always a group).
        step = sig("tasks.xsum", task_id=fixed(2), queue="hold", countdown=30, expires=600, priority=5,
                   time_limit=60, soft_time_limit=50, headers={"x-trace": "t-1"})
        step.on_error(sig("tasks.io_bound", task_id=fixed(6), queue="errq"))
        chain(sig("tasks.cpu_bound", 10, task_id=fixed(1)), step).apply_async()
        first = sig("tasks.cpu_bound", 100, task_id=fixed(3))
        first.link(sig("tasks.xsum", task_id=fixed(7), queue="links"))
        first.link(sig("tasks.io_bound", 0, task_id=fixed(8), queue="links").set(immutable=True))
        first.apply_async()
        bad = sig("tasks.xsum", [1, "a"], task_id=fixed(4))
        bad.on_error(sig("tasks.io_bound", task_id=fixed(9), queue="errs"))
        bad.on_error(sig("tasks.cpu_bound", task_id=fixed(5), queue="errs"))
        bad.apply_async()
        print(json.dumps({"sent": 3}))
    elif mode == "errback_countdown":
        # A chain whose second step fails after its countdown; its own link_error fires.
        step = sig("tasks.xsum", [1, "a"], task_id=fixed(2), countdown=2).set(immutable=True)
        step.on_error(signature("tasks.io_bound", args=[0], app=app, immutable=True).set(task_id=ERRBACK_ID))
        chain(sig("tasks.cpu_bound", 10, task_id=fixed(1)), step).apply_async()
        print(json.dumps({"errback": ERRBACK_ID}))
    elif mode == "routed":
        # A chain step that names no queue: the worker's routing table decides.
        chain(sig("tasks.cpu_bound", 10, task_id=fixed(1)), sig("tasks.xsum", task_id=fixed(2))).apply_async()
        print(json.dumps({"step": fixed(2)}))
    elif mode == "nested":
        # Groups and chains inside chains and links; each value as a Python worker gives it.
        cpu = lambda *a, **o: sig("tasks.cpu_bound", *a, **o)
        out = {}
        r = chain(cpu(100).set(immutable=True), group(cpu(), cpu())).apply_async()
        out["chain_then_group"] = r.get(timeout=60)
        r = chain(cpu(100).set(immutable=True), group(cpu(), cpu(), cpu(1000).set(immutable=True)), sig("tasks.xsum")).apply_async()
        out["chain_group_task"] = r.get(timeout=60)
        first = cpu(100)
        first.link(group(cpu(task_id=fixed(5)), cpu(task_id=fixed(6))))
        first.apply_async().get(timeout=60)
        out["link_group"] = [app.AsyncResult(fixed(n)).get(timeout=60) for n in (5, 6)]
        first = cpu(100)
        first.link(chain(cpu(), cpu(task_id=fixed(7))))
        first.apply_async().get(timeout=60)
        out["link_chain"] = app.AsyncResult(fixed(7)).get(timeout=60)
        # A chain inside a group a worker sends: the group's result is the chain's last value.
        r = chain(cpu(100), group(chain(cpu(), cpu()), cpu(1000).set(immutable=True))).apply_async()
        out["group_of_chain"] = r.get(timeout=60)
        print(json.dumps(out))
    elif mode == "bodies":
        cpu, xsum = (lambda *a, **o: sig("tasks.cpu_bound", *a, **o)), (lambda *a, **o: sig("tasks.xsum", *a, **o))
        header = lambda: [cpu(10), cpu(100)]  # [4, 25]
        calls = {
            "group": lambda: chord(header())(group(xsum(), cpu(1000).set(immutable=True))),
            "chain": lambda: chord(header())(chain(xsum(), cpu())),
            "chord": lambda: chord(header())(chord([xsum(), xsum()], xsum())),
            "chain_then_group": lambda: chord(header())(chain(xsum(), group(cpu(), cpu()))),
        }
        out = outcomes(calls)
        # A failing header member fails each member of a group body with the ChordError.
        r = chord([cpu(10), xsum([1, "a"])])(group(xsum(task_id=fixed(5)), xsum(task_id=fixed(6))))
        out["group_fail"] = outcome(lambda: r.get(timeout=60))
        members = []
        for n in (5, 6):
            m = app.AsyncResult(fixed(n))
            deadline = time.monotonic() + 30
            while m.state == "PENDING" and time.monotonic() < deadline:
                time.sleep(0.1)
            members.append({"state": m.state, "exc_type": type(m.result).__name__,
                            "exc_args": [str(a) for a in getattr(m.result, "args", ())]})
        out["group_fail_members"] = members
        print(json.dumps(out))
    elif mode == "parked_bodies":
        hold = dict(queue="hold")
        header = [sig("tasks.cpu_bound", 10, task_id=fixed(1)), sig("tasks.cpu_bound", 100, task_id=fixed(2))]
        body = group(sig("tasks.xsum", task_id=fixed(3), **hold), sig("tasks.cpu_bound", 1000, task_id=fixed(4), **hold).set(immutable=True))
        c = chord(header, body)
        c.options["task_id"] = GROUP_ID
        c.apply_async()
        header = [sig("tasks.cpu_bound", 10, task_id=fixed(7)), sig("tasks.cpu_bound", 100, task_id=fixed(8))]
        c = chord(header, chain(sig("tasks.xsum", task_id=fixed(5), **hold), sig("tasks.cpu_bound", task_id=fixed(6))))
        c.apply_async()
        print(json.dumps({"group": GROUP_ID}))
    elif mode == "parked_group_chain":
        hold = dict(queue="hold")
        cpu = lambda *a, **o: sig("tasks.cpu_bound", *a, **o)
        inner = chain(cpu(task_id=fixed(2), **hold), cpu(task_id=fixed(3)))
        chain(cpu(100, task_id=fixed(1)), group(inner, cpu(task_id=fixed(4), **hold))).apply_async()
        print(json.dumps({"sent": 1}))
    elif mode == "headers":
        cpu, xsum = (lambda *a, **o: sig("tasks.cpu_bound", *a, **o)), (lambda *a, **o: sig("tasks.xsum", *a, **o))
        acc = sig("celery.accumulate")
        calls = {
            "group_in_header": lambda: chord([group(cpu(10), cpu(11)), cpu(100)])(acc),
            "chain_in_header": lambda: chord([chain(cpu(100), cpu()), cpu(10)])(xsum()),
            "chain_in_header_in_chain": lambda: chain(cpu(100), group(chain(cpu(), cpu()), cpu(1000).set(immutable=True)), xsum()).apply_async(),
            "group_in_header_in_chain": lambda: chain(cpu(100), group(group(cpu(), cpu()), cpu()), xsum()).apply_async(),
        }
        print(json.dumps(outcomes(calls)))
    elif mode == "chunks_task":
        from celery.result import result_from_tuple
        cpu = dict(sig("tasks.cpu_bound"))
        r = app.send_task("celery.chunks", args=[cpu, [(10,), (100,), (1000,), (2,), (0,)], 2])
        v = r.get(timeout=60)
        out = {"shape": [len(v), len(v[0]), isinstance(v[0][0], str), v[0][1], [len(m) for m in v[1]]],
               "value": result_from_tuple(v, app).get(timeout=60)}
        out["bad_n"] = outcome(lambda: app.send_task("celery.chunks", args=[cpu, [(10,)], 0]).get(timeout=60))
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
