"""A TrainJob's lifecycle: what the operator observed -> the new status and the actions. Pure.

:func:`.plan.decide` ``(tj, jobs, pods, now)`` first builds one frozen snapshot,
:class:`.observed.Observed`, from

- the TrainJob (spec, current status, generation),
- every worker Job of the TrainJob (all attempts, including ones being deleted),
- every pod of the TrainJob (matched to its Job by the controller uid, never by name),
- optionally: the current Job's FailedCreate events and Kueue Workload (read only when the
  snapshot shows they matter), which base children are missing, and the hang watchdog's limit,

then tries the rules of :data:`.rules.RULES` in order; the first that applies returns a
:class:`.rules.Decision` (phase, children to create, Jobs to delete, ...), and
:func:`.plan.plan` turns it into a :class:`.plan.Plan`: the operator-owned status fields, the
actions and the events. The conditions a decision writes are derived from the decided phase by
one function (:func:`.plan.conditions`), so they cannot disagree with it or with each other. The
one status written without a decision, when creating the children fails
(:func:`.plan.create_failed`), turns only Created to False and leaves the rest as read.

State lives in the cluster, never in the operator's memory:

- The newest worker Job (highest ``kontrast.dev/attempt``) is the current attempt. Each Job
  carries the restart budget spent when it was created (annotation ``kontrast.dev/restarts``),
  so a restart decision is recorded by the very object it creates: an operator that crashes
  between creating the next attempt and patching status can never count a failure twice.
- Succeeded and Failed are terminal and sticky: cleanup deletes children, and a TrainJob
  whose children are gone is never restarted (so cleanup cannot reset the restart budget).

Modules, in the order a decision flows: ``phases`` (phase names, conditions), ``objects`` and
``pods`` (reading observed objects), ``kueue`` (reading Kueue's Workload), ``observed`` (the
snapshot), ``rules`` (the decision), ``plan`` (status, actions, events).
"""
