// pod-runner is the node of the local control-plane test (scripts/control-plane/run.sh): it
// registers one Node and does for the pods bound to it what a kubelet does, with local processes
// instead of containers.
//
//   - A pod whose containers all have a local program (--image NAME=PATH, matched on the image name
//     without its tag) is started: the container's command (or the program) with its args, and its
//     env with $(VAR) references, secretKeyRef, configMapKeyRef and fieldRef resolved as the kubelet
//     does. Pods of other images stay Pending with a message saying so.
//   - Addresses are the one thing that differs from a cluster: every pod shares 127.0.0.1, so each
//     container port gets its own free loopback port, and an arg or env value that binds
//     0.0.0.0:<containerPort> or :<containerPort> binds 127.0.0.1:<that port> instead. Service
//     names given with --endpoint (what cluster DNS would resolve, e.g. redis:6379) are rewritten
//     to their loopback address. Prometheus finds pods through file_sd files this runner writes
//     per Service port (--sd-dir), as it would through cluster DNS.
//   - Readiness: the container's httpGet readinessProbe, polled every periodSeconds with its
//     failureThreshold/successThreshold; the pod's Ready condition follows.
//   - Deletion: SIGTERM to the process group, terminationGracePeriodSeconds (the deletion's
//     grace), then SIGKILL, then the final delete with grace 0, as the kubelet does.
//   - Service account: a pod with a projected serviceAccountToken volume (the ServiceAccount
//     admission plugin adds kube-api-access-* when the token is automounted) gets a token
//     requested for it through the TokenRequest API, bound to the pod, with the projection's
//     audience and expiry, as the kubelet does. The kubelet mounts it at
//     /var/run/secrets/kubernetes.io/serviceaccount; processes share one filesystem here, so the
//     runner writes it, ca.crt and namespace to a directory of the pod's own and points
//     KUBECONFIG at a kubeconfig there (server, CA, tokenFile). Clients that infer their config
//     (client-go, kube-rs) read KUBECONFIG first and in-cluster files second, so the same program
//     authenticates as the pod's service account here and in a cluster. The token is not renewed
//     (the test runs well inside its hour).
//   - restartPolicy: Always restarts with the kubelet's back-off (10 s doubling to 5 min);
//     Never/OnFailure end the pod Succeeded or Failed, so Jobs complete.
//
// Every process binds 127.0.0.1 only. The runner talks to the API server as the node
// (system:node:<name>, group system:nodes), so the Node authorizer decides what it may read:
// exactly what a kubelet may.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

var (
	kubeconfig = flag.String("kubeconfig", "", "kubeconfig of the node's identity (system:node:<name>)")
	nodeName   = flag.String("node-name", "local-node", "name of the Node this runner registers")
	cpu        = flag.String("cpu", "4", "the Node's CPU capacity")
	memory     = flag.String("memory", "6Gi", "the Node's memory capacity")
	logDir     = flag.String("log-dir", "", "directory for each container's output (<ns>_<pod>_<container>.log)")
	sdDir      = flag.String("sd-dir", "", "directory for Prometheus file_sd files, one per Service port")
	images     multiFlag
	endpoints  multiFlag
)

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s pod-runner: %s\n", time.Now().UTC().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

func main() {
	flag.Var(&images, "image", "NAME=PATH: run containers of image NAME (any tag) with the program PATH (repeatable)")
	flag.Var(&endpoints, "endpoint", "SERVICE.NAMESPACE:PORT=127.0.0.1:PORT: where a Service outside this node listens (repeatable)")
	flag.Parse()
	if *kubeconfig == "" || *logDir == "" || *sdDir == "" {
		fmt.Fprintln(os.Stderr, "pod-runner: --kubeconfig, --log-dir and --sd-dir are required")
		os.Exit(2)
	}
	r, err := newRunner()
	if err != nil {
		fmt.Fprintf(os.Stderr, "pod-runner: %v\n", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := r.run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "pod-runner: %v\n", err)
		os.Exit(1)
	}
}

type runner struct {
	client    kubernetes.Interface
	apiHost   string // the API server, for the pods' service-account kubeconfigs
	apiCA     []byte
	programs  map[string]string
	endpoints map[string]string // "svc.ns:port" -> "127.0.0.1:port"

	mu       sync.Mutex
	pods     map[types.UID]*podProc
	services cache.Indexer
	podStore cache.Indexer
	sdDirty  chan struct{}
}

func newRunner() (*runner, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("--kubeconfig: %w", err)
	}
	// The kubelet's own client limits (kubeAPIQPS 50, kubeAPIBurst 100): client-go's default of 5
	// would delay a scale-up of 20 pods by seconds.
	cfg.QPS, cfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	ca := cfg.TLSClientConfig.CAData
	if len(ca) == 0 && cfg.TLSClientConfig.CAFile != "" {
		if ca, err = os.ReadFile(cfg.TLSClientConfig.CAFile); err != nil {
			return nil, fmt.Errorf("--kubeconfig: its CA file: %w", err)
		}
	}
	r := &runner{client: client, apiHost: cfg.Host, apiCA: ca, programs: map[string]string{}, endpoints: map[string]string{},
		pods: map[types.UID]*podProc{}, sdDirty: make(chan struct{}, 1)}
	for _, m := range images {
		name, path, ok := strings.Cut(m, "=")
		if !ok {
			return nil, fmt.Errorf("--image %q: expected NAME=PATH", m)
		}
		r.programs[name] = path
	}
	for _, e := range endpoints {
		svc, addr, ok := strings.Cut(e, "=")
		if !ok || !strings.Contains(svc, ".") || !strings.HasPrefix(addr, "127.") {
			return nil, fmt.Errorf("--endpoint %q: expected SERVICE.NAMESPACE:PORT=127.x.y.z:PORT", e)
		}
		r.endpoints[svc] = addr
	}
	return r, nil
}

func (r *runner) run(ctx context.Context) error {
	if err := r.registerNode(ctx); err != nil {
		return fmt.Errorf("registering Node %s: %w", *nodeName, err)
	}
	go r.heartbeat(ctx)

	podFactory := informers.NewSharedInformerFactoryWithOptions(r.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", *nodeName).String()
		}))
	podInformer := podFactory.Core().V1().Pods().Informer()
	r.podStore = podInformer.GetIndexer()
	if _, err := podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { r.sync(ctx, o) },
		UpdateFunc: func(_, o any) { r.sync(ctx, o) },
		DeleteFunc: func(o any) { r.forget(o) },
	}); err != nil {
		return err
	}
	svcFactory := informers.NewSharedInformerFactory(r.client, 0)
	svcInformer := svcFactory.Core().V1().Services().Informer()
	r.services = svcInformer.GetIndexer()
	if _, err := svcInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { r.markSD() },
		UpdateFunc: func(_, _ any) { r.markSD() },
		DeleteFunc: func(any) { r.markSD() },
	}); err != nil {
		return err
	}
	podFactory.Start(ctx.Done())
	svcFactory.Start(ctx.Done())
	go r.writeSDLoop(ctx)
	logf("node %s registered (cpu %s, memory %s); running images %v", *nodeName, *cpu, *memory, keys(r.programs))
	<-ctx.Done()

	// Stopping the runner stops its pods as a node shutdown would: SIGTERM, then their grace.
	r.mu.Lock()
	procs := make([]*podProc, 0, len(r.pods))
	for _, p := range r.pods {
		procs = append(procs, p)
	}
	r.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func() { defer wg.Done(); p.stopAll(p.grace()) }()
	}
	wg.Wait()
	return nil
}

func keys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// ---- the Node -----------------------------------------------------------------------------------

func (r *runner) registerNode(ctx context.Context) error {
	cpuQ, err := resource.ParseQuantity(*cpu)
	if err != nil {
		return fmt.Errorf("--cpu: %w", err)
	}
	memQ, err := resource.ParseQuantity(*memory)
	if err != nil {
		return fmt.Errorf("--memory: %w", err)
	}
	capacity := corev1.ResourceList{corev1.ResourceCPU: cpuQ, corev1.ResourceMemory: memQ,
		corev1.ResourcePods: resource.MustParse("110"), corev1.ResourceEphemeralStorage: resource.MustParse("20Gi")}
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: *nodeName, Labels: map[string]string{
			"kubernetes.io/hostname": *nodeName, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
	}
	created, err := r.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		created, err = r.client.CoreV1().Nodes().Get(ctx, *nodeName, metav1.GetOptions{})
	}
	if err != nil {
		return err
	}
	now := metav1.Now()
	created.Status = corev1.NodeStatus{
		Capacity: capacity, Allocatable: capacity,
		Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"},
			{Type: corev1.NodeHostName, Address: *nodeName}},
		Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue,
			Reason: "PodRunnerReady", Message: "pod-runner runs this node's pods as local processes",
			LastHeartbeatTime: now, LastTransitionTime: now}},
		NodeInfo: corev1.NodeSystemInfo{OperatingSystem: "linux", Architecture: "amd64",
			KubeletVersion: "pod-runner", ContainerRuntimeVersion: "local-process://1"},
	}
	updated, err := r.client.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{})
	if err != nil {
		return err
	}
	// The TaintNodesByCondition admission plugin taints a new Node not-ready; in a cluster the
	// node lifecycle controller lifts it once the Ready condition is True. That controller is not
	// run here (it would evict pods whenever the runner paused), so the runner lifts it itself.
	var taints []corev1.Taint
	for _, t := range updated.Spec.Taints {
		if t.Key != corev1.TaintNodeNotReady {
			taints = append(taints, t)
		}
	}
	if len(taints) != len(updated.Spec.Taints) {
		updated.Spec.Taints = taints
		_, err = r.client.CoreV1().Nodes().Update(ctx, updated, metav1.UpdateOptions{})
	}
	return err
}

func (r *runner) heartbeat(ctx context.Context) {
	t := time.NewTicker(20 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		node, err := r.client.CoreV1().Nodes().Get(ctx, *nodeName, metav1.GetOptions{})
		if err != nil {
			continue
		}
		for i := range node.Status.Conditions {
			if node.Status.Conditions[i].Type == corev1.NodeReady {
				node.Status.Conditions[i].LastHeartbeatTime = metav1.Now()
			}
		}
		_, _ = r.client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	}
}

// ---- pods ---------------------------------------------------------------------------------------

type container struct {
	spec      corev1.Container
	program   string
	ports     map[string]int // container port name or number -> loopback port
	cmd       *exec.Cmd
	exited    chan struct{}
	exitCode  int
	started   time.Time
	restarts  int32
	ready     bool
	lastState *corev1.ContainerState
	waiting   string
	ended     bool      // ended for good under the pod's restart policy
	restartAt time.Time // when a crashed container is started again
	lastProbe time.Time
	successes int
	failures  int
}

type podProc struct {
	r         *runner
	uid       types.UID
	ns, name  string
	mu        sync.Mutex
	pod       *corev1.Pod
	ctrs      []*container
	stopping  bool
	startTime metav1.Time
	cancel    context.CancelFunc
	finished  chan struct{}
}

func imageName(image string) string {
	name := image
	if i := strings.LastIndex(name, "@"); i >= 0 {
		name = name[:i]
	}
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		name = name[:i]
	}
	return name
}

func (r *runner) sync(ctx context.Context, obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	r.markSD()
	r.mu.Lock()
	p := r.pods[pod.UID]
	if p == nil {
		if pod.DeletionTimestamp != nil && pod.Status.Phase == corev1.PodPending {
			// Never started here: nothing to stop; the final delete is ours to make.
			r.mu.Unlock()
			r.finalDelete(ctx, pod)
			return
		}
		if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			r.mu.Unlock()
			return
		}
		p = &podProc{r: r, uid: pod.UID, ns: pod.Namespace, name: pod.Name, pod: pod, finished: make(chan struct{})}
		r.pods[pod.UID] = p
		r.mu.Unlock()
		go p.run(ctx)
		return
	}
	r.mu.Unlock()
	p.mu.Lock()
	p.pod = pod
	deleting := pod.DeletionTimestamp != nil && !p.stopping
	if deleting {
		p.stopping = true
	}
	p.mu.Unlock()
	if deleting {
		grace := int64(30)
		if pod.DeletionGracePeriodSeconds != nil {
			grace = *pod.DeletionGracePeriodSeconds
		}
		go func() {
			logf("%s/%s deleted: SIGTERM, grace %d s", p.ns, p.name, grace)
			p.stopAll(time.Duration(grace) * time.Second)
			r.finalDelete(ctx, pod)
		}()
	}
}

func (r *runner) forget(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	r.mu.Lock()
	p := r.pods[pod.UID]
	delete(r.pods, pod.UID)
	r.mu.Unlock()
	if p != nil {
		go p.stopAll(0)
	}
	r.markSD()
}

func (r *runner) finalDelete(ctx context.Context, pod *corev1.Pod) {
	zero := int64(0)
	uid := pod.UID
	err := r.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name,
		metav1.DeleteOptions{GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &uid}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		logf("%s/%s: final delete: %v", pod.Namespace, pod.Name, err)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// run prepares the pod's containers and keeps them running until the pod ends or is deleted.
func (p *podProc) run(ctx context.Context) {
	ctx, p.cancel = context.WithCancel(ctx)
	defer close(p.finished)
	p.mu.Lock()
	pod := p.pod.DeepCopy()
	p.mu.Unlock()
	for _, c := range pod.Spec.Containers {
		prog, ok := p.r.programs[imageName(c.Image)]
		if !ok {
			p.setPending(ctx, fmt.Sprintf("image %s has no local program on this node (pod-runner --image); the local test runs this component as a plain process or not at all", c.Image))
			return
		}
		ct := &container{spec: c, program: prog, ports: map[string]int{}}
		for _, port := range c.Ports {
			hp, err := freePort()
			if err != nil {
				p.setPending(ctx, err.Error())
				return
			}
			ct.ports[strconv.Itoa(int(port.ContainerPort))] = hp
			if port.Name != "" {
				ct.ports[port.Name] = hp
			}
		}
		p.ctrs = append(p.ctrs, ct)
	}
	p.startTime = metav1.Now()
	for _, ct := range p.ctrs {
		if err := p.start(ctx, pod, ct); err != nil {
			// E.g. the Node authorizer has not yet seen the pod's binding, so its Secret is
			// still forbidden: the kubelet retries such a CreateContainerConfigError, so do we.
			ct.waiting = err.Error()
			ct.restartAt = time.Now().Add(2 * time.Second)
			logf("%s/%s: container %s cannot start yet (retrying): %v", p.ns, p.name, ct.spec.Name, err)
		}
	}
	p.report(ctx)
	probe := time.NewTicker(time.Second)
	defer probe.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-probe.C:
		}
		p.mu.Lock()
		stopping := p.stopping
		p.mu.Unlock()
		changed := false
		allExited, anyFailed := true, false
		for _, ct := range p.ctrs {
			if ct.cmd == nil {
				switch {
				case ct.ended:
					anyFailed = anyFailed || ct.exitCode != 0
				case !stopping && !ct.restartAt.IsZero() && time.Now().After(ct.restartAt):
					ct.restartAt = time.Time{}
					if err := p.start(ctx, pod, ct); err != nil {
						ct.waiting = err.Error()
						logf("%s/%s: container %s cannot restart: %v", p.ns, p.name, ct.spec.Name, err)
						ct.restartAt = time.Now().Add(2 * time.Second)
					}
					changed = true
					allExited = false
				default:
					allExited = false
				}
				continue
			}
			select {
			case <-ct.exited:
				if stopping {
					allExited = false
					continue
				}
				changed = true
				if p.handleExit(pod, ct) {
					anyFailed = anyFailed || ct.exitCode != 0
					continue
				}
				allExited = false
				continue
			default:
				allExited = false
			}
			if ready := p.probeReady(ct); ready != ct.ready {
				ct.ready = ready
				changed = true
			}
		}
		if !stopping && allExited && len(p.ctrs) > 0 {
			p.finish(ctx, anyFailed)
			return
		}
		if changed {
			p.report(ctx)
		}
	}
}

// exitedOrNil is the container's exit channel, or nil (never ready) while it is not running.
func (ct *container) exitedOrNil() <-chan struct{} {
	if ct.cmd == nil || ct.exited == nil {
		return nil
	}
	return ct.exited
}

// handleExit applies the restart policy; true when the container has ended for good.
func (p *podProc) handleExit(pod *corev1.Pod, ct *container) bool {
	code := ct.exitCode
	ct.lastState = &corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: int32(code),
		StartedAt: metav1.NewTime(ct.started), FinishedAt: metav1.Now(), Reason: exitReason(code)}}
	ct.ready = false
	ct.cmd = nil
	logf("%s/%s: container %s exited with %d", p.ns, p.name, ct.spec.Name, code)
	policy := pod.Spec.RestartPolicy
	if policy == corev1.RestartPolicyNever || (policy == corev1.RestartPolicyOnFailure && code == 0) {
		ct.ended = true
		return true
	}
	// The kubelet's crash-loop back-off: 10 s, doubling, at most 5 min.
	backoff := 10 * time.Second << min(ct.restarts, 5)
	if backoff > 5*time.Minute {
		backoff = 5 * time.Minute
	}
	ct.restarts++
	ct.waiting = "CrashLoopBackOff"
	ct.restartAt = time.Now().Add(backoff)
	return false
}

func exitReason(code int) string {
	if code == 0 {
		return "Completed"
	}
	return "Error"
}

func (p *podProc) finish(ctx context.Context, failed bool) {
	phase := corev1.PodSucceeded
	if failed {
		phase = corev1.PodFailed
	}
	logf("%s/%s: %s", p.ns, p.name, phase)
	p.writeStatus(ctx, phase, "")
}

// probeReady runs the readiness probe when its period has passed since the last one, and
// applies the success and failure thresholds.
func (p *podProc) probeReady(ct *container) bool {
	probe := ct.spec.ReadinessProbe
	if probe == nil || probe.HTTPGet == nil {
		return true
	}
	period := time.Duration(max(probe.PeriodSeconds, 1)) * time.Second
	if time.Since(ct.started) < time.Duration(probe.InitialDelaySeconds)*time.Second || time.Since(ct.lastProbe) < period {
		return ct.ready
	}
	ct.lastProbe = time.Now()
	ok := false
	if port := ct.resolvePort(probe.HTTPGet.Port); port > 0 {
		client := http.Client{Timeout: time.Duration(max(probe.TimeoutSeconds, 1)) * time.Second}
		resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, probe.HTTPGet.Path))
		if err == nil {
			ok = resp.StatusCode >= 200 && resp.StatusCode < 400
			resp.Body.Close()
		}
	}
	if ok {
		ct.failures = 0
		ct.successes++
		return ct.ready || ct.successes >= int(max(probe.SuccessThreshold, 1))
	}
	ct.successes = 0
	ct.failures++
	return ct.ready && ct.failures < int(max(probe.FailureThreshold, 1))
}

func (ct *container) resolvePort(port intstr.IntOrString) int {
	if port.Type == intstr.String {
		return ct.ports[port.StrVal]
	}
	return ct.ports[strconv.Itoa(int(port.IntVal))]
}

// start launches one container's process.
func (p *podProc) start(ctx context.Context, pod *corev1.Pod, ct *container) error {
	env, err := p.r.resolveEnv(ctx, pod, ct)
	if err != nil {
		return err
	}
	kc, err := p.r.serviceAccount(ctx, pod)
	if err != nil {
		return err
	}
	if kc != "" {
		env = append(env, "KUBECONFIG="+kc)
	}
	vars := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
	}
	var argv []string
	if len(ct.spec.Command) > 0 {
		argv = append(argv, ct.spec.Command...)
		argv[0] = ct.program
	} else {
		argv = append(argv, ct.program)
	}
	for _, a := range ct.spec.Args {
		argv = append(argv, p.r.rewrite(pod.Namespace, ct, expand(a, vars)))
	}
	logPath := filepath.Join(*logDir, fmt.Sprintf("%s_%s_%s.log", pod.Namespace, pod.Name, ct.spec.Name))
	out, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Dir = os.TempDir()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		out.Close()
		return err
	}
	exited := make(chan struct{})
	ct.cmd, ct.exited, ct.started, ct.waiting = cmd, exited, time.Now(), ""
	ct.lastProbe, ct.successes, ct.failures = time.Time{}, 0, 0
	logf("%s/%s: container %s started, pid %d, ports %v (log %s)", p.ns, p.name, ct.spec.Name, cmd.Process.Pid, ct.ports, logPath)
	go func() {
		err := cmd.Wait()
		out.Close()
		code := 0
		if err != nil {
			code = -1
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					code = 128 + int(ws.Signal())
				}
			}
		}
		ct.exitCode = code
		close(exited)
	}()
	return nil
}

// grace is the pod's terminationGracePeriodSeconds (the kubelet's default, 30 s, when unset).
func (p *podProc) grace() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if g := p.pod.Spec.TerminationGracePeriodSeconds; g != nil {
		return time.Duration(*g) * time.Second
	}
	return 30 * time.Second
}

// stopAll sends SIGTERM to every running container, waits up to grace, then SIGKILLs the rest.
func (p *podProc) stopAll(grace time.Duration) {
	p.mu.Lock()
	p.stopping = true
	ctrs := p.ctrs
	p.mu.Unlock()
	deadline := time.After(grace)
	for _, ct := range ctrs {
		if ct.cmd != nil && ct.cmd.Process != nil {
			_ = syscall.Kill(-ct.cmd.Process.Pid, syscall.SIGTERM)
		}
	}
	for _, ct := range ctrs {
		ch := ct.exitedOrNil()
		if ch == nil {
			continue
		}
		select {
		case <-ch:
			logf("%s/%s: container %s stopped with %d", p.ns, p.name, ct.spec.Name, ct.exitCode)
		case <-deadline:
			logf("%s/%s: container %s outlived its grace: SIGKILL", p.ns, p.name, ct.spec.Name)
			_ = syscall.Kill(-ct.cmd.Process.Pid, syscall.SIGKILL)
			<-ch
		}
	}
	if p.cancel != nil {
		p.cancel()
	}
}

// expand resolves $(VAR) references as the kubelet does: known names are replaced, unknown ones
// are left as written, and $$ is a literal $.
func expand(s string, vars map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '$' && i+1 < len(s) {
			if s[i+1] == '$' {
				b.WriteByte('$')
				i++
				continue
			}
			if s[i+1] == '(' {
				if end := strings.IndexByte(s[i+2:], ')'); end >= 0 {
					name := s[i+2 : i+2+end]
					if v, ok := vars[name]; ok {
						b.WriteString(v)
						i += 2 + end
						continue
					}
				}
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// rewrite maps cluster addresses in an arg or env value to this node's loopback addresses.
func (r *runner) rewrite(ns string, ct *container, s string) string {
	for svc, addr := range r.endpoints {
		host, port, _ := strings.Cut(svc, ":")
		name, svcNs, _ := strings.Cut(host, ".")
		forms := []string{host + ".svc.cluster.local", host + ".svc", host}
		if svcNs == ns {
			forms = append(forms, name)
		}
		for _, f := range forms {
			s = replaceHostPort(s, f+":"+port, addr)
		}
	}
	for _, port := range ct.spec.Ports {
		hp := strconv.Itoa(ct.ports[strconv.Itoa(int(port.ContainerPort))])
		cp := strconv.Itoa(int(port.ContainerPort))
		for _, bind := range []string{"0.0.0.0:" + cp, "[::]:" + cp} {
			s = strings.ReplaceAll(s, bind, "127.0.0.1:"+hp)
		}
		if s == ":"+cp {
			s = "127.0.0.1:" + hp
		}
	}
	return s
}

// replaceHostPort replaces host:port where it stands as an address: at the start, or after
// "//" or "@" (a URL's authority).
func replaceHostPort(s, hostPort, addr string) string {
	if strings.HasPrefix(s, hostPort) {
		s = addr + s[len(hostPort):]
	}
	for _, prefix := range []string{"//", "@"} {
		s = strings.ReplaceAll(s, prefix+hostPort, prefix+addr)
	}
	return s
}

// serviceAccount writes the pod's service-account credentials (see the package comment) and
// returns the kubeconfig path, or "" when the pod mounts no service-account token.
func (r *runner) serviceAccount(ctx context.Context, pod *corev1.Pod) (string, error) {
	var proj *corev1.ServiceAccountTokenProjection
	for _, v := range pod.Spec.Volumes {
		if v.Projected == nil {
			continue
		}
		for _, src := range v.Projected.Sources {
			if src.ServiceAccountToken != nil {
				proj = src.ServiceAccountToken
			}
		}
	}
	if proj == nil {
		return "", nil
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: proj.ExpirationSeconds,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}
	if proj.Audience != "" {
		req.Spec.Audiences = []string{proj.Audience}
	}
	tok, err := r.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("service account %s/%s: token request: %w", pod.Namespace, sa, err)
	}
	dir := filepath.Join(os.TempDir(), "pods", string(pod.UID), "serviceaccount")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	kc := filepath.Join(dir, "kubeconfig")
	files := map[string][]byte{
		"token":     []byte(tok.Status.Token),
		"ca.crt":    r.apiCA,
		"namespace": []byte(pod.Namespace),
		"kubeconfig": []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: %q, certificate-authority: %q}}]
users: [{name: sa, user: {tokenFile: %q}}]
contexts: [{name: sa, context: {cluster: local, user: sa, namespace: %q}}]
current-context: sa
`, r.apiHost, filepath.Join(dir, "ca.crt"), filepath.Join(dir, "token"), pod.Namespace)),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return "", err
		}
	}
	return kc, nil
}

// resolveEnv builds the process environment from the container's env, as the kubelet does.
func (r *runner) resolveEnv(ctx context.Context, pod *corev1.Pod, ct *container) ([]string, error) {
	vars := map[string]string{}
	order := []string{}
	set := func(k, v string) {
		if _, ok := vars[k]; !ok {
			order = append(order, k)
		}
		vars[k] = v
	}
	set("PATH", "/usr/local/bin:/usr/bin:/bin")
	set("HOSTNAME", pod.Name)
	set("HOME", os.TempDir())
	for _, e := range ct.spec.Env {
		switch {
		case e.ValueFrom == nil:
			set(e.Name, r.rewrite(pod.Namespace, ct, expand(e.Value, vars)))
		case e.ValueFrom.SecretKeyRef != nil:
			ref := e.ValueFrom.SecretKeyRef
			s, err := r.client.CoreV1().Secrets(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				return nil, fmt.Errorf("env %s: secret %s/%s: %w", e.Name, pod.Namespace, ref.Name, err)
			}
			v, ok := s.Data[ref.Key]
			if !ok {
				return nil, fmt.Errorf("env %s: secret %s/%s has no key %s", e.Name, pod.Namespace, ref.Name, ref.Key)
			}
			set(e.Name, string(v))
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			cm, err := r.client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				return nil, fmt.Errorf("env %s: configmap %s/%s: %w", e.Name, pod.Namespace, ref.Name, err)
			}
			set(e.Name, cm.Data[ref.Key])
		case e.ValueFrom.FieldRef != nil:
			switch e.ValueFrom.FieldRef.FieldPath {
			case "metadata.name":
				set(e.Name, pod.Name)
			case "metadata.namespace":
				set(e.Name, pod.Namespace)
			case "spec.nodeName":
				set(e.Name, pod.Spec.NodeName)
			case "status.podIP", "status.hostIP":
				set(e.Name, "127.0.0.1")
			default:
				return nil, fmt.Errorf("env %s: fieldRef %s is not supported by pod-runner", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		default:
			return nil, fmt.Errorf("env %s: this valueFrom is not supported by pod-runner", e.Name)
		}
	}
	out := make([]string, 0, len(order))
	for _, k := range order {
		out = append(out, k+"="+vars[k])
	}
	return out, nil
}

// ---- status -------------------------------------------------------------------------------------

func (p *podProc) setPending(ctx context.Context, message string) {
	logf("%s/%s stays Pending: %s", p.ns, p.name, message)
	p.writeStatus(ctx, corev1.PodPending, message)
}

func (p *podProc) report(ctx context.Context) { p.writeStatus(ctx, corev1.PodRunning, "") }

func cond(t corev1.PodConditionType, ok bool) corev1.PodCondition {
	s := corev1.ConditionFalse
	if ok {
		s = corev1.ConditionTrue
	}
	return corev1.PodCondition{Type: t, Status: s, LastTransitionTime: metav1.Now()}
}

func (p *podProc) writeStatus(ctx context.Context, phase corev1.PodPhase, message string) {
	for attempt := 0; attempt < 5; attempt++ {
		pod, err := p.r.client.CoreV1().Pods(p.ns).Get(ctx, p.name, metav1.GetOptions{})
		if err != nil {
			return
		}
		if pod.UID != p.uid {
			return
		}
		allReady := phase == corev1.PodRunning && len(p.ctrs) > 0
		var statuses []corev1.ContainerStatus
		for _, ct := range p.ctrs {
			st := corev1.ContainerStatus{Name: ct.spec.Name, Image: ct.spec.Image, ImageID: "local://" + ct.program,
				RestartCount: ct.restarts, Ready: ct.ready && phase == corev1.PodRunning}
			running := ct.cmd != nil
			st.Started = &running
			switch {
			case running:
				st.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(ct.started)}
			case ct.lastState != nil && (phase == corev1.PodSucceeded || phase == corev1.PodFailed):
				st.State = *ct.lastState
			default:
				st.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ContainerCreating", Message: ct.waiting}
				if ct.waiting == "CrashLoopBackOff" {
					st.State.Waiting.Reason = ct.waiting
				}
			}
			if ct.lastState != nil && running {
				st.LastTerminationState = *ct.lastState
			}
			allReady = allReady && st.Ready
			statuses = append(statuses, st)
		}
		pod.Status.Phase = phase
		pod.Status.Message = message
		if phase != corev1.PodPending {
			pod.Status.HostIP = "127.0.0.1"
			pod.Status.HostIPs = []corev1.HostIP{{IP: "127.0.0.1"}}
			pod.Status.PodIP = "127.0.0.1"
			pod.Status.PodIPs = []corev1.PodIP{{IP: "127.0.0.1"}}
			pod.Status.StartTime = &p.startTime
			pod.Status.ContainerStatuses = statuses
		}
		conds := []corev1.PodCondition{cond(corev1.PodReadyToStartContainers, phase != corev1.PodPending),
			cond(corev1.PodInitialized, phase != corev1.PodPending), cond(corev1.ContainersReady, allReady),
			cond(corev1.PodReady, allReady)}
		for _, c := range conds {
			pod.Status.Conditions = mergeCondition(pod.Status.Conditions, c)
		}
		_, err = p.r.client.CoreV1().Pods(p.ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
		if err == nil || !apierrors.IsConflict(err) {
			return
		}
	}
}

func mergeCondition(conds []corev1.PodCondition, c corev1.PodCondition) []corev1.PodCondition {
	for i := range conds {
		if conds[i].Type == c.Type {
			if conds[i].Status != c.Status {
				conds[i].Status = c.Status
				conds[i].LastTransitionTime = c.LastTransitionTime
			}
			return conds
		}
	}
	return append(conds, c)
}

// ---- service discovery for Prometheus -----------------------------------------------------------

func (r *runner) markSD() {
	select {
	case r.sdDirty <- struct{}{}:
	default:
	}
}

type sdGroup struct {
	Targets []string          `json:"targets"`
	Labels  map[string]string `json:"labels"`
}

// writeSDLoop writes <sd-dir>/<service>.<namespace>.svc_<port>.json for every Service port: the
// loopback addresses of this node's running pods it selects (Ready ones, or all of them with
// publishNotReadyAddresses), one group per pod labelled with its name.
func (r *runner) writeSDLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.sdDirty:
		case <-time.After(2 * time.Second):
		}
		files := map[string][]sdGroup{}
		for _, o := range r.services.List() {
			svc := o.(*corev1.Service)
			if len(svc.Spec.Selector) == 0 {
				continue
			}
			sel := labels.SelectorFromSet(svc.Spec.Selector)
			for _, sp := range svc.Spec.Ports {
				name := fmt.Sprintf("%s.%s.svc_%d.json", svc.Name, svc.Namespace, sp.Port)
				groups := []sdGroup{}
				for _, po := range r.podStore.List() {
					pod := po.(*corev1.Pod)
					if pod.Namespace != svc.Namespace || !sel.Matches(labels.Set(pod.Labels)) || pod.DeletionTimestamp != nil {
						continue
					}
					r.mu.Lock()
					p := r.pods[pod.UID]
					r.mu.Unlock()
					if p == nil || !(svc.Spec.PublishNotReadyAddresses || podReady(pod)) {
						continue
					}
					for _, ct := range p.ctrs {
						target := sp.TargetPort
						if target.Type == intstr.Int && target.IntVal == 0 {
							target = intstr.FromInt32(sp.Port)
						}
						if hp := ct.resolvePort(target); hp > 0 {
							groups = append(groups, sdGroup{Targets: []string{fmt.Sprintf("127.0.0.1:%d", hp)},
								Labels: map[string]string{"pod": pod.Name}})
						}
					}
				}
				files[name] = groups
			}
		}
		for name, groups := range files {
			data, _ := json.Marshal(groups)
			path := filepath.Join(*sdDir, name)
			if old, err := os.ReadFile(path); err == nil && string(old) == string(data) {
				continue
			}
			tmp := path + ".tmp"
			if os.WriteFile(tmp, data, 0o644) == nil {
				_ = os.Rename(tmp, path)
			}
		}
	}
}

func podReady(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
