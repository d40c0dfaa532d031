"""The kontrast operator: reconciles TrainJobs into distributed training pods.

Layout (pure functions decide, thin edges act):

- ``lifecycle/`` TrainJob + observed children -> new status and the actions to take (pure):
  ``phases`` (phase names, conditions), ``objects`` and ``pods`` (reading observed objects),
  ``kueue`` (why Kueue holds a Job), ``observed`` (the snapshot), ``rules`` (the decision),
  ``plan`` (status fields, actions, events)
- ``children/`` TrainJob -> child manifests (pure): ``names`` (names, labels, metadata),
  ``base`` (ServiceAccount, Role, RoleBinding, Service, ConfigMap), ``pod`` (the training pod),
  ``job`` (the worker Job of one attempt)
- ``config``    the operator's settings (trainer image, pod defaults), read from the environment
- ``policy``    what the platform lets a TrainJob pass to its pods (the chart's allow-lists), checked
- ``kube``      the thin edge: API calls, idempotent create, deletes, status patches
- ``reconcile`` observe -> decide -> act, serialised per TrainJob
- ``handlers``  the kopf handlers (run with ``python -m kontrast.operator``)
- ``metrics``   Prometheus counters and gauges served over HTTP

The folder ``operator/`` itself has no ``__init__.py``: it is mapped to ``kontrast.operator``
by setuptools, so it never shadows the standard library's ``operator`` module.
"""
