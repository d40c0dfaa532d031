"""The exported model folder: open_clip loads it as is, with the run's preprocessing and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kontrast.cli import main as cli_main
from kontrast.trainer.ship.export import CONFIG_KEY, checkpoint_name, chosen_checkpoint, export_checkpoint
from kontrast.trainer.model.build import build_model
from kontrast.trainer.precision import resolve_precision


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float()))


def trained_model(resolved, checkpoint: str):
    """The run's own model (built as training built it) with the checkpoint's weights."""
    bundle = build_model(resolved, resolve_precision("fp32", "cpu"), "cpu")
    state = torch.load(checkpoint, weights_only=True)
    bundle.model.load_state_dict(state["state_dict"])
    return bundle


def unpadded(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens without the all-padding (0) columns at the end: a training tokenizer may pad an HF
    tower's input wider than open_clip's, which the attention mask makes no difference to."""
    used = int((tokens != 0).any(dim=0).nonzero().max()) + 1
    return tokens[:, :used]


def assert_same_embeddings(bundle, folder: Path, image_path: Path, texts: list[str]) -> None:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval(), bundle.model.eval()
    image = Image.open(image_path).convert("RGB")
    ours_pixels = bundle.preprocess_val(image).unsqueeze(0)
    their_pixels = preprocess(image).unsqueeze(0)
    assert rel_err(their_pixels, ours_pixels) < 1e-6          # same size, mean, std, interpolation
    ours_tokens, their_tokens = bundle.tokenizer(texts), tokenizer(texts)
    assert torch.equal(unpadded(their_tokens), unpadded(ours_tokens))   # same tokenizer and truncation
    with torch.no_grad():
        assert rel_err(model.encode_image(their_pixels), bundle.model.encode_image(ours_pixels)) < 1e-5
        assert rel_err(model.encode_text(their_tokens), bundle.model.encode_text(ours_tokens)) < 1e-5
    theirs = model.state_dict()
    assert theirs.keys() == bundle.model.state_dict().keys()


def assert_no_pickles(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    assert "open_clip_model.safetensors" in names and "open_clip_config.json" in names and "README.md" in names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt"))], names
    load_file(folder / "open_clip_model.safetensors")           # no pickle involved at all
    json.loads((folder / "open_clip_config.json").read_text())


VARIANTS = {
    # a custom ViT config with its own normalisation, QuickGELU and a short context
    "vit": {"imageMean": [0.5, 0.4, 0.3], "imageStd": [0.2, 0.25, 0.3], "forceQuickGELU": True},
    # SigLIP-style: the model gains a logit bias, built only when the config says so
    "siglip": {"weightedLoss": "siglip", "forceCustomText": True},
}


def train_and_export(run_training, spec: dict, out: Path):
    """Train one epoch without evaluation and export the checkpoint with the CLI; returns
    (checkpoint, resolved, the exported open_clip_config.json)."""
    spec = {**spec, "epochs": 1}
    spec.pop("evalData")
    summary, resolved = run_training(spec)
    checkpoint = summary["checkpoints"][-1]["uri"]
    assert cli_main(["export", checkpoint, str(out)]) == 0
    assert_no_pickles(out)
    return checkpoint, resolved, json.loads((out / "open_clip_config.json").read_text())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_loads_in_open_clip_with_the_runs_preprocessing(variant, run_training, base_spec, small_data,
                                                              tmp_path):
    out = tmp_path / "exported"
    checkpoint, resolved, cfg = train_and_export(run_training, {**base_spec, **VARIANTS[variant]}, out)
    image = small_data / "images" / sorted(p.name for p in (small_data / "images").iterdir())[0]
    assert_same_embeddings(trained_model(resolved, checkpoint), out, image, ["red striped mug", "blue ball"])
    assert cfg["model_cfg"]["text_cfg"]["context_length"] == 8
    if "imageMean" in VARIANTS[variant]:
        assert cfg["preprocess_cfg"]["mean"] == pytest.approx(VARIANTS[variant]["imageMean"])
    if variant == "siglip":
        model = open_clip.create_model(f"local-dir:{out}")
        trained_bias = torch.load(checkpoint, weights_only=True)["state_dict"]["logit_bias"]
        assert model.logit_bias is not None and torch.equal(model.logit_bias, trained_bias)
        assert trained_bias.item() != -10.0                       # the trained value, not the init


def test_export_of_an_hf_text_tower_carries_its_tokenizer(run_training, base_spec, hf_model_json, small_data,
                                                          tmp_path):
    out = tmp_path / "exported"
    spec = {**base_spec, "model": str(hf_model_json), "poolingMethod": "cls"}
    checkpoint, resolved, cfg = train_and_export(run_training, spec, out)
    assert (out / "vocab.txt").exists() and (out / "tokenizer_config.json").exists()
    assert cfg["model_cfg"]["text_cfg"]["hf_pooler_type"] == "cls_pooler"
    image = next((small_data / "images").iterdir())
    assert_same_embeddings(trained_model(resolved, checkpoint), out, image, ["red striped mug", "blue ball"])


def test_export_of_a_pretrained_tower_keeps_its_positions(run_training, base_spec, small_data, tmp_path):
    """Fine-tuning a pretrained model with a shorter contextLength caps the tokens, never the
    positional embedding: the export must keep the tower's full length, or open_clip would
    interpolate the embedding on load."""
    start, _, _ = train_and_export(run_training, base_spec, tmp_path / "start")
    out = tmp_path / "exported"
    spec = {**base_spec, "pretrained": start, "contextLength": 4, "output": str(tmp_path / "tuned")}
    checkpoint, resolved, cfg = train_and_export(run_training, spec, out)
    assert cfg["model_cfg"]["text_cfg"]["context_length"] == 8 and cfg["preprocess_cfg"]["context_length"] == 4
    assert "fed at most 4 tokens" in (out / "README.md").read_text()
    image = next((small_data / "images").iterdir())
    assert_same_embeddings(trained_model(resolved, checkpoint), out, image, ["red mug", "blue ball"])


def test_a_finished_run_exports_its_best_model_with_a_card(run_training, base_spec):
    summary, resolved = run_training({**base_spec, "epochs": 3, "evalEvery": 1, "saveFrequency": 3})
    folder = Path(resolved.params.output) / "model"
    assert summary["outputs"]["model"] == str(folder)
    assert_no_pickles(folder)
    card = (folder / "README.md").read_text()
    for needle in ("tiny-test-vit", "| train |", "| 64 |", "| right | title | 0.5 |", "| before | 0 |",
                   "| epoch | 1 |", "| after | 3 |", "ndcg@10", "| batchSize | 16 |", "local-dir:", "upload_folder",
                   '"type": "open_clip"'):
        assert needle in card, needle
    best = summary["best"]["uri"]
    # The checkpoint is named within the output, not by a path on the machine that trained.
    assert f"Exported from `checkpoints/{Path(best).name}`" in card
    assert chosen_checkpoint(summary) == best
    exported = load_file(folder / "open_clip_model.safetensors")
    chosen = torch.load(best, weights_only=True)
    assert exported.keys() == chosen["state_dict"].keys()
    assert all(torch.equal(exported[k], chosen["state_dict"][k]) for k in exported)
    assert chosen[CONFIG_KEY]["model_cfg"]["embed_dim"] == 16
    remote = f"memory://{folder}/remote"                              # an object store (fsspec)
    export_checkpoint(best, remote)
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(remote[len("memory://"):], detail=False)) == sorted(
        p.name for p in folder.iterdir())


def test_a_matryoshka_run_reports_each_width_and_its_card_names_them(run_training, base_spec):
    """matryoshkaDims [8, 4] on the 16-d tiny model: every evaluation has the width keys, the
    widths' metrics are those of the cut embeddings (not copies of the full ones), and the card
    says which widths were trained."""
    summary, resolved = run_training({**base_spec, "matryoshkaDims": [8, 4], "saveFrequency": 2})
    after = summary["eval"]["after"]
    for width in (8, 4):
        assert {f"ndcg@10@dim{width}", f"ndcg_exp@10@dim{width}", f"recall@10@dim{width}"} <= after.keys()
        assert 0.0 < after[f"ndcg@10@dim{width}"] <= 1.0
    assert "ndcg@10@dim4" in summary["eval"]["before"]
    assert len({after["ndcg@10"], after["ndcg@10@dim8"], after["ndcg@10@dim4"]}) > 1
    card = (Path(resolved.params.output) / "model" / "README.md").read_text()
    assert "Matryoshka widths 8, 4 besides the full 16" in card


def test_the_card_names_the_checkpoint_within_the_output_or_by_its_uri():
    assert checkpoint_name("/data/run/out/checkpoints/epoch_2.pt", "/data/run/out") == "checkpoints/epoch_2.pt"
    assert checkpoint_name("s3://b/out/checkpoints/epoch_2.pt", "s3://b/out") == "s3://b/out/checkpoints/epoch_2.pt"
    assert checkpoint_name("/elsewhere/epoch_2.pt", "/data/run/out") == "epoch_2.pt"
    assert checkpoint_name("/elsewhere/epoch_2.pt", None) == "epoch_2.pt"


def test_the_best_checkpoint_is_exported_when_evaluation_names_one():
    saved = [{"uri": f"/o/checkpoints/epoch_{i}.pt", "epoch": i} for i in (1, 2, 3)]
    assert chosen_checkpoint({"checkpoints": saved}) == "/o/checkpoints/epoch_3.pt"
    assert chosen_checkpoint({"checkpoints": {"saved": saved, "best": saved[0]}}) == "/o/checkpoints/epoch_1.pt"
    assert chosen_checkpoint({"checkpoints": {"saved": saved, "latest": saved[1]}}) == "/o/checkpoints/epoch_2.pt"
    assert chosen_checkpoint({"checkpoints": saved, "best": saved[1]}) == "/o/checkpoints/epoch_2.pt"
    assert chosen_checkpoint({"checkpoints": []}) is None


def test_export_refuses_a_checkpoint_without_config(tmp_path, capsys):
    path = tmp_path / "checkpoints" / "epoch_1.pt"
    path.parent.mkdir()
    torch.save({"epoch": 1, "state_dict": {}}, path)
    assert cli_main(["export", str(path), str(tmp_path / "out")]) == 1
    assert "open_clip_config" in capsys.readouterr().err
