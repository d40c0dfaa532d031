"""Checkpoints: atomic, newest complete one wins, loadable by open_clip."""

from __future__ import annotations

import os

import open_clip
import pytest
import torch

from kontrast.trainer.run import checkpoint as ckpt
from kontrast.trainer import storage
from kontrast.trainer.errors import PermanentError


def test_save_is_atomic_and_listing_ignores_partial_files(tmp_path, monkeypatch):
    out = str(tmp_path)
    first = ckpt.save_resumable(out, {"epoch": 1, "step": 5, "state_dict": {"w": torch.ones(2)}})
    assert first == str(tmp_path / "checkpoints" / "step_5.pt")

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_resumable(out, {"epoch": 1, "step": 5, "state_dict": {}})
    with pytest.raises(OSError):
        ckpt.save_resumable(out, {"epoch": 2, "step": 10, "state_dict": {}})
    monkeypatch.undo()
    assert os.listdir(tmp_path / "checkpoints") == ["step_5.pt"]          # no temp file left, old one intact
    assert ckpt.load_checkpoint_file(first)["step"] == 5


def test_resume_picks_newest_loadable_resumable_checkpoint(tmp_path, caplog):
    out = str(tmp_path)
    assert ckpt.load_latest(out) is None
    for step in (3, 6, 30):
        ckpt.save_resumable(out, {"epoch": step // 3, "step": step, "state_dict": {"w": torch.zeros(1)}})
    ckpt.save_model(out, {"epoch": 11, "step": 33, "state_dict": {"w": torch.zeros(1)}})   # model only: never resumed
    state, location = ckpt.load_latest(out)
    assert state["step"] == 30 and location.endswith("step_30.pt")      # numeric, not lexical, order
    (tmp_path / "checkpoints" / "step_31.pt").write_bytes(b"damaged")
    (tmp_path / "checkpoints" / ".step_32.pt.abc.tmp").write_bytes(b"partial")
    state, location = ckpt.load_latest(out)
    assert state["step"] == 30 and "skipping checkpoint" in caplog.text and "step_31.pt" in caplog.text


def test_retention_keeps_the_newest_resumable_checkpoints_and_every_model_file(tmp_path):
    out = str(tmp_path)
    for step in (2, 4, 6, 8):
        ckpt.save_resumable(out, {"epoch": 0, "step": step, "state_dict": {}})
        ckpt.save_model(out, {"epoch": step // 2, "step": step, "state_dict": {}})
    deleted = ckpt.prune(out, keep=2)
    assert sorted(os.path.basename(d) for d in deleted) == ["step_2.pt", "step_4.pt"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_4.pt",
                                                            "step_6.pt", "step_8.pt"]
    assert ckpt.prune(out, keep=2) == []


def test_run_identity_refuses_another_runs_checkpoint():
    spec = {"model": "ViT-B-32", "trainData": "d.csv", "lr": 1e-3, "workers": 1, "output": "/a"}
    mine = ckpt.run_identity("job", "uid-1", spec, global_batch=64)
    # What may change on resume: output, workers, the per-process split of the global batch.
    ckpt.check_identity(ckpt.run_identity("job", "uid-1", {**spec, "workers": 4, "output": "/b"}, 64), mine, "x")
    ckpt.check_identity(ckpt.run_identity("other-name", None, spec, 64), mine, "x")   # a local run: no uid
    with pytest.raises(PermanentError, match=r"another run: TrainJob 'job' \(uid uid-2.*this run is TrainJob 'job' "
                                             r"\(uid uid-1"):
        ckpt.check_identity(ckpt.run_identity("job", "uid-2", spec, 64), mine, "x")
    with pytest.raises(PermanentError, match="training inputs"):
        ckpt.check_identity(ckpt.run_identity("job", "uid-1", {**spec, "lr": 2e-3}, 64), mine, "x")
    with pytest.raises(PermanentError):
        ckpt.check_identity(ckpt.run_identity("job", "uid-1", spec, 32), mine, "x")


def test_matryoshka_dims_enter_the_identity_only_when_set(monkeypatch):
    """A field added later leaves the identity of runs that never set it as it was (their
    checkpoints still resume), and changes it when set."""
    spec = {"model": "ViT-B-32", "trainData": "d.csv", "lr": 1e-3}
    now = ckpt.inputs_hash(spec, 64)
    monkeypatch.setattr(ckpt, "IDENTITY_FIELDS_WHEN_SET", ())
    assert ckpt.inputs_hash(spec, 64) == now
    monkeypatch.undo()
    mine = ckpt.run_identity("job", "uid-1", spec, 64)
    with pytest.raises(PermanentError, match="training inputs"):
        ckpt.check_identity(ckpt.run_identity("job", "uid-1", {**spec, "matryoshkaDims": [256, 64]}, 64), mine, "x")


@pytest.mark.parametrize("change", [{"queryIdKey": "qid"}, {"docIdKey": "sku"}, {"data": {"onBadImage": "skip"}},
                                    {"data": {"onBadImage": "skip", "maxBadFraction": 0.2}}])
def test_run_identity_covers_the_id_columns_and_the_bad_image_policy(change):
    """They decide the in-batch positives and the rows trained on: a resume with another one is refused."""
    spec = {"model": "ViT-B-32", "trainData": "d.csv", "lr": 1e-3, "data": {"onBadImage": "skip", "maxBadFraction": 0.1}}
    mine = ckpt.run_identity("job", "uid-1", spec, 64)
    with pytest.raises(PermanentError, match="training inputs"):
        ckpt.check_identity(ckpt.run_identity("job", "uid-1", {**spec, **change}, 64), mine, "x")


def test_a_checkpoint_of_the_version_1_identity_still_resumes():
    """Written before the identity covered the id columns: compared as it was hashed then."""
    spec = {"model": "ViT-B-32", "trainData": "d.csv", "lr": 1e-3, "queryIdKey": "qid"}
    old = {"name": "job", "uid": "uid-1", "inputs": ckpt.inputs_hash(spec, 64, version=1)}
    ckpt.check_identity(old, ckpt.run_identity("job", "uid-1", spec, 64), "x")
    with pytest.raises(PermanentError, match="training inputs"):
        ckpt.check_identity(old, ckpt.run_identity("job", "uid-1", {**spec, "lr": 2e-3}, 64), "x")


def test_storage_writes_through_fsspec_urls(tmp_path):
    url = f"memory://{tmp_path}/remote"
    ckpt.save_resumable(url, {"epoch": 3, "step": 1, "state_dict": {}})
    assert ckpt.load_latest(url)[0]["epoch"] == 3
    storage.write_text("memory://x/y/summary.json", "{}")
    assert storage.exists("memory://x/y/summary.json") and storage.list_names("memory://x/y") == ["summary.json"]
    storage.delete("memory://x/y/summary.json")
    storage.delete("memory://x/y/summary.json")                        # gone already: fine
    assert not storage.exists("memory://x/y/summary.json")


def test_open_clip_loads_a_training_checkpoint(run_training, base_spec):
    spec = {**base_spec, "epochs": 1, "forceCustomText": True, "weightedLoss": "siglip"}
    spec.pop("evalData")
    summary, resolved = run_training(spec)
    path = summary["checkpoints"][-1]["uri"]
    state = torch.load(path, weights_only=True)
    assert path.endswith("epoch_1.pt") and {"epoch", "step", "state_dict"} <= state.keys() and state["epoch"] == 1
    assert "optimizer" not in state                                      # model only
    resumable = torch.load(summary["checkpoints"][-2]["uri"], weights_only=True)
    assert summary["checkpoints"][-2]["uri"].endswith("step_4.pt") and "optimizer" in resumable
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-test-vit", pretrained=path, force_custom_text=True, force_context_length=8, init_logit_bias=-10)
    loaded = model.state_dict()
    assert loaded.keys() == state["state_dict"].keys()
    for k, v in state["state_dict"].items():
        assert torch.equal(loaded[k], v), k
    assert loaded["logit_bias"].item() != -10.0          # the trained value, not the init
    tokens = open_clip.get_tokenizer("tiny-test-vit", context_length=8)(["red mug"])
    assert torch.isfinite(model.encode_text(tokens)).all()
