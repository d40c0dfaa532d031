"""kontrast.client without a cluster: status parsing, change events, the printed lines (terminal
and not), the ETA, worker-pod selection for `kontrast logs`, and `kontrast submit` refusing an
invalid file before any request (the API server tests are tests/k8s/test_client_*.py)."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kontrast.client import (ConditionChanged, EvaluationLanded, Finished, Follower, NoWorkerPod, PhaseChanged,
                             Printer, ProgressUpdated, Snapshot, eta_seconds, select_worker_pod)
from kontrast.client import pods as podsel
from kontrast.client.follow import format_progress
from kontrast.display import format_duration
from kontrast.client.status import Progress

REPO = Path(__file__).resolve().parents[2]


def tj(status: dict | None = None, rv: str = "1") -> dict:
    obj = {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
           "metadata": {"name": "demo", "namespace": "ml", "uid": "u1", "resourceVersion": rv}, "spec": {}}
    if status is not None:
        obj["status"] = status
    return obj


RUNNING = {"type": "Running", "status": "True", "reason": "Started", "message": "1 of 1 pods running"}
PROGRESS = {"epoch": 1, "epochs": 2, "step": 5, "totalSteps": 20, "percent": 25.0, "loss": 0.5,
            "samplesPerSecond": 64.0, "etaSeconds": 99.0, "updatedAt": "2026-01-01T00:00:10Z"}


def test_snapshot_parses_status_and_outcome():
    snap = Snapshot.from_object(tj({
        "phase": "Failed", "message": "restart budget spent",
        "conditions": [RUNNING | {"status": "False"},
                       {"type": "Failed", "status": "True", "reason": "RestartLimitExceeded", "message": "x"}],
        "progress": PROGRESS, "metrics": {"latest": {"ndcg@10": 0.5}, "epoch": 1},
        "resolved": {"globalBatchSize": 16}}))
    assert snap.done and snap.failed and not snap.succeeded
    assert snap.reason == "RestartLimitExceeded"
    assert snap.outcome_message == "restart budget spent"
    assert snap.progress.step == 5 and snap.progress.total_steps == 20 and snap.progress.fraction == 0.25
    assert snap.metrics.latest == {"ndcg@10": 0.5}
    assert snap.condition("Running").is_true is False


def test_eta_from_steps_and_rate():
    p = Progress.from_status(PROGRESS)
    # 15 steps left at 64 samples/s of 16-row steps = 4 steps/s
    assert eta_seconds(p, 16) == pytest.approx(3.75)
    # without the batch size: the measured step rate, else the trainer's own figure
    assert eta_seconds(p, None, steps_per_second=0.5) == pytest.approx(30.0)
    assert eta_seconds(p) == 99.0
    assert eta_seconds(Progress.from_status(PROGRESS | {"step": 20})) == 0.0
    assert eta_seconds(None) is None


def test_follower_measures_step_rate_between_updates():
    f = Follower()
    f.update(Snapshot.from_object(tj({"phase": "Running", "progress": PROGRESS}, "1")))
    later = PROGRESS | {"step": 10, "updatedAt": "2026-01-01T00:00:20Z", "samplesPerSecond": None}
    evs = f.update(Snapshot.from_object(tj({"phase": "Running", "progress": later}, "2")))
    assert f.steps_per_second == pytest.approx(0.5)
    (prog,) = [e for e in evs if isinstance(e, ProgressUpdated)]
    assert prog.eta_seconds == pytest.approx(20.0)  # 10 steps left at 0.5 steps/s


def test_follower_reports_each_change_once():
    f = Follower()
    evs = f.update(Snapshot.from_object(tj({"phase": "Pending"})))
    assert evs == [PhaseChanged("Pending", None)]
    assert f.update(Snapshot.from_object(tj({"phase": "Pending"}, "2"))) == []
    evs = f.update(Snapshot.from_object(tj({"phase": "Running", "conditions": [RUNNING]}, "3")))
    assert [type(e) for e in evs] == [PhaseChanged, ConditionChanged]
    evs = f.update(Snapshot.from_object(tj({"phase": "Running", "conditions": [RUNNING], "progress": PROGRESS}, "4")))
    assert [type(e) for e in evs] == [ProgressUpdated]
    hist = [{"epoch": 0, "phase": "before", "metrics": {"ndcg@10": 0.4}}]
    evs = f.update(Snapshot.from_object(tj({"phase": "Running", "conditions": [RUNNING], "progress": PROGRESS,
                                            "metrics": {"history": hist, "latest": {"ndcg@10": 0.4}}}, "5")))
    assert [type(e) for e in evs] == [EvaluationLanded] and evs[0].evaluation.phase == "before"
    hist2 = hist + [{"epoch": 1, "phase": "epoch", "metrics": {"ndcg@10": 0.6}}]
    done = {"type": "Succeeded", "status": "True", "reason": "Completed", "message": "all nodes finished training"}
    evs = f.update(Snapshot.from_object(tj({"phase": "Succeeded", "conditions": [RUNNING | {"status": "False"}, done],
                                            "progress": PROGRESS, "metrics": {"history": hist2}}, "6")))
    assert [type(e) for e in evs] == [PhaseChanged, ConditionChanged, ConditionChanged, EvaluationLanded, Finished]
    assert evs[3].evaluation.epoch == 1


def test_history_window_that_dropped_old_entries():
    f = Follower()
    h = [{"epoch": i, "phase": "epoch", "metrics": {"ndcg@10": i / 10}} for i in range(3)]
    f.update(Snapshot.from_object(tj({"metrics": {"history": h}})))
    evs = f.update(Snapshot.from_object(tj({"metrics": {"history": h[1:] + [
        {"epoch": 3, "phase": "epoch", "metrics": {"ndcg@10": 0.3}}]}}, "2")))
    assert [e.evaluation.epoch for e in evs] == [3]


def run_printer(snapshots: list[dict], tty: bool) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    printer, follower = Printer(out, err, tty=tty), Follower()
    for i, status in enumerate(snapshots):
        printer.events(follower.update(Snapshot.from_object(tj(status, str(i)))))
    return out.getvalue(), err.getvalue()


STORY = [
    {"phase": "Running", "conditions": [RUNNING]},
    {"phase": "Running", "conditions": [RUNNING], "progress": PROGRESS},
    {"phase": "Running", "conditions": [RUNNING], "progress": PROGRESS | {"step": 10, "percent": 50.0}},
    {"phase": "Running", "conditions": [RUNNING], "progress": PROGRESS | {"step": 10, "percent": 50.0},
     "metrics": {"latest": {"ndcg@10": 0.61234, "queries": 40.0}, "epoch": 1}},
    {"phase": "Failed", "conditions": [RUNNING | {"status": "False"},
                                       {"type": "Failed", "status": "True", "reason": "PermanentError",
                                        "message": "bad weight in row 5"}],
     "message": "bad weight in row 5", "progress": PROGRESS | {"step": 10, "percent": 50.0}},
]


def test_printer_without_a_terminal_writes_plain_lines():
    out, err = run_printer(STORY, tty=False)
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == "phase Running"
    assert lines[1] == "condition Running=True (Started): 1 of 1 pods running"
    assert lines[2].startswith("epoch 1/2 [#####---------------]  25% step 5/20 | loss 0.5000 | 64.0 samples/s")
    assert lines[3].startswith("epoch 1/2 [##########----------]  50% step 10/20")
    assert lines[4] == "metrics epoch 1: ndcg@10 0.6123 | queries 40"
    assert lines[5:] == ["phase Failed", "condition Running=False (Started): 1 of 1 pods running",
                         "condition Failed=True (PermanentError): bad weight in row 5"]
    assert err == "Failed (PermanentError): bad weight in row 5\n"


def test_printer_on_a_terminal_redraws_one_progress_line():
    out, _ = run_printer(STORY, tty=True)
    assert out.count("\r\x1b[K") >= 3
    # the bar is redrawn in place, and every other line is printed above it, whole
    assert "\r\x1b[Kmetrics epoch 1: ndcg@10 0.6123 | queries 40\n" in out
    final = out.split("\r\x1b[K")[-1]
    assert final.startswith("condition Failed=True") or final.endswith("\n")


def test_format_helpers():
    assert format_duration(None) == "--:--"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(65) == "01:05"
    assert format_progress(Progress(), None) == "progress | ETA --:--"


# --- worker pod selection (kontrast logs) -----------------------------------------------------
def pod(name: str, attempt: int | None, index: int | None, created: str = "2026-01-01T00:00:00Z",
        job: str = "demo", full: str | None = None) -> dict:
    labels = {podsel.LABEL_TRAINJOB: job, podsel.LABEL_COMPONENT: "worker"}
    if attempt is not None:
        labels[podsel.LABEL_ATTEMPT] = str(attempt)
    annotations = {podsel.ANNOTATION_TRAINJOB: full or job}
    if index is not None:
        annotations[podsel.COMPLETION_INDEX] = str(index)
    return {"metadata": {"name": name, "labels": labels, "annotations": annotations, "creationTimestamp": created}}


def test_select_worker_pod_takes_the_newest_attempt_and_the_right_index():
    pods = [pod("demo-1-0", 1, 0), pod("demo-1-1", 1, 1), pod("demo-2-0", 2, 0), pod("demo-2-1", 2, 1),
            pod("demo-10-1", 10, 1), pod("demo-10-0", 10, 0)]
    assert select_worker_pod(pods, "demo")["metadata"]["name"] == "demo-10-0"  # numeric, not text order
    assert select_worker_pod(pods, "demo", worker=1)["metadata"]["name"] == "demo-10-1"
    assert select_worker_pod(pods, "demo", worker=1, attempt=2)["metadata"]["name"] == "demo-2-1"


def test_select_worker_pod_prefers_a_replacement_pod_and_the_label_index():
    old = pod("demo-3-0-aaaaa", 3, 0, "2026-01-01T00:00:00Z")
    new = pod("demo-3-0-bbbbb", 3, None, "2026-01-01T00:05:00Z")
    new["metadata"]["labels"][podsel.COMPLETION_INDEX] = "0"
    assert select_worker_pod([new, old], "demo")["metadata"]["name"] == "demo-3-0-bbbbb"


def test_select_worker_pod_explains_what_is_missing():
    with pytest.raises(NoWorkerPod, match="no worker pods"):
        select_worker_pod([], "demo")
    with pytest.raises(NoWorkerPod, match=r"no worker 3 \(workers: 0, 1\)"):
        select_worker_pod([pod("demo-1-0", 1, 0), pod("demo-1-1", 1, 1)], "demo", worker=3)
    with pytest.raises(NoWorkerPod, match=r"attempts: 1"):
        select_worker_pod([pod("demo-1-0", 1, 0)], "demo", attempt=4)
    # another TrainJob's pods (same label value, other full name) and unlabelled pods are ignored
    with pytest.raises(NoWorkerPod):
        select_worker_pod([pod("x", 1, 0, full="demo-other"), pod("y", None, 0)], "demo")


def test_labels_are_the_operators():
    from kontrast.operator.children import names as render  # no kopf needed
    tj_obj = {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
              "metadata": {"name": "a" * 40, "namespace": "ml", "uid": "u"}, "spec": {}}
    labels = render.worker_labels(tj_obj, 7)
    assert labels[podsel.LABEL_TRAINJOB] == "a" * 40  # a name of the CRD's maximum length is its own label
    assert labels[podsel.LABEL_ATTEMPT] == "7" and labels[podsel.LABEL_COMPONENT] == "worker"
    assert (podsel.LABEL_TRAINJOB, podsel.LABEL_ATTEMPT, podsel.LABEL_COMPONENT, podsel.ANNOTATION_TRAINJOB,
            podsel.COMPLETION_INDEX, podsel.TRAINER_CONTAINER) == (
        render.LABEL_TRAINJOB, render.LABEL_ATTEMPT, render.LABEL_COMPONENT, render.ANNOTATION_TRAINJOB,
        render.COMPLETION_INDEX_ANNOTATION, render.TRAINER_CONTAINER)


# --- submit without a cluster ---------------------------------------------------------------
def test_submit_of_an_invalid_file_names_every_field_and_sends_nothing(tmp_path):
    obj = yaml.safe_load((REPO / "examples" / "cluster-cpu.yaml").read_text().split("---")[1])
    bad = copy.deepcopy(obj)
    bad["spec"]["batchSize"] = 0
    bad["spec"]["learningRate"] = 0.1
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    # a kubeconfig that cannot work: submit must fail on the file before it ever reads it
    env = {"KUBECONFIG": str(tmp_path / "missing-kubeconfig"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "kontrast.cli", "submit", str(f)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "spec.learningRate: unknown field" in proc.stderr
    assert "spec.batchSize: Invalid value: 0" in proc.stderr
    assert proc.stdout == ""


def test_submit_without_a_kubeconfig_is_an_api_error(tmp_path):
    env = {"KUBECONFIG": str(tmp_path / "missing-kubeconfig"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "kontrast.cli", "submit", str(REPO / "examples" / "cluster-cpu.yaml")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "kubeconfig" in proc.stderr


def test_validate_does_not_import_kubernetes(tmp_path):
    code = ("import sys; from kontrast.cli import main; rc = main(['validate', 'examples/cluster-cpu.yaml']); "
            "import kontrast.client; assert 'kubernetes' not in sys.modules, 'imported kubernetes'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_readme_documents_the_exit_codes():
    from kontrast import cli

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("Exit codes of `submit`, `watch` and `logs`:"):]
    table = table[:table.index("\n\n", table.index("| code |"))]
    documented = {int(row.split("|")[1]) for row in table.splitlines() if row.startswith("| ") and
                  row.split("|")[1].strip().isdigit()}
    codes = {getattr(cli, n) for n in dir(cli) if n.startswith("EXIT_")}
    assert documented == codes
    assert "kontrast submit examples/cluster-cpu.yaml --watch" in readme


def test_several_eval_sets_print_per_set_and_parse_from_status():
    """kontrast watch with evalSets: the first set's line as with evalData, then each set's
    nDCG@10 (what the status history keeps of every set); status.metrics.sets parses by name."""
    sets = {"in-domain": {"ndcg@10": 0.5}, "zero-shot": {"ndcg@10": 0.25}}
    metrics = {"history": [{"epoch": 0, "phase": "before", "metrics": {"ndcg@10": 0.5, "mrr@10": 0.4}, "sets": sets}],
               "selectBy": "in-domain",
               "sets": {"in-domain": {"before": {"ndcg@10": 0.5}}, "zero-shot": {"before": {"ndcg@10": 0.25}}}}
    snap = Snapshot.from_object(tj({"phase": "Running", "metrics": metrics}))
    assert snap.metrics.select_by == "in-domain"
    assert snap.metrics.sets["zero-shot"]["before"] == {"ndcg@10": 0.25}
    assert snap.metrics.history[0].sets == sets
    out, _ = run_printer([{"phase": "Running", "metrics": metrics}], tty=False)
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("metrics before training"))
    assert "ndcg@10 0.5000" in lines[at] and "mrr@10 0.4000" in lines[at]
    assert lines[at + 1] == "  per eval set: in-domain ndcg@10 0.5000 | zero-shot ndcg@10 0.2500"
    # one set (evalData): one line, as before
    one = {"history": [{"epoch": 0, "phase": "before", "metrics": {"ndcg@10": 0.5},
                        "sets": {"eval": {"ndcg@10": 0.5}}}]}
    out, _ = run_printer([{"phase": "Running", "metrics": one}], tty=False)
    assert "per eval set" not in out
