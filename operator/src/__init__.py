"""The kontrast operator: reconciles TrainJobs into distributed training pods.

Layout (pure functions decide, thin edges act):

- ``config``   the operator's settings (trainer image, pod defaults), read from the environment
- ``render``   TrainJob -> child manifests (pure)
- ``lifecycle`` TrainJob + observed children -> new status and the actions to take (pure)
- ``kube``     the thin edge: API calls, idempotent create, deletes, status patches
- ``reconcile`` observe -> decide -> act, serialised per TrainJob
- ``handlers`` the kopf handlers (run with ``python -m kontrast.operator``)
- ``metrics``  Prometheus counters and gauges served over HTTP

The folder ``operator/`` itself has no ``__init__.py``: it is mapped to ``kontrast.operator``
by setuptools, so it never shadows the standard library's ``operator`` module.
"""
