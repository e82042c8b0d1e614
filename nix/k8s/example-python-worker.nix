# Example: autoscale Python Celery workers, not ours, on the same External metric. The pool `worker`
# runs a Python image with `celery -A tasks worker` (the seed's worker shape); the HPA, the exporter,
# the adapter and everything else stay as in the base. Rendered to k8s/examples/python-worker/, a
# kustomize Component over k8s/ (scripts/render-k8s.sh computes its patches from this render and the
# base's). The image is yours: a Python image with celery[redis] and your tasks module, e.g.
#   FROM python:3.12-slim
#   RUN pip install --no-cache-dir 'celery[redis]==5.5.3'
#   COPY tasks.py /app/tasks.py
#   WORKDIR /app
# The app reads BROKER_URL and BACKEND_URL, and VISIBILITY_TIMEOUT into broker_transport_options
# (as tests/python/tasks.py does). Set its name with
#   cd k8s/examples/python-worker && kustomize edit set image registry.example.com/celery-tasks=<yours>
{
  imports = [ ./default.nix ];

  celeryAutoscale.workers.worker = {
    kind = "python-celery";
    image = "registry.example.com/celery-tasks:1.0";
    celeryApp = "tasks";
  };
}
