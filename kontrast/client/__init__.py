"""A small typed client for TrainJobs in a cluster (notebooks, scripts, ``kontrast submit``).

    from kontrast.client import Client

    client = Client()                              # the current kube context and its namespace
    job = client.create("examples/cluster-cpu.yaml")   # or a dict; validated locally first
    for snap in client.stream(job.name):           # typed snapshots, one per change (a watch)
        if snap.progress:
            print(snap.progress.epoch, snap.progress.step, snap.progress.loss)
    result = client.wait(job.name, timeout=3600)   # the final snapshot (Succeeded or Failed)
    print(result.phase, result.reason, result.metrics.after)

The ``kubernetes`` package (``pip install 'kontrast[client]'``) is imported only when a
Client is made; the status types, the change events and the pod selection are pure.
"""

from .api import (ApiRejected, Client, ClientError, TrainJobDeleted, WaitTimeout, check_trainjob,
                  read_documents)
from .follow import (ConditionChanged, EvaluationLanded, Event, Finished, Follower, PhaseChanged, Printer,
                     ProgressUpdated)
from .pods import NoWorkerPod, select_worker_pod, worker_selector
from .status import TERMINAL_PHASES, Condition, Evaluation, Metrics, Progress, Snapshot, eta_seconds
from ..api import TrainJobInvalid

__all__ = [
    "ApiRejected", "Client", "ClientError", "Condition", "ConditionChanged", "Evaluation", "EvaluationLanded",
    "Event", "Finished", "Follower", "Metrics", "NoWorkerPod", "PhaseChanged", "Printer", "Progress",
    "ProgressUpdated", "Snapshot", "TERMINAL_PHASES", "TrainJobDeleted", "TrainJobInvalid", "WaitTimeout",
    "check_trainjob", "eta_seconds", "read_documents", "select_worker_pod", "worker_selector",
]
