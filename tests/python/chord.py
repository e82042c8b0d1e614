"""Send a chord from Python; print the header tasks' states and the error they raised."""
import json
import os

from celery import Celery, chord, signature

app = Celery("client", broker=os.environ["BROKER_URL"], backend=os.environ["BACKEND_URL"])
callback = chord(
    [signature("tasks.cpu_bound", args=[10], app=app), signature("tasks.cpu_bound", args=[20], app=app)],
    signature("tasks.io_bound", args=[0], app=app),
).apply_async()
states, error = [], None
for r in callback.parent.results:
    try:
        r.get(timeout=15)
    except Exception as exc:  # the test asserts on it
        error = str(exc)
    states.append(r.state)
print(json.dumps({"header_states": states, "header_error": error}))
