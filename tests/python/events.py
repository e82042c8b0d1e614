"""Celery's own event receiver, driven by the Rust integration tests.

    events.py <seconds>

Listens on the broker in BROKER_URL with `app.events.Receiver` (what Flower and
`celery events` use) and prints every event it receives as one JSON line, flushed at once,
until <seconds> have passed or it is terminated.
"""
import json
import os
import sys
import time

from celery import Celery

app = Celery("events", broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"))


def main():
    deadline = time.monotonic() + float(sys.argv[1])

    def on_event(event):
        print(json.dumps(event), flush=True)
        if time.monotonic() > deadline:
            recv.should_stop = True

    with app.connection() as conn:
        recv = app.events.Receiver(conn, handlers={"*": on_event})
        try:
            recv.capture(limit=None, timeout=float(sys.argv[1]), wakeup=False)
        except Exception:  # the timeout ends the capture; the test reads what was printed
            pass


if __name__ == "__main__":
    main()
