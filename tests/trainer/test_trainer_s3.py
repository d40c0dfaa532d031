"""Object storage for real: data, images, checkpoints and reports on s3:// (SeaweedFS on
loopback, harness/s3.py), with credentials and endpoint from the environment only."""

from __future__ import annotations

import json

import pytest
import s3fs

from kontrast.trainer.run import checkpoint as ckpt
from kontrast.trainer import storage

pytestmark = pytest.mark.s3


def upload_data(s3, folder) -> None:
    """The small data set (CSV files and the images their relative paths name) into the bucket."""
    s3.fs.put(f"{folder}/", f"{s3.bucket}/data/", recursive=True)


def jsonl(s3, url: str) -> list[dict]:
    return [json.loads(line) for line in s3.fs.cat(url).decode().splitlines() if line.strip()]


def test_trains_on_s3_data_and_resumes_from_an_s3_checkpoint(run_training, base_spec, small_data, s3, tmp_path, h):
    """CSV and images read from the bucket, checkpoints (with retention), progress and summary
    written to it, an interrupted run resumed from it; the result is the local run's."""
    upload_data(s3, small_data)
    spec = {**base_spec, "epochs": 2, "batchSize": 8, "trainData": s3.url("data/train32.csv"),
            "output": s3.url("runs/a"), "checkpointEvery": {"steps": 3}, "keepCheckpoints": 1}   # 4 steps per epoch
    spec.pop("evalData")
    stopped, _ = run_training(spec, max_epochs=1)
    assert stopped["stopped"] and [s for s, _ in ckpt.list_resumable(s3.url("runs/a"))] == [4]
    resumed, _ = run_training(spec)

    names = sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(f"{s3.bucket}/runs/a/checkpoints"))
    assert names == ["epoch_1.pt", "epoch_2.pt", "step_8.pt"]        # older resumables deleted from the bucket
    log = jsonl(s3, s3.url("runs/a/progress.jsonl"))
    starts = [e for e in log if e["event"] == "start"]
    assert [s["startStep"] for s in starts] == [0, 4]
    assert starts[1]["resumedFrom"] == s3.url("runs/a/checkpoints/step_4.pt")
    summary = json.loads(s3.fs.cat(s3.url("runs/a/summary.json")))
    assert summary["step"] == 8 and summary["summaryUri"] == s3.url("runs/a/summary.json")

    local, _ = run_training({**spec, "trainData": str(small_data / "train32.csv"), "output": str(tmp_path / "local")})
    remote_final = ckpt.load_checkpoint_file(s3.url("runs/a/checkpoints/epoch_2.pt"))["state_dict"]
    local_final = ckpt.load_checkpoint_file(local["checkpoints"][-1]["uri"])["state_dict"]
    assert h.state_close(remote_final, local_final)
    local_losses = [e["loss"] for e in h.read_jsonl(tmp_path / "local" / "progress.jsonl") if e["event"] == "step"]
    assert [e["loss"] for e in log if e["event"] == "step"] == local_losses


def test_credentials_come_from_the_environment(s3, monkeypatch):
    """The trainer passes nothing to s3fs: keys and endpoint are the AWS_* variables a
    storageSecretRef Secret sets, so a wrong secret in the environment is refused."""
    storage.write_text(s3.url("probe/ok.txt"), "ok")
    assert storage.list_names(s3.url("probe")) == ["ok.txt"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(PermissionError):
        storage.write_text(s3.url("probe/denied.txt"), "no")
    assert s3.fs.ls(f"{s3.bucket}/probe", detail=False) == [f"{s3.bucket}/probe/ok.txt"]


def test_progress_goes_to_the_bucket_in_bounded_parts(s3, monkeypatch):
    """On a real object store, each upload of the progress log is at most one part, and the
    report's reader finds every line across the parts."""
    from pathlib import Path

    from kontrast.trainer.layout import OutputFolder
    from kontrast.trainer.report.reporters import JsonlReporter
    from kontrast.trainer.ship.run_files import read_run

    monkeypatch.setattr(OutputFolder, "PROGRESS_PART_BYTES", 64 << 10)
    uploads, real = [], storage.upload
    monkeypatch.setattr(storage, "upload", lambda local, to: (uploads.append(Path(local).stat().st_size), real(local, to)))
    now = [0.0]
    log = JsonlReporter(s3.url("runs/p/progress.jsonl"), flush_every=60, clock=lambda: now[0])
    for step in range(1200):                       # 20 minutes of steps, about 300 KiB of lines
        now[0] += 1.0
        log.on_step({"step": step, "pad": "x" * 200})
    log.close()
    assert max(uploads) <= (64 << 10) + 300 and len(uploads) <= 20 + 6
    assert len(OutputFolder(s3.url("runs/p")).progress_parts()) >= 4
    assert [e["step"] for e in read_run(s3.url("runs/p")).events] == list(range(1200))
