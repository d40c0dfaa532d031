"""Locks: which parameters one AdamW step changes, LayerNorm freezing, BN stats, param groups."""

import pytest
import torch
from open_clip.utils import FrozenBatchNorm2d

from scale.helpers import tiny_clip, tiny_resnet_clip

from kontrast.trainer.model.locks import apply_locks, param_groups
from kontrast.trainer.step.losses import weighted_contrastive_loss
from specs import params_of


def one_step(model, image_size=16):
    """One AdamW step (weight decay on) on random data; names of the parameters that moved."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, wd=0.1), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, image_size, image_size, generator=g)
    texts = torch.randint(1, 64, (4, 8), generator=g)
    out = model(images, texts)
    loss = weighted_contrastive_loss(out["text_features"], out["image_features"], torch.ones(4), out["logit_scale"])
    loss.backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def names(model, pred):
    return {n for n, _ in model.named_parameters() if pred(n)}


def is_visual(n):
    return n.startswith("visual.")


def is_text(n, custom=False):
    return n.startswith("text.") if custom else not (is_visual(n) or n.startswith("logit_"))


def is_ln(n):
    return ".ln_" in n or n.startswith("ln_") or ".ln_final" in n


def test_no_lock_trains_everything():
    model = tiny_clip()
    assert one_step(model) == names(model, lambda n: True)


@pytest.mark.parametrize("groups,unlocked", [
    (0, set()),
    (1, {"visual.proj"}),
    (2, {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"} | {"visual.transformer.resblocks.1"}),
])
def test_lock_image_leaves_last_groups_trainable(groups, unlocked):
    model = tiny_clip()
    apply_locks(model, params_of({"lockImage": True, "lockImageUnlockedGroups": groups}))
    changed = one_step(model)
    visual_changed = {n for n in changed if is_visual(n)}
    expect = {n for n in names(model, is_visual)
              if n in unlocked or any(n.startswith(u + ".") for u in unlocked)}
    assert visual_changed == expect
    assert names(model, lambda n: not is_visual(n)) <= changed  # text tower and logit scale train


def test_open_clip_builtin_text_lock_crashes_without_freezing_layer_norm():
    """open_clip 3.3.0 bug: lockText with lockTextFreezeLayerNorm=false (the default) asserts."""
    for custom in (False, True):
        with pytest.raises(AssertionError, match="LayerNorm"):
            tiny_clip(custom_text=custom).lock_text_tower(unlocked_layers=0, freeze_layer_norm=False)


@pytest.mark.parametrize("custom", [False, True], ids=["clip", "custom_text"])
@pytest.mark.parametrize("freeze_ln", [True, False], ids=["freeze_ln", "train_ln"])
@pytest.mark.parametrize("layers", [0, 1, 2, 4])
def test_lock_text_both_layer_norm_values(custom, freeze_ln, layers):
    model = tiny_clip(custom_text=custom)
    apply_locks(model, params_of({"lockText": True, "lockTextUnlockedLayers": layers, "lockTextFreezeLayerNorm": freeze_ln}))
    changed = one_step(model)
    text = names(model, lambda n: is_text(n, custom))
    prefix = "text." if custom else ""
    # open_clip's groups: [embeddings], block 0, [block 1 + ln_final], [projection].
    groups = [
        {n for n in text if "token_embedding" in n or "positional_embedding" in n},
        {n for n in text if ".resblocks.0." in n},
        {n for n in text if ".resblocks.1." in n or "ln_final" in n},
        {prefix + "text_projection"},
    ]
    assert set().union(*groups) == text
    unlocked = set().union(*groups[len(groups) - layers:]) if layers else set()
    layer_norms = {n for n in text if is_ln(n)}
    expect = unlocked if freeze_ln else unlocked | layer_norms
    assert {n for n in changed if n in text} == expect
    assert names(model, lambda n: not is_text(n, custom)) <= changed  # image tower and logit scale train
    if freeze_ln:
        # Same trainable set as open_clip's own lock where it works.
        ref = tiny_clip(custom_text=custom)
        ref.lock_text_tower(unlocked_layers=layers, freeze_layer_norm=True)
        assert {n for n, p in ref.named_parameters() if p.requires_grad} == \
               {n for n, p in model.named_parameters() if p.requires_grad}


def test_lock_both_towers_trains_only_logit_scale():
    model = tiny_clip()
    apply_locks(model, params_of({"lockImage": True, "lockText": True, "lockTextFreezeLayerNorm": True}))
    assert one_step(model) == {"logit_scale"}


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_lock_image_freeze_bn_stats(freeze_bn):
    model = tiny_resnet_clip()
    apply_locks(model, params_of({"lockImage": True, "lockImageFreezeBnStats": freeze_bn}))
    bns = [m for m in model.visual.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert bns and all(isinstance(m, FrozenBatchNorm2d) == freeze_bn for m in bns)
    stats = {n: b.clone() for n, b in model.visual.named_buffers() if "running_mean" in n}
    model.train()
    changed = one_step(model, image_size=32)
    assert not any(is_visual(n) for n in changed)  # locked either way
    moved = [n for n, b in model.visual.named_buffers() if "running_mean" in n and not torch.equal(b, stats[n])]
    assert (moved == []) == freeze_bn


def test_resnet_unlocked_groups_is_a_clear_error():
    with pytest.raises(ValueError, match="ModifiedResNet"):
        apply_locks(tiny_resnet_clip(), params_of({"lockImage": True, "lockImageUnlockedGroups": 1}))


def test_param_groups_decay_rules_and_frozen_params_left_out():
    model = tiny_clip(init_logit_bias=-10.0)
    apply_locks(model, params_of({"lockImage": True, "lockImageUnlockedGroups": 1}))
    groups = param_groups(model, wd=0.2)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay = {by_id[id(p)] for g in groups if g["weight_decay"] == 0.2 for p in g["params"]}
    no_decay = {by_id[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert not decay & no_decay
    assert decay | no_decay == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(is_visual(n) for n in decay | no_decay if n != "visual.proj")
    assert {"logit_scale", "logit_bias", "ln_final.weight", "ln_final.bias",
            "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.0.attn.in_proj_bias",
            "transformer.resblocks.0.mlp.c_fc.bias"} <= no_decay
    assert {"visual.proj", "text_projection", "token_embedding.weight", "positional_embedding",
            "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_fc.weight"} <= decay
    assert all(model.get_parameter(n).ndim >= 2 for n in decay)
