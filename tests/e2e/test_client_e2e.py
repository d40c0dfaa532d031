"""`kontrast submit --watch` and `kontrast logs` against the real operator and a real (tiny)
training run: the lines come from the status the operator and the trainer's rank 0 write.

The test node agent does not serve the kubelet's log endpoint (tests/harness/nodeagent.py:
"Not emulated: ... kubectl logs/exec"), so the API server cannot return a pod's log here:
the `logs` part checks that the command picks the operator's pod of the newest attempt and
passes on the server's answer; reading log text is not tested end to end.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from e2e.support import trainjob

pytestmark = pytest.mark.e2e


def test_submit_watch_follows_a_real_run(control_plane, tjs, operator, tiny, tmp_path):
    obj = trainjob("cli-watch", tiny, epochs=2, nodes=1, evalEvery=1, scheduling={"cleanup": "Never"})
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(obj))
    env = control_plane.env()
    proc = subprocess.run([sys.executable, "-m", "kontrast.cli", "submit", "--watch", str(f), "-n", tjs.ns,
                           "--timeout", "400"], capture_output=True, text=True, env=env, timeout=450)
    lines = proc.stdout.splitlines()
    print(proc.stdout)  # the README's example is this output
    said = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, f"{said}\n{tjs.debug('cli-watch')}"
    assert lines[:2] == [f"trainjob.kontrast.dev/cli-watch created in namespace {tjs.ns}",
                         f"TrainJob {tjs.ns}/cli-watch"], said
    assert "condition Created=True (ChildrenCreated): created the worker Job cli-watch-0 for 1 node(s)" in lines, said
    # (no assertion on Running=True: on a loaded machine the operator may first see the pod
    # when it has already finished, and go from Pending to Succeeded)
    progress = [line for line in lines if re.match(r"epoch \d/2 \[[#-]{20}\] +\d+% step \d+/\d+ \| loss ", line)]
    assert progress, said
    assert re.search(r"step (\d+)/\1 \|", progress[-1]), said  # the last one is the end
    assert any(line.startswith("metrics before training: ndcg@10 ") for line in lines), said
    assert any(line.startswith("metrics epoch 1: ndcg@10 ") for line in lines), said
    assert any(line.startswith("metrics after training: ndcg@10 ") for line in lines), said
    assert any(line.startswith("output model: ") and line.endswith("/runs/cli-watch/model") for line in lines), said
    assert lines[-1] == "Succeeded: Training completed", said
    assert "\r" not in proc.stdout

    pods = [p for p in tjs.pods("cli-watch") if p["metadata"]["labels"].get("kontrast.dev/component") == "worker"]
    assert len(pods) == 1, pods
    logs = subprocess.run([sys.executable, "-m", "kontrast.cli", "logs", "cli-watch", "-n", tjs.ns],
                          capture_output=True, text=True, env=env, timeout=120)
    assert logs.stderr.splitlines()[:1] == [f"==> pod {pods[0]['metadata']['name']} (attempt 0, worker 0)"], \
        logs.stderr
    # no kubelet log endpoint here: the API server's own error is passed on (a real cluster streams the log)
    assert logs.returncode in (0, 4), logs.stderr
