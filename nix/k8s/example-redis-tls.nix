# Example: Redis over TLS, and task events for Flower. The in-cluster Redis serves TLS only with the
# Secret redis-tls (tls.crt, tls.key and ca.crt: what a cert-manager Certificate for the DNS name
# `redis` writes); every client mounts that Secret's ca.crt read-only at /etc/redis-ca and connects
# with rediss://…?ssl_cert_reqs=required&ssl_ca_certs=/etc/redis-ca/ca.crt, the query options
# redis-py and kombu take, so a Python Celery worker's URL is the same. The workers send task
# events (--events), which Flower needs (README: "Flower beside the workers").
# Rendered to k8s/examples/redis-tls/, a kustomize Component over k8s/. A Redis outside the cluster:
# set celeryAutoscale.redis.host/port and caSecret only, and open egress to it in network-policy.nix.
# The loadgen Job (k8s/jobs) is rendered with the base's plain URLs.
{
  imports = [ ./default.nix ];

  celeryAutoscale.redis = {
    serverTlsSecret = "redis-tls";
    caSecret = "redis-tls";
  };
  celeryAutoscale.workers.worker.events = true;
}
