"""A Celery app of your own, for `celery-autoscale local --worker-command ... --task-name ...`.

The README's "Your own Python app" runs it: `local` sets BROKER_URL and BACKEND_URL in each
worker's environment (as a pod's Secret would), so the app reads them from there.
"""
import os
import time

from celery import Celery

app = Celery(
    "myapp",
    broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("BACKEND_URL", "redis://127.0.0.1:6379/1"),
)
# One task at a time per process slot, acknowledged when done: a scale-down's SIGTERM (Celery's
# warm shutdown) then loses nothing.
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1)


@app.task(name="myapp.resize")
def resize(width, height=1, seconds=0.5):
    """Stands in for real work: takes `seconds`, returns the pixel count."""
    time.sleep(seconds)
    return width * height
