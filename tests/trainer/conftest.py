"""Fixtures for the trainer tests: tiny models, tiny data, TrainJobs built through the CRD.

TrainJobs are defaulted and validated by ``kontrast.api`` (the CRD's own schema), so these
tests never re-type a default of the parameter table.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from kontrast.api import apply_defaults, validate
from kontrast.trainer.data.example_data import generate

#: ~0.9M parameters, most of them the default tokenizer's 49408-token embedding.
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def write_csv(path: Path, rows: list[list[Any]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def write_image(path: Path, colour=(200, 30, 30), size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_json(tmp_path_factory) -> Path:
    """A tiny ViT config; its name has "vit" in it, like the example's."""
    path = tmp_path_factory.mktemp("models") / "tiny-test-vit.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="session")
def example_data(tmp_path_factory) -> Path:
    """The synthetic product-search data set (generated once per test session)."""
    return generate(tmp_path_factory.mktemp("example") / "data")


@pytest.fixture(scope="session")
def small_data(example_data, tmp_path_factory) -> Path:
    """64- and 32-row train files and a 40-row eval file taken from the example data set (relative image paths)."""
    folder = tmp_path_factory.mktemp("small")
    for name, n in (("train.csv", 64), ("train32.csv", 32), ("eval.csv", 40)):
        with open(example_data / name.replace("32", ""), newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:n + 1]
        for _, img, _, _ in body:   # 16-pixel copies: the tiny model's size, quick to decode
            if not (folder / img).exists():
                (folder / img).parent.mkdir(parents=True, exist_ok=True)
                Image.open(example_data / img).resize((16, 16)).save(folder / img)
        write_csv(folder / name, [header] + body)
    return folder


@pytest.fixture(scope="session")
def hf_model_json(tmp_path_factory) -> Path:
    """A tiny BERT text tower (built offline) in an open_clip model config JSON."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("hf")
    bert = folder / "bert"
    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=32).save_pretrained(bert)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "red blue green striped mug ball lamp box".split()
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"hf_model_name": "bert", "hf_tokenizer_name": "bert", "hf_proj_type": "linear",
                        "hf_pooler_type": "mean_pooler", "context_length": 8}}
    path = folder / "tiny-hf-bert.json"     # hf folders relative to the JSON's folder
    path.write_text(json.dumps(cfg))
    return path


def trainjob(spec: dict[str, Any], name: str = "t", annotations: dict | None = None) -> dict[str, Any]:
    """A defaulted TrainJob object; fails the test if the CRD rejects it."""
    obj = {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
           "metadata": {"name": name, **({"annotations": annotations} if annotations else {})},
           "spec": copy.deepcopy(spec)}
    obj = apply_defaults(obj)
    problems = validate(obj)
    assert not problems, problems
    return obj


@pytest.fixture
def base_spec(tiny_model_json, small_data, tmp_path) -> dict[str, Any]:
    """A fast, valid spec for the tiny model and the small data (override what a test needs)."""
    return {
        "model": str(tiny_model_json),
        "trainData": str(small_data / "train.csv"),
        "evalData": str(small_data / "eval.csv"),
        "output": str(tmp_path / "out"),
        "leftKeys": ["query"], "leftWeights": [1.0],
        "rightKeys": ["image", "title"], "rightWeights": [0.5, 0.5],
        "weightKey": "score",
        "batchSize": 16, "epochs": 2, "warmup": 2, "lr": 1.0e-3,
        "contextLength": 8, "gradCheckpointing": False, "precision": "fp32", "workers": 0,
    }


@pytest.fixture
def resolve_spec(tmp_path) -> Callable[..., Any]:
    """spec dict -> Resolved (through the CRD defaults and the trainer's resolution)."""
    from kontrast.trainer.spec import resolve

    def _resolve(spec: dict[str, Any], **kw):
        obj = trainjob(spec, **kw)
        path = tmp_path / "trainjob.yaml"
        path.write_text(yaml.safe_dump(obj))
        return resolve(obj, path)

    return _resolve


@pytest.fixture
def run_training(resolve_spec) -> Callable[..., Any]:
    """Train a spec in-process; returns (summary, resolved)."""
    from kontrast.trainer.run.train import train

    def _run(spec: dict[str, Any], reporters=(), **kw):
        resolved = resolve_spec(spec)
        return train(resolved, device="cpu", reporters=reporters, **kw), resolved

    return _run


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def state_close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k].float().numpy(), b[k].float().numpy(), atol=0, rtol=0)
                                        for k in a)


@pytest.fixture(scope="session")
def h():
    """Helper functions (conftest modules are not importable by name under importlib mode)."""
    import types

    return types.SimpleNamespace(write_csv=write_csv, write_image=write_image, trainjob=trainjob,
                                 read_jsonl=read_jsonl, state_close=state_close, TINY=TINY)
