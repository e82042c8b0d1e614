#!/usr/bin/env python3
"""The Kubernetes path, run for real on this machine: a local control plane built from upstream
(etcd, kube-apiserver, kube-controller-manager with the real HPA controller, kube-scheduler,
prometheus-adapter; scripts/control-plane/build.sh), Debian's Prometheus, a real redis-server, and
our pod-runner as the one Node. It applies the rendered k8s/ as a user would, checks the metric
path (APIService Available, the External metric equals the depth Redis holds, HPA ScalingActive),
runs the burst and the ramp with the real HPA on its default 15 s sync, replays the metric values
the HPA read through `celery-autoscale simulate --trace` and compares the replica sequences sync by
sync, then breaks three objects on purpose and checks that the run names each one.

Every process binds 127.0.0.1 and is stopped by the PID this script recorded, whatever fails.
Logs and the CSVs of each run stay in the work directory it prints (kept when a step fails or with
--keep). docs/CI.md describes every patch the local run makes to the rendered objects.

    scripts/control-plane/run.sh [--scenarios burst,ramp,burst-io,oscillate,scale-in,tuned] [--skip-negative] [--keep]
"""

import argparse
import base64
import csv
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import redis
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NS = "celery-autoscale"
METRIC_PATH = f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{NS}/celery_queue_depth?labelSelector=queue%3Dcelery"
APISERVICE = "v1beta1.external.metrics.k8s.io"
NODE = "local-node"

# Bounds of the KinD test (scripts/kind-e2e.sh explains each from the policy and the pipeline);
# the burst here is the same Job, so the same bounds hold.
UP_BOUND = 120  # ≥ 5 replicas after the burst's Job is created
READY_BOUND = 180  # ≥ 5 Ready workers
JOB_BOUND = 660  # the loadgen Job's activeDeadlineSeconds + 60
DOWN_BOUND = 280  # back to minReplicas after the queue is empty
# The ramp: 1 → 20 io tasks/s over 120 s (0.5 s each: one worker of concurrency 2 runs 4/s).
RAMP = ["--from", "1", "--to", "20", "--duration", "120"]
RAMP_TASK = ["--task", "io", "--io-seconds", "0.5"]
# The model's oscillate:10:8:60:300 (opt-in: about 8 min a run): 10 ± 8 io tasks/s, a 60 s period,
# 300 s; five whole periods, so loadgen sends mean × duration tasks.
OSCILLATE = ["--mean", "10", "--amplitude", "8", "--period", "60", "--duration", "300"]


class Fail(Exception):
    """A step that did not happen: the message names the object to look at."""


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} control-plane: {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Harness:
    def __init__(self, bin_dir, app, work):
        self.bin, self.app, self.work = bin_dir, app, work
        self.logs = os.path.join(work, "logs")
        self.pki = os.path.join(work, "pki")
        for d in (self.logs, self.pki, os.path.join(work, "pids"), os.path.join(work, "sd")):
            os.makedirs(d, exist_ok=True)
        self.procs = []  # (name, Popen), in start order
        self.ports = {n: free_port() for n in ("etcd", "etcd_peer", "apiserver", "kcm", "scheduler", "redis", "prometheus")}
        self.kubeconfig = os.path.join(work, "admin.kubeconfig")
        self.redis_password = base64.b32encode(os.urandom(20)).decode().lower()

    # ---- processes -------------------------------------------------------------------------------
    def start(self, name, argv, env=None):
        out = open(os.path.join(self.logs, f"{name}.log"), "ab")
        # TZ=UTC: klog stamps kube-controller-manager's log in local time, and parse_syncs matches
        # those stamps with the HPA watch's UTC arrival times.
        base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.work, "TMPDIR": self.work, "TZ": "UTC"}
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**base, **(env or {})}, start_new_session=True, cwd=self.work)
        out.close()
        with open(os.path.join(self.work, "pids", f"{name}.pid"), "w") as f:
            f.write(str(p.pid))
        self.procs.append((name, p))
        return p

    def stop(self, name, grace=15):
        for i, (n, p) in enumerate(self.procs):
            if n == name:
                self._stop(n, p, grace)
                del self.procs[i]
                return

    @staticmethod
    def _stop(name, p, grace):
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"{name} (pid {p.pid}) outlived {grace} s after SIGTERM: SIGKILL")
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)

    def stop_all(self):
        # Last started, first stopped: the node (and what came after it) before the API server,
        # so its pods get their grace while the API server still answers.
        for name, p in reversed(self.procs):
            self._stop(name, p, 60 if name == "pod-runner" else 15)
        self.procs.clear()

    def alive(self, name):
        for n, p in self.procs:
            if n == name and p.poll() is None:
                return True
        raise Fail(f"{name} exited (code {dict(self.procs)[name].poll()}); see {self.logs}/{name}.log")

    # ---- kubectl ---------------------------------------------------------------------------------
    def kubectl(self, *args, input=None, check=True, timeout=90, kubeconfig=None):
        cmd = [os.path.join(self.bin, "kubectl"), "--kubeconfig", kubeconfig or self.kubeconfig, *args]
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise Fail(f"kubectl {' '.join(args[:4])}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def get_json(self, *args):
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def wait(self, what, fn, timeout, hint, every=1.0):
        """Calls fn until it returns a true value (returned); Fail naming `what` and `hint` after timeout."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                v = fn()
                if v:
                    return v
            except (Fail, subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
                last = e
            if time.monotonic() > deadline:
                why = f" (last: {last})" if last else ""
                raise Fail(f"{what}: not within {timeout} s{why}; {hint}")
            time.sleep(every)

    # ---- PKI and kubeconfigs ---------------------------------------------------------------------
    def openssl(self, *args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.pki)

    def ca(self, name, cn):
        self.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={cn}")

    def cert(self, name, subject, ca="ca", san=None):
        ext = os.path.join(self.pki, f"{name}.ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
            if san:
                f.write(f"subjectAltName={san}\n")
        self.openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        self.openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                     "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext)

    def write_kubeconfig(self, path, user):
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": f"https://127.0.0.1:{self.ports['apiserver']}",
                                                       "certificate-authority": f"{self.pki}/ca.crt"}}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "user"}}],
            "current-context": "local",
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(cfg, f)
        return path

    def make_pki(self):
        self.ca("ca", "celery-autoscale-test-ca")
        self.ca("front-proxy-ca", "celery-autoscale-test-front-proxy-ca")
        self.cert("apiserver", "/CN=kube-apiserver",
                  san="IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc")
        # Serving certificates of kube-controller-manager and kube-scheduler (otherwise self-signed).
        self.cert("controllers-serving", "/CN=127.0.0.1", san="IP:127.0.0.1,DNS:localhost")
        self.cert("front-proxy-client", "/CN=front-proxy-client", ca="front-proxy-ca")
        self.openssl("genrsa", "-out", "sa.key", "2048")
        self.openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        users = {"admin": "/O=system:masters/CN=celery-autoscale-test-admin",
                 "kcm": "/CN=system:kube-controller-manager", "scheduler": "/CN=system:kube-scheduler",
                 "node": f"/O=system:nodes/CN=system:node:{NODE}"}
        for name, subject in users.items():
            self.cert(name, subject)
            self.write_kubeconfig(os.path.join(self.work, f"{name}.kubeconfig"),
                                  {"client-certificate": f"{self.pki}/{name}.crt", "client-key": f"{self.pki}/{name}.key"})

    # ---- components ------------------------------------------------------------------------------
    def https_ok(self, url):
        ctx = ssl.create_default_context(cafile=f"{self.pki}/ca.crt")
        ctx.load_cert_chain(f"{self.pki}/admin.crt", f"{self.pki}/admin.key")
        with urllib.request.urlopen(url, context=ctx, timeout=3) as r:
            return r.status == 200

    def start_redis(self):
        conf = os.path.join(self.work, "redis.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:  # the password in a file, never on a command line
            f.write(f"bind 127.0.0.1\nport {self.ports['redis']}\nsave \"\"\nappendonly no\n"
                    f"dir {self.work}\nrequirepass {self.redis_password}\n")
        self.start("redis", ["redis-server", conf])
        self.redis = redis.Redis(host="127.0.0.1", port=self.ports["redis"], password=self.redis_password)
        self.wait("redis-server answering PING", lambda: self.redis.ping(), 20, f"see {self.logs}/redis.log")

    def start_control_plane(self):
        b, p, w = self.bin, self.pki, self.work
        e = self.ports
        self.start("etcd", [f"{b}/etcd", "--name=local", f"--data-dir={w}/etcd",
                            f"--listen-client-urls=http://127.0.0.1:{e['etcd']}",
                            f"--advertise-client-urls=http://127.0.0.1:{e['etcd']}",
                            f"--listen-peer-urls=http://127.0.0.1:{e['etcd_peer']}",
                            f"--initial-advertise-peer-urls=http://127.0.0.1:{e['etcd_peer']}",
                            f"--initial-cluster=local=http://127.0.0.1:{e['etcd_peer']}",
                            "--listen-metrics-urls=", "--unsafe-no-fsync", "--log-level=warn"])
        self.wait("etcd healthy", lambda: urllib.request.urlopen(f"http://127.0.0.1:{e['etcd']}/health", timeout=2).status == 200,
                  30, f"see {self.logs}/etcd.log")
        self.start("kube-apiserver", [
            f"{b}/kube-apiserver", f"--etcd-servers=http://127.0.0.1:{e['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={e['apiserver']}",
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={p}/apiserver.crt", f"--tls-private-key-file={p}/apiserver.key",
            f"--client-ca-file={p}/ca.crt", "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p}/sa.pub", f"--service-account-signing-key-file={p}/sa.key",
            "--service-cluster-ip-range=10.96.0.0/16",
            f"--requestheader-client-ca-file={p}/front-proxy-ca.crt", "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={p}/front-proxy-client.crt", f"--proxy-client-key-file={p}/front-proxy-client.key",
            f"--cert-dir={w}/apiserver-certs", "--profiling=false", "--v=1"])
        self.wait("kube-apiserver /readyz", lambda: self.https_ok(f"https://127.0.0.1:{e['apiserver']}/readyz"),
                  120, f"see {self.logs}/kube-apiserver.log")
        kcm = f"{w}/kcm.kubeconfig"
        # The controllers a Deployment, a Job and an HPA need. HPA flags stay at their defaults
        # (sync 15 s, tolerance 0.1) as in a cluster; the HPA's own behavior sets its windows.
        # horizontal=4 logs each sync's proposal and decision (parsed into the sync CSV; the metric
        # value each sync read comes from the HPA's status, see HpaWatch).
        self.start("kube-controller-manager", [
            f"{b}/kube-controller-manager", f"--kubeconfig={kcm}", f"--authentication-kubeconfig={kcm}",
            f"--authorization-kubeconfig={kcm}", "--bind-address=127.0.0.1", f"--secure-port={e['kcm']}",
            f"--tls-cert-file={p}/controllers-serving.crt", f"--tls-private-key-file={p}/controllers-serving.key",
            "--leader-elect=false", "--use-service-account-credentials",
            f"--service-account-private-key-file={p}/sa.key", f"--root-ca-file={p}/ca.crt",
            "--controllers=deployment-controller,replicaset-controller,statefulset-controller,job-controller,"
            "horizontal-pod-autoscaler-controller,disruption-controller,serviceaccount-controller,"
            "serviceaccount-token-controller,garbage-collector-controller,namespace-controller",
            "--v=2", "--vmodule=horizontal=4"])
        sch = f"{w}/scheduler.kubeconfig"
        self.start("kube-scheduler", [
            f"{b}/kube-scheduler", f"--kubeconfig={sch}", f"--authentication-kubeconfig={sch}",
            f"--authorization-kubeconfig={sch}", "--bind-address=127.0.0.1", f"--secure-port={e['scheduler']}",
            f"--tls-cert-file={p}/controllers-serving.crt", f"--tls-private-key-file={p}/controllers-serving.key",
            "--leader-elect=false", "--v=1"])
        self.wait("kube-controller-manager /healthz", lambda: self.https_ok(f"https://127.0.0.1:{e['kcm']}/healthz"),
                  60, f"see {self.logs}/kube-controller-manager.log")

    def start_pod_runner(self):
        self.start("pod-runner", [
            f"{self.bin}/pod-runner", f"--kubeconfig={self.work}/node.kubeconfig", f"--node-name={NODE}",
            "--cpu=4", "--memory=6Gi", f"--log-dir={self.logs}", f"--sd-dir={self.work}/sd",
            f"--image=celery-autoscale-app={self.app}", f"--image=celery-queue-exporter={self.app}",
            f"--endpoint=redis.{NS}:6379=127.0.0.1:{self.ports['redis']}",
            f"--endpoint=prometheus.{NS}:9090=127.0.0.1:{self.ports['prometheus']}"])

        def node_ready():
            node = self.get_json("node", NODE)
            return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        self.wait(f"Node {NODE} Ready", node_ready, 30, f"see {self.logs}/pod-runner.log")

    def start_prometheus(self):
        """Our rendered prometheus.yml and alerts.yml, from the applied ConfigMap; scrape targets that
        name a Service become file_sd files the pod-runner writes (its stand-in for cluster DNS)."""
        cm = self.get_json("-n", NS, "configmap", "prometheus-config")["data"]
        cfg = yaml.safe_load(cm["prometheus.yml"])
        sd = os.path.join(self.work, "sd")
        for job in cfg.get("scrape_configs", []):
            files = []
            for sc in job.pop("static_configs", []):
                for t in sc.get("targets", []):
                    host, port = t.rsplit(":", 1)
                    if host == "localhost" and job["job_name"] == "prometheus":
                        files.append(None)
                        job["static_configs"] = [{"targets": [f"127.0.0.1:{self.ports['prometheus']}"]}]
                    else:
                        files.append(f"{sd}/{host}_{port}.json")
            for d in job.pop("dns_sd_configs", []):
                files += [f"{sd}/{n}_{d['port']}.json" for n in d["names"]]
            files = [f for f in files if f]
            if files:
                job["file_sd_configs"] = [{"files": files, "refresh_interval": "1s"}]
        pdir = os.path.join(self.work, "prometheus")
        os.makedirs(pdir, exist_ok=True)
        with open(f"{pdir}/prometheus.yml", "w") as f:
            yaml.safe_dump(cfg, f)
        for name, text in cm.items():
            if name != "prometheus.yml":
                with open(f"{pdir}/{name}", "w") as f:
                    f.write(text)
        self.start("prometheus", ["prometheus", f"--config.file={pdir}/prometheus.yml",
                                  f"--storage.tsdb.path={pdir}/data",
                                  f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}"])
        self.wait("Prometheus ready", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{self.ports['prometheus']}/-/ready", timeout=2).status == 200, 60,
            f"see {self.logs}/prometheus.log")

    def start_adapter(self):
        """prometheus-adapter from the applied Deployment's args and ConfigMap (unchanged), as a
        local process: the ConfigMap volume becomes a directory, the Service address of Prometheus
        its loopback port, and the in-cluster credentials a kubeconfig with the adapter's
        ServiceAccount token (so the rendered RBAC decides what it may do)."""
        deploy = self.get_json("-n", NS, "deployment", "prometheus-adapter")
        spec = deploy["spec"]["template"]["spec"]
        c = spec["containers"][0]
        adir = os.path.join(self.work, "adapter")
        mounts = {}
        for vm in c.get("volumeMounts", []):
            vol = next(v for v in spec["volumes"] if v["name"] == vm["name"])
            local = os.path.join(adir, "volumes", vm["name"])
            os.makedirs(local, exist_ok=True)
            if "configMap" in vol:
                data = self.get_json("-n", NS, "configmap", vol["configMap"]["name"])["data"]
                for k, v in data.items():
                    with open(os.path.join(local, k), "w") as f:
                        f.write(v)
            mounts[vm["mountPath"].rstrip("/")] = local
        apisvc = self.get_json("apiservice", APISERVICE)["spec"]
        port = apisvc["service"].get("port", 443)
        args = []
        for a in c.get("args", []):
            flag, eq, val = a.partition("=")
            if flag == "--secure-port":
                val = str(port)  # ExternalName has no port mapping: listen on the APIService's port
            for mp, local in mounts.items():
                if val.startswith(mp + "/") or val == mp:
                    val = local + val[len(mp):]
            val = re.sub(r"//prometheus\.celery-autoscale\.svc(\.cluster\.local)?:9090",
                         f"//127.0.0.1:{self.ports['prometheus']}", val)
            args.append(flag + eq + val)
        token = self.kubectl("create", "token", spec["serviceAccountName"], "-n", NS, "--duration=2h").stdout.strip()
        kc = self.write_kubeconfig(os.path.join(self.work, "adapter.kubeconfig"), {"token": token})
        self.start("prometheus-adapter", [f"{self.bin}/adapter", *args, "--bind-address=127.0.0.1",
                                          f"--lister-kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                                          f"--authorization-kubeconfig={kc}", "--v=2"])

    # ---- manifests -------------------------------------------------------------------------------
    def rendered(self, path):
        """The kustomization as kubectl renders it (what `kubectl apply -k` would send)."""
        out = self.kubectl("kustomize", path).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    @staticmethod
    def local_patch(docs):
        """The one patch: the adapter's Service becomes ExternalName 127.0.0.1, the way kwok reaches a
        local APIService backend (Endpoints refuse loopback addresses; there is no kube-proxy)."""
        for d in docs:
            if d["kind"] == "Service" and d["metadata"]["name"] == "prometheus-adapter":
                d["spec"] = {"type": "ExternalName", "externalName": "127.0.0.1", "ports": d["spec"]["ports"]}
        return docs

    def apply(self, docs, what):
        r = self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=celery-autoscale-test",
                         "-f", "-", input=yaml.safe_dump_all(docs), check=False)
        if r.returncode != 0:
            raise Fail(f"applying {what}: {r.stderr.strip()}")
        return r.stdout

    # ---- the checks (the negative tests call these too) --------------------------------------------
    def condition_true(self, what, get, ctype, timeout, hint):
        """Waits until condition `ctype` of the object `get()` returns is True; the last reason
        and message go into the failure."""
        def true():
            cond = {c["type"]: c for c in get().get("status", {}).get("conditions", [])}.get(ctype, {})
            if cond.get("status") == "True":
                return True
            raise Fail(f"{ctype}={cond.get('status')} {cond.get('reason')}: {cond.get('message')}")
        self.wait(what, true, timeout, hint)

    def check_apiservice(self, timeout=90):
        self.condition_true(f"APIService {APISERVICE} Available", lambda: self.get_json("apiservice", APISERVICE),
                            "Available", timeout,
                            f"look at the APIService {APISERVICE} (group, version, service) and {self.logs}/prometheus-adapter.log")

    def metric_value(self):
        r = self.kubectl("get", "--raw", METRIC_PATH, check=False)
        if r.returncode != 0:
            raise Fail(r.stderr.strip())
        items = json.loads(r.stdout).get("items", [])
        if len(items) != 1:
            raise Fail(f"{len(items)} items")
        return quantity(items[0]["value"])

    def check_metric(self, timeout=150, equals=None):
        """The External metric is served as one item (and, with `equals`, equals it)."""
        def served():
            v = self.metric_value()
            want = equals() if callable(equals) else equals
            if want is not None and v != want:
                raise Fail(f"value {v}, Redis holds {want}")
            return True
        self.wait("the External metric celery_queue_depth{queue=celery}", served, timeout,
                  f"look at the adapter rule in ConfigMap {NS}/adapter-config (seriesQuery, metricsQuery), "
                  f"Prometheus' target celery-queue-exporter, and {self.logs}/prometheus-adapter.log", every=2)

    def check_hpa(self, timeout=120):
        self.condition_true(f"HorizontalPodAutoscaler {NS}/worker ScalingActive",
                            lambda: self.get_json("-n", NS, "hpa", "worker"), "ScalingActive", timeout,
                            f"look at the HPA's metric (name, selector) in HorizontalPodAutoscaler {NS}/worker and "
                            f"`kubectl describe hpa worker`; {self.logs}/kube-controller-manager.log")

    def deployment(self, name="worker"):
        d = self.get_json("-n", NS, "deployment", name)
        return d["spec"].get("replicas", 1), d["status"].get("readyReplicas", 0)

    def depth(self):
        return self.redis.llen("celery")

    def client_env(self):
        """BROKER_URL and BACKEND_URL of the harness' Redis, for a producer outside the cluster
        (in the environment, never on a command line: they hold the password)."""
        url = f"redis://:{self.redis_password}@127.0.0.1:{self.ports['redis']}"
        return {"BROKER_URL": f"{url}/0", "BACKEND_URL": f"{url}/1"}


class HpaWatch:
    """`kubectl get hpa worker --watch -o json` in the background: every status the HPA controller
    writes, stamped with the time it arrived. Each sync writes its status right after deciding, so
    the last status that arrives after sync k's log line and before sync k+1's is sync k's."""

    def __init__(self, h):
        self.events = []  # (arrival time, status)
        argv = [os.path.join(h.bin, "kubectl"), "--kubeconfig", h.kubeconfig, "-n", NS, "get", "hpa", "worker",
                "--watch", "--output-watch-events", "-o", "json", "--request-timeout=0"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(os.path.join(h.logs, "hpa-watch.log"), "ab"),
                                     stdin=subprocess.DEVNULL, start_new_session=True, text=True)
        h.procs.append(("hpa-watch", self.proc))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        dec, buf = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            buf += line
            try:
                obj, end = dec.raw_decode(buf.lstrip())
            except ValueError:
                continue
            buf = buf.lstrip()[end:]
            o = obj.get("object", obj)
            self.events.append((dt.datetime.now(dt.timezone.utc), o.get("status", {})))


def hpa_metric(status):
    """The External metric's total as the HPA read it: status.currentMetrics reports the per-pod
    average ceil(milli-total / status.replicas) in milli-units; times currentReplicas, rounded,
    that is the total exactly while it is an integer and replicas ≤ 999."""
    for m in status.get("currentMetrics") or []:
        ext = m.get("external")
        if ext and ext.get("metric", {}).get("name") == "celery_queue_depth":
            avg = ext.get("current", {}).get("averageValue")
            if avg is not None:
                return round(quantity(avg) * status.get("currentReplicas", 0))
    return None


def quantity(q):
    q = str(q)
    if q.endswith("m"):
        return int(q[:-1]) / 1000
    if q.endswith("k"):
        return int(q[:-1]) * 1000
    return float(q)


# ---- scenarios -----------------------------------------------------------------------------------

def run_burst(h, samples, label="burst"):
    docs = h.rendered(os.path.join(ROOT, "k8s", "jobs"))
    job = next(d for d in docs if d["kind"] == "Job")["metadata"]["name"]
    record(h, samples, label)
    log(f"burst: applying k8s/jobs (Job {job}: loadgen burst of 400 cpu tasks, --wait)")
    h.apply(docs, "k8s/jobs")
    t0 = time.monotonic()
    seen_up = seen_ready = done = None
    peak = 0
    while True:
        now = time.monotonic() - t0
        replicas, ready = h.deployment()
        peak = max(peak, replicas)
        record(h, samples, label)
        if seen_up is None and replicas >= 5:
            seen_up = now
            log(f"burst: ≥ 5 replicas after {now:.0f} s (bound {UP_BOUND} s)")
        if seen_ready is None and ready >= 5:
            seen_ready = now
            log(f"burst: ≥ 5 Ready workers after {now:.0f} s (bound {READY_BOUND} s)")
        if seen_up is None and now > UP_BOUND:
            raise Fail(f"burst: HorizontalPodAutoscaler {NS}/worker did not reach 5 replicas within {UP_BOUND} s")
        if seen_ready is None and now > READY_BOUND:
            raise Fail(f"burst: fewer than 5 worker pods Ready within {READY_BOUND} s; see pod-runner.log")
        if done is None:
            j = h.get_json("-n", NS, "job", job)
            conds = {c["type"] for c in j["status"].get("conditions", []) if c["status"] == "True"}
            if "Failed" in conds or j["status"].get("failed"):
                raise Fail(f"burst: Job {NS}/{job} failed: not every task ended SUCCESS (see {h.logs}/{NS}_{job}-*.log)")
            if "Complete" in conds:
                done = now
                log(f"burst: Job {job} complete after {now:.0f} s: every task SUCCESS; peak {peak} replicas")
            elif now > JOB_BOUND:
                raise Fail(f"burst: Job {NS}/{job} not complete within {JOB_BOUND} s")
        elif replicas == 1 and h.deployment()[0] == 1:
            log(f"burst: back to 1 replica {now - done:.0f} s after the Job (bound {DOWN_BOUND} s)")
            break
        elif now - done > DOWN_BOUND:
            raise Fail(f"burst: HorizontalPodAutoscaler {NS}/worker did not scale back to 1 within {DOWN_BOUND} s")
        h.alive("kube-controller-manager")
        time.sleep(2)
    pod_logs = [n for n in os.listdir(h.logs) if n.startswith(f"{NS}_{job}-")]
    results = loadgen_results(os.path.join(h.logs, sorted(pod_logs)[-1])) if pod_logs else {}
    h.kubectl("-n", NS, "delete", "job", job, "--cascade=foreground", "--timeout=60s")
    return {"peak": peak, **results}


def run_ramp(h, samples, label="ramp"):
    return run_producer(h, samples, label, ["ramp", *RAMP, *RAMP_TASK])


def run_burst_io(h, samples, label="burst-io"):
    """The model's burst:400 (0.5 s tasks, 2 per pod): `loadgen burst --task io` from outside."""
    return run_producer(h, samples, label, ["burst", "--n", "400", *RAMP_TASK])


def run_oscillate(h, samples, label="oscillate"):
    return run_producer(h, samples, label, ["oscillate", *OSCILLATE, *RAMP_TASK])


def run_producer(h, samples, label, load):
    """`loadgen <load> --wait` as a producer outside the cluster, as a user's app; watched until
    every task is SUCCESS and the Deployment is back at 1 replica."""
    argv = [h.app, "loadgen", *load, "--wait", "--wait-timeout", "800"]
    log(f"{label}: {' '.join(argv[1:])} (a producer outside the cluster, as a user's app)")
    env = h.client_env()
    record(h, samples, label)
    p = h.start(f"loadgen-{label}", argv, env=env)
    t0 = time.monotonic()
    peak, done = 0, None
    while True:
        now = time.monotonic() - t0
        replicas, _ = h.deployment()
        peak = max(peak, replicas)
        record(h, samples, label)
        if done is None:
            code = p.poll()
            if code is not None:
                if code != 0:
                    raise Fail(f"{label}: loadgen exited {code}: not every task ended SUCCESS (see {h.logs}/loadgen-{label}.log)")
                done = now
                log(f"{label}: every task SUCCESS after {now:.0f} s; peak {peak} replicas")
            elif now > 900:
                raise Fail(f"{label}: loadgen still waiting after 900 s")
        elif replicas == 1:
            log(f"{label}: back to 1 replica {now - done:.0f} s after the last result (bound {DOWN_BOUND} s)")
            break
        elif now - done > DOWN_BOUND:
            raise Fail(f"{label}: HorizontalPodAutoscaler {NS}/worker did not scale back to 1 within {DOWN_BOUND} s")
        time.sleep(2)
    h.stop(f"loadgen-{label}")
    return {"peak": peak, **loadgen_results(os.path.join(h.logs, f"loadgen-{label}.log"))}


def loadgen_results(path):
    """p95 latency (send to result) and makespan from `loadgen --wait`'s results line."""
    with open(path, errors="replace") as f:
        text = f.read()
    out = {}
    for key, pat in (("p95_latency", r"p95 ([0-9.]+) s"), ("makespan", r"makespan ([0-9.]+) s")):
        m = re.findall(pat, text)
        if m:
            out[key] = float(m[-1])
    return out


def figures(samples, label):
    """What the table of docs/Autoscaling.md reports, from the run's samples (every ~2 s): the
    replica-seconds of spec.replicas from the load's start until back at minReplicas, and the
    largest backlog Redis held, and the reversals (changes of direction of spec.replicas, as
    `simulate` counts them; a sample every ~2 s sees each 15 s sync's change)."""
    rows = [x for x in samples if x["scenario"] == label]
    ts = [dt.datetime.fromisoformat(x["time"]) for x in rows]
    rs = sum(r["spec_replicas"] * (t1 - t0).total_seconds() for r, t0, t1 in zip(rows, ts, ts[1:]))
    reversals, last = 0, 0
    for a, b in zip(rows, rows[1:]):
        d = (b["spec_replicas"] > a["spec_replicas"]) - (b["spec_replicas"] < a["spec_replicas"])
        if d and last and d != last:
            reversals += 1
        last = d or last
    return {"replica_s": round(rs), "peak_backlog": max((r["redis_depth"] for r in rows), default=0),
            "reversals": reversals}


def apply_profile(h, components, base_docs):
    """k8s/ with the given k8s/examples Components, applied over the running deployment; the
    adapter restarts on the new ConfigMap (its pod would, through the config checksum), and the
    HPA must be ScalingActive on its metric again."""
    kdir = os.path.join(h.work, "kustomize-" + "+".join(components))
    os.makedirs(kdir, exist_ok=True)
    with open(os.path.join(kdir, "kustomization.yaml"), "w") as f:
        yaml.safe_dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                        "resources": [os.path.relpath(os.path.join(ROOT, "k8s"), kdir)],
                        "components": [os.path.relpath(os.path.join(ROOT, "k8s", "examples", c), kdir) for c in components]}, f)
    docs = h.local_patch(h.rendered(kdir))
    h.apply(docs, f"k8s/ with k8s/examples/{{{','.join(components)}}}")
    old = next(d for d in base_docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "adapter-config")
    new = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "adapter-config")
    if old["data"] != new["data"]:
        h.stop("prometheus-adapter")
        h.start_adapter()
        h.check_apiservice()
    h.check_hpa()
    log(f"applied k8s/ with k8s/examples/{{{','.join(components)}}} ({len(docs)} objects); HPA ScalingActive")
    return docs


SCALE_IN_FLEET, SCALE_IN_BUSY, SCALE_IN_TASK_S = 6, 3, 90
TUNED_COMPONENTS = ["tuned", "pod-deletion-cost"]
COST = "controller.kubernetes.io/pod-deletion-cost"


def worker_pods(h):
    """The worker pods not being deleted: name → its deletion-cost annotation (None when unset)."""
    pods = h.get_json("-n", NS, "pods", "-l", "app.kubernetes.io/name=worker")["items"]
    return {p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(COST)
            for p in pods if not p["metadata"].get("deletionTimestamp")}


def active_by_pod(h):
    """celery_worker_active_tasks of every worker pod, read from its /metrics (the loopback ports
    the pod-runner lists for the scrape Service, labelled with the pod's name)."""
    path = os.path.join(h.work, "sd", f"worker-metrics.{NS}.svc_9191.json")
    with open(path) as f:
        groups = json.load(f)
    out = {}
    for g in groups:
        for t in g["targets"]:
            with urllib.request.urlopen(f"http://{t}/metrics", timeout=3) as r:
                m = re.search(r"(?m)^celery_worker_active_tasks (\d+)", r.read().decode())
            out[g["labels"]["pod"]] = int(m.group(1)) if m else 0
    return out


def set_min_replicas(h, n):
    h.kubectl("-n", NS, "patch", "hpa", "worker", "--type=merge", "-p", json.dumps({"spec": {"minReplicas": n}}))


def run_scale_in(h, cost, base_docs):
    """A scale-down of a partly busy fleet: 6 workers, 3 of them running a 90 s task, the HPA's
    minReplicas lowered to 3 while they run. Returns (tasks interrupted, extra runs): the tasks
    running on the pods the ReplicaSet controller deleted (each victim logs how many it was
    running when its SIGTERM came), and the runs again of those its shutdown timeout put back."""
    mode = "with deletion costs" if cost else "without deletion costs"
    if cost:
        apply_profile(h, ["pod-deletion-cost"], base_docs)
    set_min_replicas(h, SCALE_IN_FLEET)
    h.wait(f"scale-in: {SCALE_IN_FLEET} Ready workers", lambda: h.deployment() == (SCALE_IN_FLEET, SCALE_IN_FLEET)
           and len(worker_pods(h)) == SCALE_IN_FLEET, 180, f"see HorizontalPodAutoscaler {NS}/worker and pod-runner.log", every=2)
    if cost:
        h.wait("scale-in: every worker pod's deletion cost written (0, idle)",
               lambda: set(worker_pods(h).values()) == {"0"}, 60, f"see {h.logs}/{NS}_worker-*.log (pod deletion cost)")
        check_cost_policy(h)
    argv = [h.app, "loadgen", "burst", "--n", str(SCALE_IN_BUSY), "--task", "io", "--io-seconds", str(SCALE_IN_TASK_S),
            "--wait", "--wait-timeout", "900"]
    env = h.client_env()
    name = f"loadgen-scale-in-{'cost' if cost else 'plain'}"
    p = h.start(name, argv, env=env)
    busy = h.wait(f"scale-in: {SCALE_IN_BUSY} tasks running", lambda: (
        lambda a: {k for k, v in a.items() if v} if sum(a.values()) == SCALE_IN_BUSY else None)(active_by_pod(h)),
        60, f"see {h.logs}/{name}.log")
    if cost:
        def costs_follow():
            pods = worker_pods(h)
            return all((pods.get(n) or "0") != "0" for n in busy) and all(pods[n] == "0" for n in pods if n not in busy)
        h.wait("scale-in: busy pods cost more than idle ones", costs_follow, 30, f"see {h.logs}/{NS}_worker-*.log")
    before = worker_pods(h)
    log(f"scale-in ({mode}): {len(busy)} of {len(before)} workers busy ({', '.join(sorted(busy))}); "
        f"costs {dict(sorted(before.items()))}; minReplicas → {SCALE_IN_BUSY}")
    set_min_replicas(h, SCALE_IN_BUSY)
    h.wait(f"scale-in: the HPA down to {SCALE_IN_BUSY}", lambda: h.deployment()[0] == SCALE_IN_BUSY, 150,
           f"see HorizontalPodAutoscaler {NS}/worker (its scale-down window is 60 s)", every=2)
    h.wait(f"scale-in: {SCALE_IN_BUSY} worker pods left", lambda: len(worker_pods(h)) == SCALE_IN_BUSY, 60,
           "see kube-controller-manager.log (replicaset-controller)")
    victims = sorted(set(before) - set(worker_pods(h)))
    if p.poll() is not None:
        raise Fail(f"scale-in: the {SCALE_IN_TASK_S} s tasks ended before the scale-down, so it did not meet a busy "
                   "fleet; raise SCALE_IN_TASK_S in scripts/control-plane/run.py")
    # Each victim's own account of its SIGTERM: how many tasks it was running.
    interrupted = reruns = 0

    def drained():
        nonlocal interrupted, reruns
        interrupted = reruns = 0
        for v in victims:
            with open(os.path.join(h.logs, f"{NS}_{v}_worker.log"), errors="replace") as f:
                text = f.read()
            if '"worker stopped"' not in text:
                return False
            for line in text.splitlines():
                if "stopped fetching; waiting for running tasks" in line:
                    rec = json.loads(line)
                    running = int(rec.get("fields", rec).get("running", 0))
                    interrupted += running
                    if "shutdown timeout reached" in text:
                        reruns += running
        return True
    h.wait("scale-in: the deleted workers stopped", drained, 120, f"see {h.logs}/{NS}_<victim>_worker.log")
    busy_victims = sorted(set(victims) & busy)
    log(f"scale-in ({mode}): the ReplicaSet deleted {', '.join(victims)}: {len(busy_victims)} of them busy, "
        f"{interrupted} tasks interrupted ({reruns} put back and run again)")
    code = p.wait(SCALE_IN_TASK_S * 3 + 120)
    if code != 0:
        raise Fail(f"scale-in: loadgen exited {code}: not every task ended SUCCESS (see {h.logs}/{name}.log)")
    h.stop(name)
    hpa = next(d for d in base_docs if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == "worker")
    set_min_replicas(h, hpa["spec"]["minReplicas"])
    h.wait("scale-in: back to 1 replica", lambda: h.deployment() == (1, 1), DOWN_BOUND,
           f"see HorizontalPodAutoscaler {NS}/worker", every=2)
    if cost and (interrupted or busy_victims):
        raise Fail(f"scale-in with deletion costs: the ReplicaSet controller deleted busy workers {busy_victims} "
                   f"({interrupted} tasks interrupted); see the pods' {COST} in the log above")
    return interrupted, reruns


def check_cost_policy(h):
    """The worker's credential does what the rendered RBAC and admission policy allow, and no more:
    its own pod's cost annotation, not another pod's, not a label."""
    pods = sorted(worker_pods(h)) or [None]
    token = h.kubectl("create", "token", "worker", "-n", NS, "--duration=10m",
                      "--bound-object-kind=Pod", f"--bound-object-name={pods[0]}").stdout.strip()
    own, other = pods[0], None
    # The other pod: any pod of the namespace that is not this one (the exporter's).
    for p in h.get_json("-n", NS, "pods")["items"]:
        if p["metadata"]["name"] != own and not p["metadata"].get("deletionTimestamp"):
            other = p["metadata"]["name"]
            break
    ctx = ssl.create_default_context(cafile=f"{h.pki}/ca.crt")

    def patch(pod, meta):
        """A bare merge PATCH, as the worker sends it (kubectl patch would GET the pod first,
        which the Role does not grant)."""
        req = urllib.request.Request(
            f"https://127.0.0.1:{h.ports['apiserver']}/api/v1/namespaces/{NS}/pods/{pod}", method="PATCH",
            data=json.dumps({"metadata": meta}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                return r.status, ""
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}").get("message", "")
    cases = [("its own pod's cost", own, {"annotations": {COST: "0"}}, True),
             ("another pod's cost", other, {"annotations": {COST: "-5"}}, False),
             ("its own pod's labels", own, {"labels": {"app.kubernetes.io/name": "stolen"}}, False),
             ("another annotation", own, {"annotations": {"example.com/x": "1"}}, False),
             ("a cost that is not an integer", own, {"annotations": {COST: "high"}}, False)]
    for what, pod, meta, allowed in cases:
        status, why = patch(pod, meta)
        if (status == 200) != allowed:
            raise Fail(f"the worker's ServiceAccount {'could not' if allowed else 'could'} patch {what} ({pod}): "
                       f"HTTP {status} {why[:300]}; see Role worker-pod-deletion-cost and "
                       f"ValidatingAdmissionPolicy {NS}.worker-pod-deletion-cost")
        if not allowed:
            log(f"  refused {what}: HTTP {status} {why[:160]}")
    log(f"the worker's ServiceAccount may patch its own pod's {COST} and was refused the other {len(cases) - 1} patches")


def record(h, samples, scenario):
    """One sample of what the run sees: the depth in Redis and the metric the adapter serves."""
    try:
        v = h.metric_value()
    except Fail:
        v = ""
    replicas, ready = h.deployment()
    samples.append({"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                    "scenario": scenario, "redis_depth": h.depth(), "metric": v,
                    "spec_replicas": replicas, "ready_replicas": ready})


# ---- the HPA's syncs, from kube-controller-manager's log ---------------------------------------

KLOG = re.compile(r"^[IWE](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{6})\s+\d+ (\S+):\d+\] (.*)$")


def parse_syncs(path, year):
    """Each sync of HPA celery-autoscale/worker that computed a proposal: its time, the replicas it
    proposed from the metric, the replicas it found and the replicas it set."""
    syncs, current = [], None
    with open(path, errors="replace") as f:
        for line in f:
            m = KLOG.match(line)
            if not m:
                continue
            mo, d, hh, mm, ss, us, src, msg = m.groups()
            t = dt.datetime(year, int(mo), int(d), int(hh), int(mm), int(ss), int(us), tzinfo=dt.timezone.utc)
            if msg.startswith('"Proposing desired replicas"') and f"{NS}/worker" in msg:
                syncs.append({"t": t, "metric": None, "proposed": int(kv(msg, "desiredReplicas")),
                              "current": current, "replicas": None})
            elif msg.startswith('"Successfully rescaled"') and f"{NS}/worker" in msg and syncs:
                syncs[-1]["current"] = int(kv(msg, "currentReplicas"))
                syncs[-1]["replicas"] = int(kv(msg, "desiredReplicas"))
                current = syncs[-1]["replicas"]
            elif msg.startswith('"Decided not to scale"') and f"{NS}/worker" in msg and syncs:
                syncs[-1]["replicas"] = int(kv(msg, "desiredReplicas"))
                syncs[-1]["current"] = syncs[-1]["replicas"]
                current = syncs[-1]["replicas"]
    return [s for s in syncs if s["replicas"] is not None]


def attach_metrics(syncs, events):
    """The metric value of each sync: the last status the HPA wrote between its log line and the
    next sync's. A sync that wrote nothing left the status as it was: the same value."""
    prev = None
    for k, s in enumerate(syncs):
        end = syncs[k + 1]["t"] if k + 1 < len(syncs) else None
        vals = [hpa_metric(st) for t, st in events if t >= s["t"] and (end is None or t < end)]
        vals = [v for v in vals if v is not None]
        s["metric"] = vals[-1] if vals else prev
        prev = s["metric"]
    return syncs


def kv(msg, key):
    m = re.search(rf'\b{key}=("?)([^" ]*)\1', msg)
    if not m:
        raise ValueError(f"no {key} in {msg[:200]}")
    return m.group(2)


def compare(h, syncs, out_dir):
    """Replays the metric values the real HPA read through `simulate --trace` and compares."""
    if not syncs:
        raise Fail(f"no HPA sync of {NS}/worker in {h.logs}/kube-controller-manager.log (is --vmodule=horizontal=4 set?)")
    if any(s["metric"] is None for s in syncs):
        missing = sum(s["metric"] is None for s in syncs)
        raise Fail(f"{missing} syncs without a metric value in the HPA's status (hpa-watch)")
    t0 = syncs[0]["t"]
    with open(os.path.join(out_dir, "hpa-syncs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time", "t", "metric", "proposed", "current", "replicas"])
        for s in syncs:
            w.writerow([s["t"].isoformat(timespec="milliseconds"), f"{(s['t'] - t0).total_seconds():.3f}",
                        fmt(s["metric"]), s["proposed"], s["current"], s["replicas"]])
    trace = os.path.join(out_dir, "trace.csv")
    with open(trace, "w") as f:
        f.write("t,metric\n")
        for s in syncs:
            f.write(f"{(s['t'] - t0).total_seconds():.3f},{fmt(s['metric'])}\n")
    initial = syncs[0]["current"] or 1
    r = subprocess.run([h.app, "simulate", "--hpa", os.path.join(ROOT, "k8s", "autoscaling.yaml"), "--trace", trace,
                        "--initial-replicas", str(initial)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise Fail(f"simulate --trace: {r.stderr.strip()}")
    rows = list(csv.DictReader(r.stdout.splitlines()))
    diffs = []
    with open(os.path.join(out_dir, "compare.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "metric", "real", "simulate"])
        for s, row in zip(syncs, rows):
            w.writerow([row["t"], row["metric"], s["replicas"], row["replicas"]])
            if int(row["replicas"]) != s["replicas"]:
                diffs.append(f"t={row['t']} metric={row['metric']}: real {s['replicas']}, simulate {row['replicas']}")
    real_seq = " ".join(str(s["replicas"]) for s in syncs)
    sim_seq = " ".join(row["replicas"] for row in rows)
    log(f"HPA syncs: {len(syncs)}; real replicas     {real_seq}")
    log(f"                       simulate replicas {sim_seq}")
    if len(rows) != len(syncs):
        raise Fail(f"simulate printed {len(rows)} rows for {len(syncs)} syncs")
    if diffs:
        raise Fail("simulate --trace differs from the real HPA at " + "; ".join(diffs[:5]) +
                   f" (all in {out_dir}/compare.csv)")
    log(f"simulate --trace matches the real HPA at every one of {len(syncs)} syncs ({out_dir}/compare.csv)")


def fmt(v):
    return f"{v:g}"


def check_runs(h):
    """Every worker pod that stopped logged how many tasks it started; their sum over the fleet is
    the number of tasks sent when none ran twice and none was lost."""
    started, stopped, pods = 0, 0, 0
    for name in os.listdir(h.logs):
        if not (name.startswith(f"{NS}_worker-") and name.endswith("_worker.log")):
            continue
        pods += 1
        with open(os.path.join(h.logs, name), errors="replace") as f:
            for line in f:
                if '"worker stopped"' in line:
                    rec = json.loads(line)
                    started += int(rec.get("fields", rec).get("tasks_started", 0))
                    stopped += 1
    log(f"worker pods: {pods} started, {stopped} stopped cleanly, {started} task runs among the stopped ones")
    return started, stopped, pods


# ---- negative tests ------------------------------------------------------------------------------

def expect_failure(what, names, fn, restore):
    """fn must raise Fail whose message names the broken object; restore must then succeed."""
    try:
        fn()
    except Fail as e:
        msg = str(e)
        if names not in msg:
            raise Fail(f"negative test {what}: the run failed but its message does not name {names!r}: {msg}")
        log(f"negative test {what}: fails as it should, naming {names}: {msg[:220]}")
    else:
        raise Fail(f"negative test {what}: the broken object was accepted and every check passed")
    restore()


def negative_tests(h, base_docs):
    def doc(kind, name):
        return next(d for d in base_docs if d["kind"] == kind and d["metadata"]["name"] == name)

    # 1. The HPA's metric selector: a queue nobody exports.
    hpa = json.loads(json.dumps(doc("HorizontalPodAutoscaler", "worker")))
    hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]["queue"] = "no-such-queue"
    expect_failure("HPA metric selector", f"HorizontalPodAutoscaler {NS}/worker",
                   lambda: (h.apply([hpa], "the HPA with a broken selector"), time.sleep(20), h.check_hpa(timeout=40)),
                   lambda: (h.apply([doc("HorizontalPodAutoscaler", "worker")], "the HPA"), h.check_hpa()))

    # 2. The APIService's group: the API server refuses it, naming the object.
    api = json.loads(json.dumps(doc("APIService", APISERVICE)))
    api["spec"]["group"] = "external.metrics.example.com"
    expect_failure("APIService group", APISERVICE, lambda: h.apply([api], f"APIService {APISERVICE}"),
                   lambda: h.check_apiservice())

    # 3. The adapter rule's metric name: the adapter (restarted on the new ConfigMap, as its pod
    #    would be by the config checksum annotation) serves no celery_queue_depth.
    cm = json.loads(json.dumps(doc("ConfigMap", "adapter-config")))
    cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace("celery_queue_depth{", "celery_queue_depth_renamed{")
    if cm["data"]["config.yaml"] == doc("ConfigMap", "adapter-config")["data"]["config.yaml"]:
        raise Fail("negative test adapter rule: could not find the seriesQuery to break in ConfigMap adapter-config")

    def with_config(c):
        h.apply([c], "ConfigMap adapter-config")
        h.stop("prometheus-adapter")
        h.start_adapter()
        h.check_apiservice()

    expect_failure("adapter rule metric name", f"ConfigMap {NS}/adapter-config",
                   lambda: (with_config(cm), h.check_metric(timeout=40)),
                   lambda: (with_config(doc("ConfigMap", "adapter-config")), h.check_metric()))


# ---- main ----------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="directory of the control-plane binaries (build.sh prints it)")
    ap.add_argument("--app", required=True, help="the celery-autoscale binary (release build)")
    # burst-io (the seed on the model's burst:400) and oscillate (the model's oscillate, seed and,
    # with tuned, tuned: about 16 min more) are measured for docs/Autoscaling.md on demand:
    # .ci/run's time goes to the tuned profile's burst and ramp instead.
    ap.add_argument("--scenarios", default="burst,ramp,scale-in,tuned")
    ap.add_argument("--skip-negative", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory even when everything passed")
    a = ap.parse_args()

    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    runs = os.path.join(base, "celery-autoscale", "control-plane-runs")
    os.makedirs(runs, exist_ok=True)
    work = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=runs)
    os.chmod(work, 0o700)
    h = Harness(a.bin, os.path.abspath(a.app), work)
    log(f"work directory {work} (logs in {h.logs})")
    ok = False
    started = time.monotonic()
    try:
        preflight()
        h.make_pki()
        h.start_redis()
        h.start_control_plane()
        log("control plane up: etcd, kube-apiserver, kube-controller-manager, kube-scheduler")

        docs = h.local_patch(h.rendered(os.path.join(ROOT, "k8s")))
        ns_docs = [d for d in docs if d["kind"] == "Namespace"]
        h.apply(ns_docs, "k8s/namespace.yaml")
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-auth", "namespace": NS},
                  "stringData": {"password": h.redis_password}}
        h.kubectl("apply", "-f", "-", input=json.dumps(secret))
        h.start_pod_runner()
        out = h.apply(docs, "k8s/ (kubectl apply --server-side)")
        log(f"k8s/ applied: {len(docs)} objects accepted by the API server")
        watch = HpaWatch(h)
        for line in out.splitlines():
            if line.startswith("Warning"):
                log(line)
        h.start_prometheus()
        h.start_adapter()
        h.check_apiservice()
        log(f"APIService {APISERVICE} Available")
        h.wait("the exporter pod Ready", lambda: h.deployment("exporter")[1] >= 1, 60,
               f"see {h.logs}/{NS}_exporter-*.log and pod-runner.log")
        h.check_metric(equals=h.depth)
        log(f"External metric served and equal to the depth Redis holds ({h.depth()}): kubectl get --raw {METRIC_PATH}")
        h.check_hpa()
        log(f"HorizontalPodAutoscaler {NS}/worker ScalingActive")
        h.wait("worker Deployment at 1 Ready replica", lambda: h.deployment() == (1, 1), 60,
               f"see {h.logs}/{NS}_worker-*.log and pod-runner.log")

        samples = []
        peaks = {}
        scale_in = {}
        for s in [x for x in a.scenarios.split(",") if x]:
            if s == "burst":
                peaks[s] = run_burst(h, samples)
            elif s == "ramp":
                peaks[s] = run_ramp(h, samples)
            elif s == "burst-io":
                peaks[s] = run_burst_io(h, samples)
            elif s == "oscillate":
                peaks[s] = run_oscillate(h, samples)
            elif s in ("scale-in", "tuned"):
                pass  # after the sync comparison, which replays the rendered HPA unchanged
            else:
                raise Fail(f"--scenarios: unknown scenario {s!r} (burst, ramp, burst-io, oscillate, scale-in, tuned)")
        with open(os.path.join(work, "samples.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["time", "scenario", "redis_depth", "metric", "spec_replicas", "ready_replicas"])
            w.writeheader()
            w.writerows(samples)
        # Metric against Redis: each value the adapter served was a depth Redis held in the 20 s
        # before (exporter poll 5 s + scrape 5 s + the adapter's query).
        stale = check_metric_against_redis(samples)
        if stale:
            raise Fail(f"the External metric served values Redis never held in the 20 s before: {stale[:3]} (samples.csv)")

        syncs = parse_syncs(os.path.join(h.logs, "kube-controller-manager.log"), dt.datetime.now(dt.timezone.utc).year)
        attach_metrics(syncs, watch.events)
        compare(h, syncs, work)
        if "scale-in" in a.scenarios.split(","):
            scale_in = {cost: run_scale_in(h, cost, docs) for cost in (False, True)}
        if "tuned" in a.scenarios.split(","):
            # The tuned profile (hpa.profile = "tuned": its target, behavior and signal) with
            # deletion costs on, on the same burst and ramp as the seed's runs above.
            apply_profile(h, TUNED_COMPONENTS, docs)
            h.wait("worker Deployment at 1 Ready replica", lambda: h.deployment() == (1, 1), 120,
                   f"see {h.logs}/{NS}_worker-*.log and pod-runner.log", every=2)
            peaks["burst-io-tuned"] = run_burst_io(h, samples, "burst-io-tuned")
            peaks["ramp-tuned"] = run_ramp(h, samples, "ramp-tuned")
            if "oscillate" in a.scenarios.split(","):
                peaks["oscillate-tuned"] = run_oscillate(h, samples, "oscillate-tuned")
        with open(os.path.join(work, "samples.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["time", "scenario", "redis_depth", "metric", "spec_replicas", "ready_replicas"])
            w.writeheader()
            w.writerows(samples)
        for label, res in peaks.items():
            fig = {**figures(samples, label), **res}
            log(f"figures {label}: replica-s {fig['replica_s']}, peak backlog {fig['peak_backlog']}, peak replicas "
                f"{fig['peak']}, reversals {fig['reversals']}, p95 latency {fig.get('p95_latency', '-')} s, "
                f"makespan {fig.get('makespan', '-')} s")

        if not a.skip_negative:
            negative_tests(h, docs)
        # Stop the node first: every worker gets SIGTERM and its grace, as on a node drain.
        h.stop("pod-runner", grace=60)
        expected = sum(tasks_sent(k) for k in peaks) \
            + sum(SCALE_IN_BUSY + reruns for _, reruns in scale_in.values())
        started_runs, stopped, pods = check_runs(h)
        if stopped != pods:
            raise Fail(f"{pods - stopped} worker pods did not stop cleanly (no 'worker stopped' line); see {h.logs}")
        if started_runs != expected:
            raise Fail(f"the workers started {started_runs} task runs for {expected} tasks sent: "
                       f"{'some ran twice' if started_runs > expected else 'some never ran'}")
        log(f"{expected} task runs expected, {started_runs} runs: none lost, none run twice "
            f"(but the {sum(r for _, r in scale_in.values())} a scale-in put back); peaks {peaks}")
        if scale_in:
            log(f"scale-in: tasks interrupted without deletion costs {scale_in[False][0]}, with them {scale_in[True][0]}")
        ok = True
    except Fail as e:
        log(f"FAILED: {e}")
    except Exception as e:  # noqa: BLE001 - a harness bug must still stop every process
        log(f"FAILED (harness error): {type(e).__name__}: {e}")
    finally:
        h.stop_all()
        log(f"every process stopped ({time.monotonic() - started:.0f} s)")
        if ok and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"logs kept in {h.logs}")
    return 0 if ok else 1


def preflight():
    """What the run needs from the machine, named before anything starts."""
    for tool in ("redis-server", "prometheus", "openssl"):
        if not shutil.which(tool):
            raise Fail(f"{tool} is not on PATH (apt-get install redis-server prometheus openssl)")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 443))
        except OSError as e:
            raise Fail(f"cannot listen on 127.0.0.1:443 ({e}): the adapter must listen on the port of the rendered "
                       "APIService (443, reached through an ExternalName Service); run as root or set "
                       "net.ipv4.ip_unprivileged_port_start=443") from None


def tasks_sent(scenario):
    if scenario.startswith("burst"):
        return 400
    if scenario.startswith("oscillate"):
        mean, duration = float(OSCILLATE[1]), float(OSCILLATE[7])
        return round(mean * duration)
    return ramp_total()


def ramp_total():
    # loadgen ramp sends round(∫ rate dt) tasks: (from + to) / 2 · duration.
    f, t, d = float(RAMP[1]), float(RAMP[3]), float(RAMP[5])
    return round((f + t) / 2 * d)


def check_metric_against_redis(samples):
    """Each served value must be a depth Redis held in the 20 s before it. The depth is sampled
    every ~2 s, so a peak between two samples is not seen: the range is widened by the largest
    change between consecutive samples in the window."""
    bad = []
    for i, s in enumerate(samples):
        if s["metric"] == "":
            continue
        t = dt.datetime.fromisoformat(s["time"])
        window = [x["redis_depth"] for x in samples[max(0, i - 15):i + 1]
                  if (t - dt.datetime.fromisoformat(x["time"])).total_seconds() <= 20]
        step = max((abs(a - b) for a, b in zip(window, window[1:])), default=0)
        lo, hi = min(window) - step, max(window) + step
        if not (lo <= s["metric"] <= hi):
            bad.append(f"{s['time']} metric {s['metric']} outside [{lo}, {hi}]")
    return bad


if __name__ == "__main__":
    sys.exit(main())
