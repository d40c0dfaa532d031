"""Resolution of model-dependent defaults and of paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from kontrast.trainer.errors import SpecError
from kontrast.trainer.locations import join_location, resolve_location
from kontrast.trainer.params import adam_defaults
from kontrast.trainer.spec import resolve


@pytest.mark.parametrize("model, expected", [
    ("ViT-B-32", (0.98, 1e-6)), ("roberta-ViT-B-32", (0.98, 1e-6)), ("hf-hub:org/vit-thing", (0.98, 1e-6)),
    ("RN50", (0.999, 1e-8)), ("convnext_base", (0.999, 1e-8)),
    ("models/tiny-vit.json", (0.98, 1e-6)), ("/vit-configs/rn-tiny.json", (0.999, 1e-8)),
])
def test_adam_defaults_follow_the_vit_rule(model, expected):
    assert adam_defaults(model) == expected


def test_resolved_betas_and_paths(h, tmp_path, monkeypatch):
    monkeypatch.setenv("KONTRAST_PVC_ROOT", "/mnt/pvcs")
    spec = {"model": "RN50", "trainData": "data/train.csv", "evalData": "pvc://claim/eval/e.csv",
            "output": "s3://bucket/runs/x", "pretrained": "openai", "leftKeys": ["q"], "leftWeights": [1],
            "rightKeys": ["i"], "rightWeights": [1], "weightKey": "w"}
    r = resolve(h.trainjob(spec), tmp_path / "jobs" / "tj.yaml").params
    assert (r.beta2, r.eps) == (0.999, 1e-8)
    assert r.train_data == str(tmp_path / "jobs" / "data" / "train.csv")
    assert r.eval_data == "/mnt/pvcs/claim/eval/e.csv"
    assert r.output == "s3://bucket/runs/x"
    assert r.pretrained == "openai" and r.pretrained_is_tag
    r = resolve(h.trainjob({**spec, "model": "ViT-B-32", "beta2": 0.9, "pretrained": "ckpt/epoch_3.pt"}),
                tmp_path / "tj.yaml", output="elsewhere").params
    assert (r.beta2, r.eps) == (0.9, 1e-6)                   # set beta2 wins; eps from the vit rule
    assert r.pretrained == str(tmp_path / "ckpt" / "epoch_3.pt") and not r.pretrained_is_tag
    assert r.output == str(Path.cwd() / "elsewhere")


def test_the_cache_folder_resolves_like_the_other_paths(h, tmp_path, monkeypatch):
    monkeypatch.setenv("KONTRAST_PVC_ROOT", "/mnt/pvcs")
    spec = {"model": "RN50", "trainData": "t.csv", "output": "o", "leftKeys": ["q"], "leftWeights": [1],
            "rightKeys": ["i"], "rightWeights": [1], "weightKey": "w"}
    job = tmp_path / "jobs" / "tj.yaml"
    assert resolve(h.trainjob({**spec, "data": {"cache": "cache"}}), job).params.data.cache == str(
        tmp_path / "jobs" / "cache")
    r = resolve(h.trainjob({**spec, "data": {"cache": "pvc://scratch/kontrast"}}), job).params
    assert r.data.cache == "/mnt/pvcs/scratch/kontrast" and r.data.on_bad_image == "fail"
    assert resolve(h.trainjob(spec), job).params.data.cache is None       # $KONTRAST_CACHE decides
    with pytest.raises(SpecError, match=r"spec.data.cache.*node-local folder"):
        resolve(h.trainjob({**spec, "data": {"cache": "s3://b/cache"}}), job)


def test_locations():
    base = Path("/jobs")
    assert resolve_location("file:///x/y.csv", base) == "/x/y.csv"
    assert resolve_location("https://h/p.csv", base) == "https://h/p.csv"
    assert resolve_location("/abs.csv", base) == "/abs.csv"
    with pytest.raises(ValueError, match="claim"):
        resolve_location("pvc://", base)
    assert join_location("gs://b/dir", "/img/a.png") == "gs://b/img/a.png"


def test_logit_scale_must_be_positive(h, tmp_path):
    spec = {"model": "RN50", "trainData": "t.csv", "output": "o", "leftKeys": ["q"], "leftWeights": [1],
            "rightKeys": ["i"], "rightWeights": [1], "weightKey": "w", "logitScale": 0}
    with pytest.raises(SpecError, match="spec.logitScale"):
        resolve(h.trainjob(spec), tmp_path / "tj.yaml")


@pytest.mark.parametrize("dims", [[64, 128], [64, 64], [128, 64, 64]])
def test_matryoshka_dims_must_be_strictly_descending(h, tmp_path, dims):
    spec = {"model": "RN50", "trainData": "t.csv", "output": "o", "leftKeys": ["q"], "leftWeights": [1],
            "rightKeys": ["i"], "rightWeights": [1], "weightKey": "w"}
    assert resolve(h.trainjob({**spec, "matryoshkaDims": [256, 128, 64]}), tmp_path / "tj.yaml").params \
        .matryoshka_dims == (256, 128, 64)
    with pytest.raises(SpecError, match=r"spec.matryoshkaDims: must be strictly descending"):
        resolve(h.trainjob({**spec, "matryoshkaDims": dims}), tmp_path / "tj.yaml")


def test_every_crd_spec_property_has_a_params_field_and_no_more():
    """A field added to crds/trainjob.yaml needs its typed field in kontrast.trainer.params."""
    from kontrast.api import spec_schema
    from kontrast.trainer.params import field_name, field_names

    crd = {field_name(key): key for key in spec_schema()["properties"]}
    assert sorted(crd.keys() - field_names()) == [], "CRD spec properties without a Params field"
    assert sorted(field_names() - crd.keys()) == [], "Params fields that are not CRD spec properties"


def test_params_are_typed_frozen_and_take_the_crd_defaults(h, tmp_path):
    import dataclasses

    from kontrast.api import spec_schema

    spec = {"model": "RN50", "trainData": "t.csv", "output": "o", "leftKeys": ["q", "c"], "leftWeights": [1, 2],
            "rightKeys": ["i"], "rightWeights": [1], "weightKey": "w", "forceQuickGELU": True}
    p = resolve(h.trainjob(spec), tmp_path / "tj.yaml").params
    props = spec_schema()["properties"]
    assert p.batch_size == props["batchSize"]["default"] and p.lr_scheduler == props["lrScheduler"]["default"]
    assert p.left_keys == ("q", "c") and p.left_weights == (1, 2) and p.force_quick_gelu is True
    assert p.grad_clip_norm is None and p.epochs_cooldown is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.lr = 1.0
