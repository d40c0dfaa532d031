"""The operator end to end: real API server and controllers, pods run by the test node agent,
real 2-node gloo training of a tiny model, the operator under the Helm chart's RBAC."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import pytest

from harness.kube import ApiError, Kube
from harness.waiting import wait_for

from e2e.support import TJ_PATH, StatusRecorder, trainjob

pytestmark = pytest.mark.e2e


def kubectl_rows(control_plane, ns: str) -> list[dict]:
    out = control_plane.kubectl("get", "tj", "-n", ns, "-o", "wide").stdout.splitlines()
    header = out[0].split()
    return [dict(zip(header, line.split())) for line in out[1:]]


def test_two_node_training_succeeds(control_plane, tjs, operator, tiny):
    tjs.create(trainjob("clip", tiny, epochs=8))

    # Watch `kubectl get tj` (Phase, Progress, Epoch, Loss) while it trains.
    seen_rows: list[dict] = []
    stop = threading.Event()

    def watch_kubectl():
        while not stop.is_set():
            try:
                seen_rows.extend(kubectl_rows(control_plane, tjs.ns))
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_kubectl, daemon=True)
    watcher.start()
    steps = set()

    def done():
        st = tjs.status("clip")
        if (st.get("progress") or {}).get("step") is not None:
            steps.add(st["progress"]["step"])
        if st.get("phase") == "Failed":
            raise AssertionError(tjs.debug("clip"))
        return st.get("phase") == "Succeeded" and st
    try:
        st = wait_for(done, 300, "clip to succeed", interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{tjs.debug('clip')}") from None
    finally:
        stop.set()
        watcher.join(10)

    # status: phase, conditions, times, progress, latest checkpoint, eval metrics, resolved values
    assert st["observedGeneration"] == 1 and st["restarts"] == 0
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Created"]["status"] == "True"
    assert conds["Succeeded"]["status"] == "True"
    assert conds["Running"]["status"] == "False"
    assert st["startTime"] <= st["completionTime"]
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 32
    assert st["progress"]["percentText"] == "100%" and st["progress"]["epochText"] == "8/8"
    assert st["checkpoints"]["latest"]["epoch"] == 8
    assert st["checkpoints"]["latest"]["uri"].endswith("epoch_8.pt")
    saved = [c["uri"].rsplit("/", 1)[1] for c in st["checkpoints"]["saved"]]
    assert sorted(n for n in saved if n.startswith("epoch_")) == sorted(f"epoch_{e}.pt" for e in range(1, 9))
    assert 1 <= len([n for n in saved if n.startswith("step_")]) <= 2  # keepCheckpoints (default 2) resumable ones
    assert set(st["metrics"]["before"]) >= {"ndcg@10", "mrr@10", "recall@10", "map"}
    assert set(st["metrics"]["after"]) == set(st["metrics"]["before"])
    assert st["resolved"]["worldSize"] == 2 and st["resolved"]["device"] == "cpu"
    assert len(steps) >= 2, f"progress never moved: {steps}"

    # kubectl get tj showed the job moving
    progress_seen = [r.get("PROGRESS") for r in seen_rows if r.get("NAME") == "clip"]
    assert "100%" in progress_seen
    assert len({p for p in progress_seen if p and p != "<none>"}) >= 2, progress_seen
    final = kubectl_rows(control_plane, tjs.ns)[0]
    assert final["PHASE"] == "Succeeded" and final["EPOCH"] == "8/8" and final["RESTARTS"] == "0"
    assert float(final["LOSS"]) > 0

    # the checkpoints are really on the (pvc://runs) volume
    ckpts = sorted(p.name for p in (tjs.agent.pvc_path(tjs.ns, "runs") / "clip" / "checkpoints").glob("*.pt"))
    assert "epoch_8.pt" in ckpts

    # the report and the exported model, named in status.outputs, are on the volume too
    run_dir = tjs.agent.pvc_path(tjs.ns, "runs") / "clip"
    assert st["outputs"]["report"].endswith("/clip/report.html") and (run_dir / "report.html").is_file()
    assert st["outputs"]["model"].endswith("/clip/model")
    assert (run_dir / "model" / "open_clip_model.safetensors").is_file()
    assert st["progress"]["gradNorm"] > 0 and st["progress"]["dataWaitSeconds"] >= 0

    # milestone events on the TrainJob
    reasons = {e["reason"] for e in tjs.events("clip")}
    assert {"Created", "Running", "Succeeded"} <= reasons, reasons

    # cleanup OnSuccess: children gone, the TrainJob (the record) stays
    wait_for(lambda: not tjs.children("clip"), 60, "children cleaned up")
    assert tjs.get("clip")["status"]["phase"] == "Succeeded"

    # operator metrics
    text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
    assert 'kontrast_trainjobs{phase="Succeeded"}' in text
    assert 'kontrast_operator_reconciles_total{result="ok"}' in text


def test_trainer_service_account_can_only_patch_its_own_trainjob(control_plane, tjs, operator, tiny):
    # Suspended: the children that matter (ServiceAccount, Role, binding) without training pods.
    tjs.create(trainjob("mine", tiny, scheduling={"queueName": "nowhere"}))
    tjs.create(trainjob("other", tiny, scheduling={"suspend": True}))
    wait_for(lambda: "RoleBinding" in tjs.children("mine"), 60, "the children of mine")
    sa = tjs.kube.get(f"/api/v1/namespaces/{tjs.ns}/serviceaccounts/mine-trainer")
    assert sa["metadata"]["ownerReferences"][0]["name"] == "mine"
    as_trainer = Kube(control_plane.service_account_client(tjs.ns, "mine-trainer"))
    base = TJ_PATH.format(ns=tjs.ns)

    as_trainer.patch(f"{base}/mine/status", {"status": {"progress": {"step": 1}}})
    assert as_trainer.get(f"{base}/mine/status")["status"]["progress"]["step"] == 1
    for method, path, body in (("PATCH", f"{base}/other/status", {"status": {"progress": {"step": 1}}}),
                               ("GET", f"{base}/other/status", None),
                               ("PATCH", f"{base}/mine", {"spec": {"epochs": 1}}),
                               ("GET", f"{base}", None),
                               ("DELETE", f"{base}/mine", None)):
        with pytest.raises(ApiError) as err:
            as_trainer.request(method, path, body, content_type=Kube.MERGE if method == "PATCH" else None)
        assert err.value.status == 403, (method, path)


def test_a_phase_forged_by_the_trainer_is_put_back_and_training_runs_to_its_end(control_plane, tjs, operator, tiny):
    """No admission policy here (the chart's needs Kubernetes 1.30+ and can be off), so RBAC lets
    the trainer's token write status.phase. The operator decides from its own record, so a forged
    Succeeded (and restart count) is overwritten and the run trains to its real end, where it
    once made the next reconcile clean the run up."""
    tjs.create(trainjob("forged", tiny, epochs=12))
    wait_for(lambda: (s := tjs.status("forged")).get("phase") == "Running" and (s.get("progress") or {}).get("step"),
             240, "forged to train")
    as_trainer = Kube(control_plane.service_account_client(tjs.ns, "forged-trainer"))
    as_trainer.patch(f"{TJ_PATH.format(ns=tjs.ns)}/forged/status", {"status": {"phase": "Succeeded", "restarts": 5}})
    tjs.patch_spec("forged", {"scheduling": {"maxRestarts": 4}})  # any reconcile follows
    st = wait_for(lambda: (s := tjs.status("forged")).get("phase") != "Succeeded" and s, 60,
                  "the operator to put its own phase back")
    assert st["phase"] == "Running" and st["restarts"] == 0, tjs.debug("forged")
    st = tjs.wait_phase("forged", ("Succeeded", "Failed"), timeout=300)
    assert st["phase"] == "Succeeded" and st["restarts"] == 0, tjs.debug("forged")
    assert st["progress"]["step"] == st["progress"]["totalSteps"], st["progress"]
    assert st["checkpoints"]["latest"]["epoch"] == 12


def test_killed_pod_restarts_from_checkpoint(tjs, tiny):
    tjs.create(trainjob("resume", tiny, epochs=40))
    with StatusRecorder(tjs.kube, tjs.ns, "resume") as rec:
        st = wait_for(lambda: (s := tjs.status("resume")).get("phase") == "Running"
                      and ((s.get("checkpoints") or {}).get("latest") or {}).get("epoch", 0) >= 2 and s,
                      300, "a checkpoint of epoch 2")
        ckpt_step = st["checkpoints"]["latest"]["step"]
        victim = tjs.pods("resume", attempt=0)[1]
        tjs.agent.kill_pod(tjs.ns, victim["metadata"]["name"], signal.SIGKILL)

        wait_for(lambda: tjs.status("resume").get("restarts") == 1, 120, "restarts == 1")
        restarting = wait_for(lambda: [c for st in rec.statuses for c in st.get("conditions") or []
                                       if c["type"] == "Restarting" and c["status"] == "True"], 30,
                              "the Restarting condition")[0]
        assert restarting["reason"] == "PodFailed" and "exited with code 137" in restarting["message"]
        # The new rank 0 says where it resumed from.
        wait_for(lambda: [p for p in tjs.pods("resume", attempt=1) if "resuming from" in tjs.log(p)],
                 240, "the new rank 0 to resume from the checkpoint")
        st = tjs.wait_phase("resume", "Succeeded", timeout=400)
        wait_for(lambda: rec.phases()[-1:] == ["Succeeded"], 30, "the watch to see Succeeded")

    phases = rec.phases()
    assert "Restarting" in phases and phases[-1] == "Succeeded", phases
    assert "Running" in phases[phases.index("Restarting"):], phases
    restarted = [s for s in rec.statuses if s.get("restarts") == 1]
    steps_after = [s["progress"]["step"] for s in restarted if (s.get("progress") or {}).get("step") is not None]
    # After the restart the step never goes back below the checkpoint it resumed from.
    assert steps_after and min(steps_after) >= ckpt_step, (ckpt_step, steps_after[:10])
    assert st["restarts"] == 1
    assert tjs.cond("resume", "Restarting")["status"] == "False"
    # Events are posted in the background, after the status they describe.
    events = wait_for(lambda: (ev := {e["reason"]: e for e in tjs.events("resume")}) and "Succeeded" in ev and ev,
                      60, "the Succeeded event")
    assert "exited with code 137" in events["Restarting"]["message"]


def test_eviction_restarts_without_spending_the_budget(tjs, tiny):
    """Preemption and eviction (pods with a DisruptionTarget condition) are not the job's fault."""
    tjs.create(trainjob("evicted", tiny, epochs=40))
    wait_for(lambda: ((tjs.status("evicted").get("checkpoints") or {}).get("latest") or {}).get("epoch", 0) >= 1,
             300, "a first checkpoint")
    victim = tjs.pods("evicted", attempt=0)[1]["metadata"]["name"]
    # The Eviction API (what `kubectl drain` uses) marks the pod DisruptionTarget, then deletes it.
    tjs.kube.post(f"/api/v1/namespaces/{tjs.ns}/pods/{victim}/eviction",
                  {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim, "namespace": tjs.ns}})
    wait_for(lambda: (tjs.cond("evicted", "Restarting") or {}).get("reason") == "Disrupted", 120,
             "a restart for the disruption")
    assert "does not count" in tjs.cond("evicted", "Restarting")["message"]
    # The next attempt starts only once the old gang is gone, then trains on.
    wait_for(lambda: len(tjs.pods("evicted", attempt=1)) == 2 and not tjs.pods("evicted", attempt=0), 240,
             "the new attempt's pods, alone")
    st = tjs.wait_phase("evicted", "Running", timeout=240)
    assert st["restarts"] == 0


def test_bad_data_fails_fast_without_restarts(tjs, tiny):
    tjs.create(trainjob("bad", tiny, trainData=str(tiny["bad"])))
    st = tjs.wait_phase("bad", "Failed", timeout=240)
    failed = tjs.cond("bad", "Failed")
    assert failed["reason"] == "PermanentError"
    assert "score" in failed["message"], failed["message"]
    assert "score" in st["message"]
    assert st["restarts"] == 0
    assert [j["metadata"]["name"] for j in tjs.jobs("bad")] == ["bad-0"]  # no second attempt
    pods = tjs.pods("bad")
    assert len(pods) == 2 and all(p["status"]["phase"] == "Failed" for p in pods)  # kept for debugging
    assert any(e["reason"] == "Failed" and e["type"] == "Warning" for e in tjs.events("bad"))


def test_suspend_and_resume(tjs, tiny):
    tjs.create(trainjob("pause", tiny, epochs=40))
    wait_for(lambda: ((tjs.status("pause").get("checkpoints") or {}).get("latest") or {}).get("epoch", 0) >= 1,
             300, "a first checkpoint")
    tjs.patch_spec("pause", {"scheduling": {"suspend": True}})
    st = tjs.wait_phase("pause", "Suspended", timeout=60)
    assert st["observedGeneration"] == 2
    wait_for(lambda: not tjs.pods("pause"), 120, "the pods to stop")
    ckpt = tjs.status("pause")["checkpoints"]["latest"]
    assert (tjs.agent.pvc_path(tjs.ns, "runs") / "pause" / "checkpoints").exists()
    assert tjs.cond("pause", "Suspended")["status"] == "True"

    tjs.patch_spec("pause", {"scheduling": {"suspend": False}})
    tjs.wait_phase("pause", "Running", timeout=240)
    assert tjs.cond("pause", "Suspended")["reason"] == "Resumed"
    assert tjs.status("pause")["restarts"] == 0  # suspending is not a failure
    (job,) = tjs.jobs("pause")  # a fresh attempt; the suspended one is gone
    assert job["metadata"]["annotations"]["kontrast.dev/start-reason"] == "Resumed"
    wait_for(lambda: tjs.status("pause")["progress"]["step"] > ckpt["step"], 240, "training to continue")
    reasons = {e["reason"] for e in tjs.events("pause")}
    assert {"Suspended", "Resumed"} <= reasons


def test_operator_restart_mid_run_then_delete(tjs, operator, tiny):
    tjs.create(trainjob("steady", tiny, epochs=40))
    tjs.wait_phase("steady", "Running", timeout=240)
    before = tjs.children("steady")
    status_before = tjs.status("steady")

    operator.stop()
    operator.start()
    # The resume handlers reconcile every TrainJob of the cluster once the watches list them.
    count = len(tjs.kube.get("/apis/kontrast.dev/v1alpha1/trainjobs")["items"])
    wait_for(lambda: operator.reconciles() >= count, 120, f"the restarted operator to reconcile {count} TrainJobs")

    after = tjs.children("steady")
    assert after["Job"] == before["Job"] == ["steady-0"]
    assert len(after["Pod"]) == 2 and after["Pod"] == before["Pod"]
    for kind in ("Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"):
        assert len(after[kind]) == 1, (kind, after)
    st = tjs.status("steady")
    assert st["phase"] == "Running" and st["restarts"] == 0
    assert st["startTime"] == status_before["startTime"]
    for c in st["conditions"]:
        old = next(o for o in status_before["conditions"] if o["type"] == c["type"])
        assert c["lastTransitionTime"] == old["lastTransitionTime"], c

    # Deleting the TrainJob mid-run removes every child (ownerReferences; no finalizer needed).
    assert not tjs.get("steady")["metadata"].get("finalizers")
    tjs.delete("steady")
    wait_for(lambda: not tjs.children("steady"), 120, "the children to be garbage-collected")
    with pytest.raises(ApiError):
        tjs.get("steady")


def test_active_deadline_is_enforced_without_polling_or_a_finalizer(tjs, tiny):
    tjs.create(trainjob("late", tiny, epochs=200, scheduling={"activeDeadlineSeconds": 15}))
    # The worker Job carries the deadline too, so the Job controller enforces it as well.
    (job,) = wait_for(lambda: tjs.jobs("late"), 60, "the worker Job")
    assert 1 <= job["spec"]["activeDeadlineSeconds"] <= 15
    st = tjs.wait_phase("late", "Failed", timeout=120)
    assert tjs.cond("late", "Failed")["reason"] == "DeadlineExceeded"
    assert st["restarts"] == 0
    wait_for(lambda: not tjs.pods("late"), 120, "the pods to stop")
    # Deletion never waits for the operator: no finalizer, ever.
    assert not tjs.get("late")["metadata"].get("finalizers")
