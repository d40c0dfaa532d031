"""The cluster examples are valid TrainJobs, and render to what their comments promise."""

from __future__ import annotations

from pathlib import Path

import yaml

from kontrast.api import apply_defaults, validate
from kontrast.operator.children.job import worker_job
from kontrast.operator.children.names import KUEUE_PRIORITY_LABEL, KUEUE_QUEUE_LABEL
from kontrast.operator.config import OperatorConfig

REPO = Path(__file__).resolve().parents[2]


def trainjobs(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / name).read_text()) if d]
    out = []
    for d in docs:
        if d["kind"] == "TrainJob":
            d = apply_defaults(d)
            assert validate(d) == [], (name, validate(d))
            d["metadata"].update(namespace="ml", uid="u")
            out.append(d)
    return out


def test_cpu_example():
    (tj,) = trainjobs("cluster-cpu.yaml")
    job = worker_job(tj, 0, 0, OperatorConfig())
    pod = job["spec"]["template"]["spec"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] \
        == ["kontrast-data"]
    assert "nvidia.com/gpu" not in str(pod["containers"][0]["resources"])
    # The model config the example names is shipped in the trainer image.
    assert tj["spec"]["model"] == "/opt/kontrast/examples/tiny-vit.json"
    assert "COPY examples/tiny-vit.json /opt/kontrast/examples/tiny-vit.json" in \
        (REPO / "trainer" / "Dockerfile").read_text()


def test_gpu_example_is_multinode_with_a_gpu_per_process():
    (tj,) = trainjobs("cluster-gpu.yaml")
    spec = tj["spec"]
    assert spec["nodes"] >= 2
    job = worker_job(tj, 0, 0, OperatorConfig())
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == spec["procsPerNode"]
    secret = spec["storageSecretRef"]["name"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(refs)
    assert set(refs.values()) == {secret}
    assert spec["output"].startswith(("s3://", "pvc://"))
    assert job["spec"]["completions"] == spec["nodes"]


def test_kueue_example_names_the_example_queue_and_priority():
    (tj,) = trainjobs("kueue/trainjob.yaml")
    queues = {(d["kind"], d["metadata"]["name"]): d
              for d in yaml.safe_load_all((REPO / "examples" / "kueue" / "queues.yaml").read_text()) if d}
    job = worker_job(tj, 0, 0, OperatorConfig())
    labels = job["metadata"]["labels"]
    local_queue = queues[("LocalQueue", labels[KUEUE_QUEUE_LABEL])]
    cluster_queue = queues[("ClusterQueue", local_queue["spec"]["clusterQueue"])]
    assert ("WorkloadPriorityClass", labels[KUEUE_PRIORITY_LABEL]) in queues
    # Every resource a pod asks for is covered by the ClusterQueue (else Kueue never admits
    # it), and the quota fits exactly one such job.
    requests = job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    (group,) = cluster_queue["spec"]["resourceGroups"]
    assert set(requests) <= set(group["coveredResources"])
    (flavor,) = group["flavors"]
    quota = {r["name"]: r["nominalQuota"] for r in flavor["resources"]}
    assert int(quota["cpu"]) == int(requests["cpu"]) * job["spec"]["parallelism"]


def test_readme_quotes_the_kueue_examples_verbatim():
    readme = (REPO / "README.md").read_text()
    for name in ("queues.yaml", "trainjob.yaml"):
        text = (REPO / "examples" / "kueue" / name).read_text().rstrip()
        assert f"```yaml\n{text}\n```" in readme, name
