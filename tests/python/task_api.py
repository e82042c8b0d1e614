"""Python Celery as the client of the task-API tests (tests/task_api.rs, tests/custom_task.rs).

    task_api.py retries '<spec>'    send the calls of a client.py spec while watching Redis with
                                    MONITOR; print each call's outcome and every message LPUSHed to
                                    a queue: {"id", "retries", "eta", "pushed_at"} (Redis time)
    task_api.py progress '<call>'   send one call and poll AsyncResult(id).state/.info until it is
                                    ready; print the distinct (state, info) seen, then the result
"""
import datetime
import json
import re
import sys
import threading
import time

import redis

from client import app, outcome, send

PUSH = re.compile(r'^LPUSH (\S+) (.*)$', re.S)


def watch(url, seen, stop):
    r = redis.Redis.from_url(url)
    with r.monitor() as m:
        stop["ready"].set()
        for cmd in m.listen():
            if stop["done"].is_set():
                return
            command = cmd.get("command", "")
            match = PUSH.match(command)
            if not match:
                continue
            body = match.group(2)
            # The message is kombu's JSON envelope; MONITOR escapes only what Redis must.
            ident = re.search(r'"id": "([^"]+)"', body)
            retries = re.search(r'"retries": (\d+)', body)
            eta = re.search(r'"eta": (null|"[^"]+")', body)
            if not ident or not retries:
                continue
            seen.append({
                "queue": match.group(1),
                "id": ident.group(1),
                "retries": int(retries.group(1)),
                "eta": None if not eta or eta.group(1) == "null" else eta.group(1).strip('"'),
                "pushed_at": cmd["time"],
            })


def retries(spec):
    seen, stop = [], {"ready": threading.Event(), "done": threading.Event()}
    watcher = threading.Thread(target=watch, args=(app.conf.broker_url, seen, stop), daemon=True)
    watcher.start()
    stop["ready"].wait(10)
    time.sleep(0.2)
    results = send(spec)
    outcomes = [outcome(r, c.get("timeout", 60)) for r, c in zip(results, spec)]
    stop["done"].set()
    # A last command so the MONITOR loop sees `done`.
    redis.Redis.from_url(app.conf.broker_url).ping()
    watcher.join(5)
    pushes = []
    for p in seen:
        if p["eta"] is not None:
            eta = datetime.datetime.fromisoformat(p["eta"]).timestamp()
            p["countdown"] = eta - p["pushed_at"]
        pushes.append(p)
    return {"outcomes": outcomes, "pushes": pushes}


def progress(call):
    result = send([call])[0]
    seen = []
    deadline = time.time() + call.get("timeout", 60)
    while time.time() < deadline:
        state, info = result.state, result.info
        if state not in ("SUCCESS", "FAILURE"):
            entry = {"state": state, "info": info if isinstance(info, (dict, list, int, float, str, type(None))) else repr(info)}
            if not seen or seen[-1] != entry:
                seen.append(entry)
        if result.ready():
            break
        time.sleep(0.02)
    return {"seen": seen, "final": outcome(result, 30)}


def main():
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    out = {"retries": retries, "progress": progress}[mode](spec)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
