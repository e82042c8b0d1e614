"""Send a Celery chain from Python and print every step's result, first to last.

cpu_bound(1000) -> cpu_bound(<168>) -> io_bound(0) (immutable): expected [168, 39, 0].
"""
import json
import os

from celery import Celery, chain, signature

app = Celery("client", broker=os.environ["BROKER_URL"], backend=os.environ["BACKEND_URL"])
last = chain(
    signature("tasks.cpu_bound", args=[1000], app=app),
    signature("tasks.cpu_bound", app=app),
    signature("tasks.io_bound", args=[0], immutable=True, app=app),
).apply_async()
values = []
node = last
while node is not None:
    values.append(node.get(timeout=30))
    node = node.parent
print(json.dumps(list(reversed(values))))
