"""The contract between the operator, the pods it renders and the trainer.

Both sides import these names, so the operator (no torch) and the trainer (no kopf) can never
disagree about an exit code, a path or an environment variable.
"""

#: The trainer exits with this code for permanent errors (bad data, bad parameters). The
#: operator's podFailurePolicy fails the whole job at once on it: retrying cannot help.
#: 78 is EX_CONFIG from sysexits.h.
EXIT_PERMANENT = 78

#: Where the operator mounts the TrainJob (its manifest, unchanged) inside training pods.
TRAINJOB_MOUNT_DIR = "/etc/kontrast"
TRAINJOB_FILE = "trainjob.yaml"

#: pvc://<claim>/<path> URIs resolve to <root>/<claim>/<path>; the operator mounts each claim
#: a TrainJob names at <root>/<claim>. Local runs may set the variable to map claims to folders.
PVC_ROOT_ENV = "KONTRAST_PVC_ROOT"
PVC_ROOT_DEFAULT = "/mnt/kontrast/pvc"

#: The node-local cache (checked tables, fetched images) when spec.data.cache is unset. The
#: operator mounts the chart's cache volume (an emptyDir by default) at CACHE_MOUNT and points
#: the variable at it; a local run defaults to ~/.cache/kontrast.
CACHE_ENV = "KONTRAST_CACHE"
CACHE_MOUNT = "/var/cache/kontrast"

#: Set by the operator in training pods so rank 0 reports into the TrainJob's status.
JOB_NAME_ENV = "KONTRAST_TRAINJOB_NAME"
JOB_NAMESPACE_ENV = "KONTRAST_TRAINJOB_NAMESPACE"
JOB_UID_ENV = "KONTRAST_TRAINJOB_UID"  # what the MLflow run and model version are tagged with
#: Seconds between rank 0's progress patches of the TrainJob status (the chart's
#: trainer.statusIntervalSeconds, passed by the operator to every training pod).
STATUS_INTERVAL_ENV = "KONTRAST_STATUS_INTERVAL"

#: Kubernetes copies this file's content into the pod status when the container ends; the
#: trainer writes the reason of a permanent failure there, and the operator shows it in the
#: Failed condition.
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "KONTRAST_TERMINATION_LOG"
