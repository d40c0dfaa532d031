"""Multi-field embeddings and the loss as the training loop computes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numeric import assert_rel_close
from open_clip.loss import ClipLoss, SigLipLoss

from kontrast.trainer.data.dataset import PairDataset, collate
from kontrast.trainer.data.transforms import image_normalization, normalize_images
from kontrast.trainer.data.examples import parse_examples
from kontrast.trainer.data.read import parse_table
from kontrast.trainer.distributed import World
from kontrast.trainer.model.fusion import FusedModel, fuse
from kontrast.trainer.model.build import build_model
from kontrast.trainer.precision import resolve_precision
from kontrast.trainer.step.train_step import train_step
from specs import params_of

FP32 = resolve_precision("fp32", "cpu")


def test_fuse_normalises_fields_then_the_weighted_sum():
    a = torch.tensor([[3.0, 0.0]])
    b = torch.tensor([[0.0, 0.5]])
    out = fuse(torch.stack([a, b], dim=1), torch.tensor([[0.75, 0.25]]))
    expected = F.normalize(torch.tensor([[0.75, 0.25]]), dim=-1)        # fields count by weight, not by norm
    assert_rel_close(out, expected)
    assert_rel_close(fuse(torch.stack([a, b], dim=1), torch.tensor([[1.0, 0.0]])), torch.tensor([[1.0, 0.0]]))


@pytest.fixture
def tiny(resolve_spec, base_spec):
    r = resolve_spec(base_spec)
    torch.manual_seed(0)
    return build_model(r, FP32)


def batch_for(bundle, text: str, spec, images: dict[str, tuple]) -> dict[str, torch.Tensor]:
    ex = parse_examples(parse_table("/tmp/x.csv", text), params_of(spec))
    ds = PairDataset(ex, bundle.preprocess_val, bundle.tokenizer, bundle.image_size,
                     image_loader=lambda loc: _img(images[loc]))
    return collate([ds[i] for i in range(len(ds))])


def _img(colour):
    from PIL import Image

    img = Image.new("RGB", (16, 16), colour)
    img.paste((255 - colour[0], colour[1], 255 - colour[2]), (0, 0, 8, 8))
    return img


IMAGES = {"/tmp/a.png": (200, 30, 30), "/tmp/b.png": (30, 200, 30), "/tmp/c.png": (30, 30, 200)}
ROWS = "q,c,image,title,w\nred mug,mugs,a.png,red mug,3\nblue lamp,,b.png,,1\ngreen box,boxes,c.png,green box,2\n"


def embed(fused, batch):
    fused.eval()
    with torch.no_grad():
        return fused(batch["left_tokens"], batch["left_weights"], batch["image"], batch["right_tokens"],
                     batch["right_weights"])


def spec_of(left_w, right_w):
    return {"leftKeys": ["q", "c"], "leftWeights": left_w, "rightKeys": ["image", "title"], "rightWeights": right_w,
            "weightKey": "w"}


def test_zero_weight_field_changes_nothing(tiny):
    with_fields = spec_of([1.0, 0.0], [0.6, 0.0])
    without = {"leftKeys": ["q"], "leftWeights": [1.0], "rightKeys": ["image"], "rightWeights": [0.6], "weightKey": "w"}
    b1 = batch_for(tiny, ROWS, with_fields, IMAGES)
    b2 = batch_for(tiny, ROWS, without, IMAGES)
    l1, r1, *_ = embed(FusedModel(tiny.model, [True, False], [True, False]), b1)
    l2, r2, *_ = embed(FusedModel(tiny.model, [True], [True]), b2)
    assert_rel_close(l1, l2)
    assert_rel_close(r1, r2)
    # the same zero field with non-zero weight does change the embeddings
    b3 = batch_for(tiny, ROWS, spec_of([1.0, 1.0], [0.6, 0.4]), IMAGES)
    l3, r3, *_ = embed(FusedModel(tiny.model, [True, True], [True, True]), b3)
    assert not torch.allclose(l3[0], l1[0]) and not torch.allclose(r3[0], r1[0])
    # ... except in the row where those fields are empty (weight 0 there, renormalised)
    assert_rel_close(l3[1], l1[1])
    assert_rel_close(r3[1], r1[1])


def test_one_pass_forward_equals_separate_encoders(tiny):
    batch = batch_for(tiny, ROWS, spec_of([1.0, 0.5], [0.6, 0.4]), IMAGES)
    fused = FusedModel(tiny.model, [True, True], [True, True]).eval()
    left, right, scale, bias = embed(fused, batch)
    with torch.no_grad():
        assert_rel_close(left, fused.encode_left(batch["left_tokens"], batch["left_weights"]))
        assert_rel_close(right, fused.encode_right(batch["image"], batch["right_tokens"], batch["right_weights"]))
        manual = F.normalize(0.6 * F.normalize(tiny.model.encode_image(normalize_images(batch["image"], *image_normalization(tiny.preprocess_val))), dim=-1)
                             + 0.4 * F.normalize(tiny.model.encode_text(batch["right_tokens"][:, 0]), dim=-1), dim=-1)
    assert_rel_close(right[0], manual[0])
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6) and bias is None


def _step_loss(fused, batch, kind="ce"):
    fused.train()
    fused.zero_grad()
    return float(train_step(fused, [batch], kind=kind, local_loss=False, precision=FP32, scaler=None, world=World()))


def test_training_loss_equals_open_clip_with_equal_weights(resolve_spec, base_spec):
    rows = "q,c,image,title,w\nred mug,x,a.png,red mug,2\nblue lamp,x,b.png,blue lamp,2\ngreen box,x,c.png,green box,2\n"
    for kind, reference in (("ce", ClipLoss()), ("siglip", SigLipLoss())):
        r = resolve_spec({**base_spec, "weightedLoss": kind})
        torch.manual_seed(0)
        bundle = build_model(r, FP32)
        batch = batch_for(bundle, rows, spec_of([1.0, 0.0], [0.5, 0.5]), IMAGES)
        fused = FusedModel(bundle.model, [True, False], [True, True])
        left, right, scale, bias = embed(fused, batch)
        ours = _step_loss(fused, batch, kind)
        args = (right, left, scale) if kind == "ce" else (right, left, scale, bias)
        assert ours == pytest.approx(float(reference(*args).detach()), rel=1e-5)


def test_row_weight_zero_removes_the_rows_term(tiny):
    weights = "q,c,image,title,w\nred mug,x,a.png,red mug,3\nblue lamp,x,b.png,blue lamp,0\ngreen box,x,c.png,green box,1\n"
    batch = batch_for(tiny, weights, spec_of([1.0, 0.0], [0.5, 0.5]), IMAGES)
    fused = FusedModel(tiny.model, [True, False], [True, True])
    left, right, scale, _ = embed(fused, batch)
    logits = scale * left @ right.T
    ce_lr = F.cross_entropy(logits, torch.arange(3), reduction="none")
    ce_rl = F.cross_entropy(logits.T, torch.arange(3), reduction="none")
    w = torch.tensor([3.0, 0.0, 1.0])
    expected = 0.5 * ((w * ce_lr).sum() + (w * ce_rl).sum()) / w.sum()   # row 1: no term, still a negative
    assert _step_loss(fused, batch) == pytest.approx(float(expected), rel=1e-5)
    # the row's weight does matter when it is not 0
    batch["weight"] = torch.tensor([3.0, 2.0, 1.0])
    assert _step_loss(fused, batch) != pytest.approx(float(expected), rel=1e-3)


def test_duplicate_queries_share_graded_targets(tiny):
    """Rows 0 and 1 are the same query with documents of weight 3 and 1 (the ranked ce of
    step/losses.py): row 0's grade-1 document stays a negative of its softmax, row 1's grade-3
    document is left out of row 1's; each document's target splits evenly over the two copies of
    its query."""
    rows = "q,c,image,title,w\nred mug,x,a.png,red mug,3\nred mug,x,b.png,blue lamp,1\ngreen box,x,c.png,green box,2\n"
    batch = batch_for(tiny, rows, spec_of([1.0, 0.0], [0.5, 0.5]), IMAGES)
    assert batch["left_id"].tolist() == [0, 0, 1]
    fused = FusedModel(tiny.model, [True, False], [True, True])
    left, right, scale, _ = embed(fused, batch)
    logits = scale * left @ right.T
    own = torch.eye(3)
    left_out = torch.tensor([[False, False, False], [True, False, False], [False, False, False]])
    to_queries = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    w = torch.tensor([3.0, 1.0, 2.0])
    ce_lr = -(own * F.log_softmax(logits.masked_fill(left_out, float("-inf")), dim=1)).nan_to_num().sum(1)
    ce_rl = -(to_queries * F.log_softmax(logits.T, dim=1)).sum(1)
    expected = 0.5 * ((w * ce_lr).sum() + (w * ce_rl).sum()) / w.sum()
    assert _step_loss(fused, batch) == pytest.approx(float(expected), rel=1e-5)


def test_frozen_right_keeps_document_embeddings(tiny):
    batch = batch_for(tiny, ROWS, spec_of([1.0, 0.0], [0.5, 0.5]), IMAGES)
    fused = FusedModel(tiny.model, [True, False], [True, True], frozen_right=True)
    left0, right0, *_ = embed(fused, batch)
    opt = torch.optim.SGD([p for p in tiny.model.parameters() if p.requires_grad], lr=1.0)
    _step_loss(fused, batch)
    opt.step()
    left1, right1, *_ = embed(fused, batch)
    assert_rel_close(right1, right0)
    assert not torch.allclose(left1, left0)
    assert not any(p.requires_grad for p in fused.right_clip.parameters()) and not fused.right_clip.training
