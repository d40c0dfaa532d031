"""The `kontrast train` command: exit codes, termination log, example data, reporters."""

from __future__ import annotations

import filecmp
import io
import json
import shutil
from pathlib import Path

import yaml

from kontrast.contract import EXIT_PERMANENT
from kontrast.trainer.cli.train import main
from kontrast.trainer.data.example_data import generate
from kontrast.trainer.report.reporters import JsonlReporter, TerminalReporter, format_progress

ROOT = Path(__file__).resolve().parents[2]


def write_job(path: Path, spec: dict, **meta) -> Path:
    path.write_text(yaml.safe_dump({"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
                                    "metadata": {"name": "job", **meta}, "spec": spec}))
    return path


def test_bad_data_exits_permanent_with_termination_log(base_spec, tmp_path, h, monkeypatch, capsys):
    data = h.write_csv(tmp_path / "bad.csv", [["query", "image", "caption", "score"], ["q", "a.png", "t", "1"]])
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KONTRAST_TERMINATION_LOG", str(log))
    job = write_job(tmp_path / "tj.yaml", {**base_spec, "trainData": str(data)})
    assert main([str(job), "--no-progress"]) == EXIT_PERMANENT == 78
    message = log.read_text()
    assert "bad.csv" in message and "column 'title'" in message and "spec.rightKeys[1]" in message
    assert message in capsys.readouterr().err
    assert not (Path(base_spec["output"]) / "checkpoints").exists()      # nothing started


def test_invalid_trainjob_exits_permanent(base_spec, tmp_path, monkeypatch, capsys):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KONTRAST_TERMINATION_LOG", str(log))
    job = write_job(tmp_path / "tj.yaml", {**base_spec, "learningRate": 0.1, "batchSize": 0})
    assert main([str(job)]) == EXIT_PERMANENT
    text = log.read_text()
    assert "spec.learningRate: unknown field" in text and "spec.batchSize" in text


def test_cli_train_runs_and_writes_outputs(base_spec, tmp_path):
    from kontrast.cli import main as cli_main

    spec = {**base_spec, "epochs": 1, "output": "runs/one"}           # relative to the TrainJob's folder
    (tmp_path / "jobs").mkdir()
    job = write_job(tmp_path / "jobs" / "tj.yaml", spec)
    assert cli_main(["train", str(job), "--no-progress"]) == 0
    out = tmp_path / "jobs" / "runs" / "one"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["after"]["ndcg@10"] >= 0 and (out / "checkpoints" / "epoch_1.pt").exists()
    # --output overrides spec.output (relative to the working folder) and --check trains nothing
    assert cli_main(["train", str(job), "--check", "--output", str(tmp_path / "other")]) == 0
    assert not (tmp_path / "other").exists()


def test_example_trainjob_is_valid_and_generates_its_data(tmp_path):
    from kontrast.api import load_trainjob

    for name in ("trainjob.yaml", "tiny-vit.json"):
        shutil.copy(ROOT / "examples" / name, tmp_path / name)
    obj = load_trainjob(tmp_path / "trainjob.yaml")
    assert obj["metadata"]["annotations"]["kontrast.dev/generate-example-data"] == "true"
    assert main([str(tmp_path / "trainjob.yaml"), "--check"]) == 0        # generates, then validates every image
    assert (tmp_path / "data" / "train.csv").exists() and (tmp_path / "data" / "eval.csv").exists()


def test_generator_is_deterministic(tmp_path):
    a, b = generate(tmp_path / "a"), generate(tmp_path / "b")
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files
    assert filecmp.cmpfiles(a / "images", b / "images", sorted(p.name for p in (a / "images").iterdir()),
                            shallow=False)[1:] == ([], [])
    header, *rows = (a / "train.csv").read_text().splitlines()
    assert header == "query,image,title,score" and len(rows) > 500
    assert {r.rsplit(",", 1)[1] for r in rows} == {"1", "2", "3"}


def test_terminal_reporter_shows_progress_fields():
    stream = io.StringIO()
    r = TerminalReporter(stream=stream, interval=0)
    p = {"epoch": 2, "epochs": 5, "step": 30, "totalSteps": 100, "percent": 30.0, "loss": 1.23456,
         "lr": 5e-4, "samplesPerSecond": 123.4, "etaSeconds": 3725}
    r.on_step(p)
    line = stream.getvalue()
    for part in ("epoch 2/5", "step 30/100", "30.0%", "loss 1.2346", "lr 5.00e-04", "123.4 samples/s", "ETA 1:02:05"):
        assert part in line, part
    assert format_progress(p).count("#") == 6
    assert "grad" not in line and "data" not in line          # only when the step logged them
    p.update(gradNorm=12.345, dataWaitSeconds=0.25, computeSeconds=0.75)
    assert "| grad 12.3 | data 25% | 123.4 samples/s" in format_progress(p)


def test_jsonl_reporter_appends_and_uploads_to_object_stores(tmp_path):
    local = JsonlReporter(str(tmp_path / "p.jsonl"))
    local.on_step({"step": 1})
    local.close()
    JsonlReporter(str(tmp_path / "p.jsonl")).on_step({"step": 2})   # a resumed run appends
    assert [json.loads(line)["step"] for line in (tmp_path / "p.jsonl").read_text().splitlines()] == [1, 2]
    remote = JsonlReporter("memory://bucket/run/progress.jsonl", flush_every=3600)
    remote.on_step({"step": 1})
    remote.on_checkpoint({"uri": "x", "epoch": 1, "step": 1, "time": "t"})
    remote.close()
    import fsspec

    with fsspec.open("memory://bucket/run/progress.jsonl", "rt") as f:
        assert [json.loads(line)["event"] for line in f.read().splitlines()] == ["step", "checkpoint"]


def test_progress_on_an_object_store_is_uploaded_in_bounded_parts(monkeypatch):
    """A long run's progress.jsonl on an object store: the lines wait in a local file, not in
    memory, and go up in numbered parts of at most PROGRESS_PART_BYTES (progress.jsonl,
    progress.1.jsonl, ...), so no upload grows with the run; reading the parts in order gives
    every line, and a resumed run continues the last part."""
    from kontrast.trainer import storage
    from kontrast.trainer.layout import OutputFolder
    from kontrast.trainer.ship.run_files import read_run

    now, uploaded = [0.0], []
    real_upload = storage.upload

    def counting(local, location):
        uploaded.append(Path(local).stat().st_size)
        real_upload(local, location)

    monkeypatch.setattr(storage, "upload", counting)
    remote = JsonlReporter("memory://bucket/long/progress.jsonl", flush_every=60, clock=lambda: now[0])
    pad = "x" * 400
    for step in range(20_000):        # one step a second: 5.5 hours, about 9 MB of lines
        now[0] += 1.0
        remote.on_step({"step": step, "pad": pad})
    remote.close()
    line = 500
    assert max(uploaded) <= OutputFolder.PROGRESS_PART_BYTES + line       # bounded, however long the run
    assert len(uploaded) <= 20_000 / 60 + 12                             # about one a minute, one more a part
    parts = OutputFolder("memory://bucket/long").progress_parts()
    assert len(parts) >= 8 and parts[1] == "memory://bucket/long/progress.1.jsonl"
    assert [e["step"] for e in read_run("memory://bucket/long").events] == list(range(20_000))
    assert not hasattr(remote, "_lines")

    resumed = JsonlReporter("memory://bucket/long/progress.jsonl", flush_every=60, clock=lambda: now[0])
    resumed.on_step({"step": 20_000})
    resumed.close()
    assert OutputFolder("memory://bucket/long").progress_parts() == parts          # the last part, continued
    assert [e["step"] for e in read_run("memory://bucket/long").events] == list(range(20_001))


_CHECK_IMPORTS = """
import sys
from kontrast.trainer.cli.train import main
code = main([sys.argv[1], "--check", "--no-progress"])
print(code, sorted(m for m in ("pandas", "torch", "fsspec", "urllib3") if m in sys.modules))
"""


def test_a_check_of_local_files_imports_only_what_it_needs(base_spec, small_data, tmp_path, h):
    """``kontrast train --check`` of a small file is mostly start-up, so what it does not need
    stays out of it: torch (seconds); pandas (0.13 s, which pyarrow imports for ``pa.array``,
    ``pa.scalar`` and ``to_numpy``); fsspec and urllib3 (40 ms, for remote files and images).
    The file takes the checks' branches: images given relative, absolute, as file:// and
    under ~, and an eval set."""
    import csv
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    with open(small_data / "train.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    shutil.copy(small_data / rows[0][1], home / "first.png")
    rows[0][1], rows[1][1] = "~/first.png", "file://" + str(small_data / rows[1][1])
    rows[2][1] = str(small_data / rows[2][1])
    data = h.write_csv(tmp_path / "train.csv", [header, *rows])
    (tmp_path / "images").symlink_to(small_data / "images")      # the other rows' relative images
    job = write_job(tmp_path / "tj.yaml", {**base_spec, "trainData": str(data)})
    env = {**os.environ, "HOME": str(home), "KONTRAST_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _CHECK_IMPORTS, str(job)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "0 []", done.stderr[-3000:]
