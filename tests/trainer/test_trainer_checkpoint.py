"""Checkpoints: atomic, newest complete one wins, loadable by open_clip."""

from __future__ import annotations

import os

import open_clip
import pytest
import torch

from kontrast.trainer import checkpoint as ckpt
from kontrast.trainer import storage


def test_save_is_atomic_and_listing_ignores_partial_files(tmp_path, monkeypatch):
    out = str(tmp_path)
    first = ckpt.save_checkpoint(out, {"epoch": 1, "step": 5, "state_dict": {"w": torch.ones(2)}})
    assert first == str(tmp_path / "checkpoints" / "epoch_1.pt")

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(out, {"epoch": 1, "step": 9, "state_dict": {}})
    with pytest.raises(OSError):
        ckpt.save_checkpoint(out, {"epoch": 2, "step": 10, "state_dict": {}})
    monkeypatch.undo()
    assert os.listdir(tmp_path / "checkpoints") == ["epoch_1.pt"]          # no temp file left, old one intact
    assert ckpt.load_checkpoint_file(first)["step"] == 5


def test_resume_picks_newest_loadable_checkpoint(tmp_path, caplog):
    out = str(tmp_path)
    assert ckpt.load_latest(out) is None
    for epoch in (1, 2, 10):
        ckpt.save_checkpoint(out, {"epoch": epoch, "step": epoch * 3, "state_dict": {"w": torch.zeros(1)}})
    state, location = ckpt.load_latest(out)
    assert state["epoch"] == 10 and location.endswith("epoch_10.pt")      # numeric, not lexical, order
    (tmp_path / "checkpoints" / "epoch_11.pt").write_bytes(b"damaged")
    (tmp_path / "checkpoints" / ".epoch_12.pt.abc.tmp").write_bytes(b"partial")
    state, location = ckpt.load_latest(out)
    assert state["epoch"] == 10 and "skipping checkpoint" in caplog.text and "epoch_11.pt" in caplog.text


def test_storage_writes_through_fsspec_urls(tmp_path):
    url = f"memory://{tmp_path}/remote"
    ckpt.save_checkpoint(url, {"epoch": 3, "step": 1, "state_dict": {}})
    assert ckpt.load_latest(url)[0]["epoch"] == 3
    storage.write_text("memory://x/y/summary.json", "{}")
    assert storage.exists("memory://x/y/summary.json") and storage.list_names("memory://x/y") == ["summary.json"]


def test_open_clip_loads_a_training_checkpoint(run_training, base_spec):
    spec = {**base_spec, "epochs": 1, "forceCustomText": True, "weightedLoss": "siglip"}
    spec.pop("evalData")
    summary, resolved = run_training(spec)
    path = summary["checkpoints"][-1]["uri"]
    state = torch.load(path, weights_only=True)
    assert {"epoch", "step", "state_dict", "optimizer"} <= state.keys() and state["epoch"] == 1
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-test-vit", pretrained=path, force_custom_text=True, force_context_length=8, init_logit_bias=-10)
    loaded = model.state_dict()
    assert loaded.keys() == state["state_dict"].keys()
    for k, v in state["state_dict"].items():
        assert torch.equal(loaded[k], v), k
    assert loaded["logit_bias"].item() != -10.0          # the trained value, not the init
    tokens = open_clip.get_tokenizer("tiny-test-vit", context_length=8)(["red mug"])
    assert torch.isfinite(model.encode_text(tokens)).all()
