"""Model parameters: each one changes the built model the way the table says."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import open_clip
import pytest
import torch
from numeric import assert_all_rel_close

from kontrast.trainer.errors import SpecError
from kontrast.trainer.model.build import build_model
from kontrast.trainer.model.text import MaskedMaxPooler
from kontrast.trainer.precision import resolve_precision
from specs import params_of


@pytest.fixture
def build(resolve_spec, base_spec):
    def _build(**overrides):
        r = resolve_spec({**base_spec, **overrides})
        torch.manual_seed(0)
        return build_model(r, resolve_precision(r.params.precision, "cpu"))
    return _build


def _text_tokens(bundle, *texts):
    return bundle.tokenizer(list(texts) or ["red striped mug"])


def test_model_config_json_is_registered_under_its_stem(build, tiny_model_json):
    b = build()
    assert b.name == "tiny-test-vit" and type(b.model) is open_clip.CLIP
    assert open_clip.get_model_config("tiny-test-vit")["embed_dim"] == 16
    assert b.info["logitScale"] == pytest.approx(1 / 0.07, rel=1e-6) and b.info["logitBias"] is None


def test_context_length_sets_tokenizer_and_positions(build):
    for n in (8, 12):
        b = build(contextLength=n)
        assert _text_tokens(b).shape == (1, n)
        assert b.model.positional_embedding.shape[0] == n


def test_force_custom_text(build):
    plain, custom = build(), build(forceCustomText=True)
    assert type(plain.model) is open_clip.CLIP and "token_embedding.weight" in plain.model.state_dict()
    assert type(custom.model) is open_clip.CustomTextCLIP and "text.token_embedding.weight" in custom.model.state_dict()


def test_force_quick_gelu(build):
    def count(m):
        return sum(isinstance(x, open_clip.model.QuickGELU) for x in m.modules())
    assert count(build().model) == 0
    assert count(build(forceQuickGELU=True).model) > 0


def test_force_patch_dropout_drops_patches_in_training_only(build):
    image = torch.randn(2, 3, 16, 16)
    for prob, varies in ((None, False), (0.5, True)):
        m = build(**({"forcePatchDropout": prob} if prob is not None else {})).model.train()
        a, b = m.encode_image(image), m.encode_image(image)
        assert (not torch.allclose(a, b)) == varies
        m.eval()
        assert torch.allclose(m.encode_image(image), m.encode_image(image))
    assert build(forcePatchDropout=0.5).model.visual.patch_dropout.prob == 0.5


def test_image_mean_and_std_change_the_transforms(build):
    from PIL import Image

    img = Image.new("RGB", (16, 16), (128, 64, 32))
    default, custom = build(), build(imageMean=[0.5, 0.5, 0.5], imageStd=[0.25, 0.5, 1.0])
    norm = [t for t in custom.preprocess_val.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(norm.mean) == (0.5, 0.5, 0.5) and tuple(norm.std) == (0.25, 0.5, 1.0)
    x = custom.preprocess_val(img)
    assert x[0, 0, 0].item() == pytest.approx((128 / 255 - 0.5) / 0.25, abs=1e-5)
    assert not torch.allclose(default.preprocess_val(img), x)
    assert not torch.allclose(default.preprocess_train(img), custom.preprocess_train(img))


def test_logit_scale_and_bias_initialisation(build):
    b = build(logitScale=20.0)
    assert b.model.logit_scale.exp().item() == pytest.approx(20.0) and b.model.logit_bias is None
    s = build(weightedLoss="siglip")
    assert s.model.logit_scale.exp().item() == pytest.approx(10.0) and s.model.logit_bias.item() == -10.0
    assert s.model.logit_bias.requires_grad and (s.info["logitScale"], s.info["logitBias"]) == pytest.approx((10, -10))
    s = build(weightedLoss="siglip", logitScale=5.0, logitBias=-3.0)
    assert s.model.logit_scale.exp().item() == pytest.approx(5.0) and s.model.logit_bias.item() == -3.0
    ce = build(logitBias=-2.0)  # ce cannot use a bias: it exists but is frozen
    assert ce.model.logit_bias.item() == -2.0 and not ce.model.logit_bias.requires_grad


def test_matryoshka_dims_are_checked_against_the_embedding_width(build):
    """The tiny model embeds in 16 dimensions: widths below it build, 16 itself fails naming the field."""
    assert build(matryoshkaDims=[8, 4]).model.visual.output_dim == 16
    with pytest.raises(SpecError, match=r"spec.matryoshkaDims: .*embedding width 16"):
        build(matryoshkaDims=[16, 8])


def test_pretrained_values_win_unless_set(build, tmp_path):
    model = build().model
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    path = tmp_path / "start.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)
    kept = build(pretrained=str(path))
    assert kept.model.logit_scale.exp().item() == pytest.approx(50.0)
    assert torch.equal(kept.model.token_embedding.weight, model.token_embedding.weight)
    assert build(pretrained=str(path), logitScale=7.0).model.logit_scale.exp().item() == pytest.approx(7.0)
    # siglip from a checkpoint without a bias: -10 as documented (open_clip itself would insert 0)
    assert build(pretrained=str(path), weightedLoss="siglip").model.logit_bias.item() == -10.0


def test_grad_checkpointing_recomputes_blocks_with_equal_gradients(build):
    image, text = torch.randn(2, 3, 16, 16), None
    grads, calls = {}, {}
    for flag in (False, True):
        b = build(gradCheckpointing=flag)
        m = b.model.train()
        text = _text_tokens(b, "red mug", "blue lamp")
        block = m.transformer.resblocks[0]
        assert m.transformer.grad_checkpointing == flag and m.visual.transformer.grad_checkpointing == flag
        n = {"calls": 0}
        block.register_forward_pre_hook(lambda *_: n.__setitem__("calls", n["calls"] + 1))
        loss = (m.encode_image(image) * m.encode_text(text)).sum()
        loss.backward()
        grads[flag] = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        calls[flag] = n["calls"]
    assert calls == {False: 1, True: 2}   # the block's forward runs again in the backward pass
    assert_all_rel_close(grads[True], grads[False])


def test_precision_values():
    table = {
        ("amp", "cpu"): ("fp32", torch.bfloat16, False), ("amp", "cuda"): ("fp32", torch.float16, True),
        ("amp_bf16", "cpu"): ("fp32", torch.bfloat16, False), ("amp_bfloat16", "cuda"): ("fp32", torch.bfloat16, False),
        ("bf16", "cpu"): ("bf16", None, False), ("fp16", "cuda"): ("fp16", None, False),
        ("fp32", "cpu"): ("fp32", None, False),
    }
    for (name, dev), (weights, autocast, scaler) in table.items():
        p = resolve_precision(name, dev)
        assert (p.model_precision, p.autocast_dtype, p.grad_scaler) == (weights, autocast, scaler), name


@pytest.mark.parametrize("precision, weight_dtype, out_dtype", [
    ("fp32", torch.float32, torch.float32), ("amp", torch.float32, torch.bfloat16),
    ("amp_bf16", torch.float32, torch.bfloat16), ("amp_bfloat16", torch.float32, torch.bfloat16),
    ("bf16", torch.bfloat16, torch.bfloat16), ("fp16", torch.float16, torch.float16),
])
def test_each_precision_runs_on_cpu(build, precision, weight_dtype, out_dtype):
    b = build(precision=precision, eps=1e-6)
    p = resolve_precision(precision, "cpu")
    assert b.model.visual.conv1.weight.dtype == weight_dtype
    assert b.model.logit_scale.dtype == torch.float32        # kept in fp32 by open_clip's casting
    image = torch.randn(2, 3, 16, 16).to(p.input_dtype or torch.float32)
    with p.autocast():
        out = b.model.encode_image(image)
    assert out.dtype == out_dtype and torch.isfinite(out.float()).all()


# ------------------------------------------------------------------------------------------------
# Hugging Face text towers: poolingMethod

def test_pooling_method_selects_the_hf_pooler(build, hf_model_json):
    outputs = {}
    for method, cls in (("mean", "MeanPooler"), ("cls", "ClsPooler"), ("max", "MaskedMaxPooler"),
                        ("cls_last_hidden_state", "ClsLastHiddenStatePooler")):
        b = build(model=str(hf_model_json), poolingMethod=method)
        assert b.hf_text and type(b.model.text.pooler).__name__ == cls and b.info["poolingMethod"] == method
        tokens = _text_tokens(b, "red striped mug", "blue ball")
        assert tokens[1].tolist()[-1] == 0                      # padded: pooling must ignore it
        outputs[method] = b.model.eval().encode_text(tokens)
    for a in outputs:
        for c in outputs:
            if a < c:
                assert not torch.allclose(outputs[a], outputs[c]), (a, c)
    assert build(model=str(hf_model_json)).info["poolingMethod"] == "mean"   # the model's own default


def test_pooling_method_is_ignored_for_builtin_text_towers(build, caplog):
    b = build(poolingMethod="max")
    assert b.info["poolingMethod"] is None and not b.hf_text
    assert "poolingMethod=max is ignored" in caplog.text


def test_max_pooler_is_correct_where_open_clips_is_broken():
    hidden = torch.tensor([[[1.0, -5.0], [3.0, -1.0], [9.0, 9.0]],      # last token is padding
                           [[-2.0, 0.0], [-7.0, 4.0], [-1.0, -3.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])                         # HFTextEncoder passes a long mask
    out = SimpleNamespace(last_hidden_state=hidden)
    expected = torch.tensor([[3.0, -1.0], [-1.0, 4.0]])
    assert torch.equal(MaskedMaxPooler()(out, mask), expected)
    broken = open_clip.hf_model.MaxPooler()
    with pytest.raises(RuntimeError):
        broken(out, mask)                                               # long mask: crashes
    wrong = broken(out, mask.bool())                                    # bool mask: max over padding
    assert torch.equal(wrong[0], torch.tensor([9.0, 9.0])) and not torch.equal(wrong, expected)


@pytest.mark.parametrize("unlocked", [0, 1])
@pytest.mark.parametrize("freeze_ln", [True, False])
def test_lock_text_on_an_hf_tower(build, hf_model_json, unlocked, freeze_ln):
    """open_clip 3.3.0's HFTextEncoder.lock raises KeyError for BERT with unlocked layers; ours
    freezes the embeddings and all but the last `unlocked` layers, LayerNorms as asked."""
    from kontrast.trainer.model.locks import apply_locks

    model = build(model=str(hf_model_json)).model
    apply_locks(model, params_of({"lockText": True, "lockTextUnlockedLayers": unlocked,
                        "lockTextFreezeLayerNorm": freeze_ln}))
    bert = model.text.transformer
    for name, p in bert.embeddings.named_parameters():
        assert p.requires_grad == ("LayerNorm" in name and not freeze_ln), name
    for name, p in bert.encoder.layer[0].named_parameters():
        assert p.requires_grad == (unlocked == 1 or ("LayerNorm" in name and not freeze_ln)), name
    assert all(p.requires_grad for p in model.text.proj.parameters())
    assert all(p.requires_grad for p in model.visual.parameters())


#: A SigLIP-like tiny tower: 16 positions, no causal mask, last-token pooling, projection bias.
SIGLIP_LIKE = {
    "embed_dim": 16, "init_logit_bias": -10,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1,
                 "no_causal_mask": True, "pool_type": "last", "proj_bias": True},
}


def test_pretrained_text_tower_is_never_resized(build, tmp_path):
    """The default contextLength (77) on a pretrained 16-position tower: the starting model is
    open_clip's own, token for token, and its checkpoint reloads at 16 positions."""
    config = tmp_path / "tiny-sl-tower.json"
    config.write_text(json.dumps(SIGLIP_LIKE))
    open_clip.add_model_config(config)
    torch.manual_seed(3)
    original = open_clip.create_model("tiny-sl-tower")
    weights = tmp_path / "pretrained.pt"
    torch.save(original.state_dict(), weights)

    b = build(model=str(config), pretrained=str(weights), weightedLoss="siglip", contextLength=77)
    assert b.model.positional_embedding.shape[0] == 16
    assert b.info["contextLength"] == 16 and "exceeds" in b.info["warnings"][0]
    texts = ["red striped ceramic mug with a handle and a long title that runs past sixteen tokens", "lamp"]
    ours = b.model.eval().encode_text(b.tokenizer(texts), normalize=True)
    ref_model = open_clip.create_model("tiny-sl-tower", pretrained=str(weights)).eval()
    ref = ref_model.encode_text(open_clip.get_tokenizer("tiny-sl-tower")(texts), normalize=True)
    assert torch.linalg.vector_norm(ours - ref) / torch.linalg.vector_norm(ref) < 1e-6

    saved = tmp_path / "ours.pt"
    torch.save({"state_dict": b.model.state_dict()}, saved)
    reloaded = open_clip.create_model("tiny-sl-tower", pretrained=str(saved)).eval()
    assert reloaded.positional_embedding.shape[0] == 16
    again = reloaded.encode_text(open_clip.get_tokenizer("tiny-sl-tower")(texts), normalize=True)
    assert torch.linalg.vector_norm(again - ref) / torch.linalg.vector_norm(ref) < 1e-6


def test_context_length_caps_the_tokens_fed_to_a_pretrained_tower(build, tmp_path):
    config = tmp_path / "tiny-sl-tower.json"
    config.write_text(json.dumps(SIGLIP_LIKE))
    open_clip.add_model_config(config)
    weights = tmp_path / "pretrained.pt"
    torch.save(open_clip.create_model("tiny-sl-tower").state_dict(), weights)
    b = build(model=str(config), pretrained=str(weights), contextLength=8)
    assert b.model.positional_embedding.shape[0] == 16      # the tower keeps its 16 positions
    tokens = _text_tokens(b, "red striped ceramic mug with a handle and a long title")
    assert tokens.shape == (1, 16) and (tokens[0, 8:] == 0).all() and (tokens[0, :8] != 0).all()
    assert b.info["contextLength"] == 8 and not b.info["warnings"]
    assert b.model.encode_text(tokens).shape == (1, 16)


def test_pretrained_url_cache_is_keyed_by_the_whole_url_and_downloaded_once(tmp_path, monkeypatch):
    import threading

    import fsspec

    from kontrast.trainer.model import sources as model_module

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket-a/model.pt", b"A" * 1000)
    fs.pipe("/bucket-b/model.pt", b"B" * 1000)
    opened = []
    real_open = fsspec.open

    def counting_open(url, *args, **kwargs):
        opened.append(url)
        return real_open(url, *args, **kwargs)

    monkeypatch.setattr(fsspec, "open", counting_open)
    cache = tmp_path / "cache"
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        model_module.cached_download("memory://bucket-a/model.pt", cache))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert opened == ["memory://bucket-a/model.pt"]          # one download for four processes
    assert len(set(results)) == 1 and results[0].read_bytes() == b"A" * 1000
    other = model_module.cached_download("memory://bucket-b/model.pt", cache)
    assert other != results[0] and other.read_bytes() == b"B" * 1000
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]   # no temporary file left
