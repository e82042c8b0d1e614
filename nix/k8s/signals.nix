# The signals the worker HPA can scale on (issue 22 item 3), as the adapter serves them: one External
# metric per signal, all read from the series celery_queue_depth (plus celery_queue_reserved and the
# workers' celery_task_success_total). A plain attribute set, imported with `import ./signals.nix`.
#
# The same queries are what the simulator models: `Signal::promql` in
# src/autoscale/simulate/closed_loop.rs prints them, and tests/exporter_prometheus.rs checks that the
# rendered adapter rules (k8s/adapter.yaml) hold exactly what it prints for the module's lookahead and
# rate window, then runs each rule on a real Prometheus. Change both together.
#
# In the templates the adapter fills <<.Series>> (celery_queue_depth) and <<.LabelMatchers>> (the
# HPA's selector plus namespace="<HPA namespace>").
let
  depth = "max by (queue) (<<.Series>>{<<.LabelMatchers>>})";
  # The change of the depth over the window; 0 until Prometheus holds two samples in it (delta is
  # empty then), so that a fresh series is served at once.
  growth = window: "(max by (queue) (delta(<<.Series>>{<<.LabelMatchers>>}[${toString window}s])) or 0 * ${depth})";
in
rec {
  # In the order the adapter config lists them; "depth" is the default and today's rule.
  names = [ "depth" "depth+running" "depth+arrivals" "depth+growth" ];

  # The External metric of a signal: celery_queue_depth, celery_queue_depth_running, ...
  metricName = signal: "celery_queue_" + builtins.replaceStrings [ "+" ] [ "_" ] signal;

  # Whether the signal adds a rate term (and so uses the lookahead and the rate window).
  usesRate = signal: signal == "depth+arrivals" || signal == "depth+growth";

  # The metricsQuery of a signal, for a lookahead of `lookahead` seconds (metric delay + HPA sync
  # period + pod start: the tasks that arrive before a pod asked for now is ready) and a rate window
  # of `window` seconds (whole seconds both).
  query = { lookahead, window }: signal:
    let
      D = toString lookahead;
      W = toString window;
    in
    {
      # Queued, not yet taken by a worker. max, not sum, over exporter instances: one exporter
      # runs, and an overlap would not double the value.
      "depth" = depth;
      # + the messages workers hold unacknowledged, so busy workers are not scaled in while the
      # list itself reads near zero.
      "depth+running" = "${depth} + max by (queue) (celery_queue_reserved{<<.LabelMatchers>>})";
      # + D × the arrival rate, (Δ depth + tasks finished) / W. celery_task_success_total is
      # labelled by task, not queue: the sum over every worker this Prometheus scrapes (one
      # namespace's), 0 before any task finished. Hence only for a single pool on a single queue.
      "depth+arrivals" = "${depth} + ${D} * clamp_min((${growth window} + on() group_left() "
        + "(sum(increase(celery_task_success_total[${W}s])) or vector(0))) / ${W}, 0)";
      # + D × the growth rate of the queue, when positive: nothing while the pods keep up.
      "depth+growth" = "${depth} + ${D} * clamp_min(${growth window} / ${W}, 0)";
    }.${signal};
}
