"""frozenRight: the right side comes from a frozen copy of the starting model, so an index
built with the starting model stays valid while the query path trains."""

import torch

from scale.helpers import tiny_clip

from kontrast.trainer.model.locks import param_groups
from kontrast.trainer.step.losses import weighted_contrastive_loss
from kontrast.trainer.step.accumulation import contrastive_step
from kontrast.trainer.model.fusion import frozen_copy


def test_frozen_right_trains_queries_against_the_starting_models_documents():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 16, 16, generator=g)
    texts = torch.randint(1, 64, (16, 8), generator=g)
    model = tiny_clip()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = frozen_copy(model)
    with torch.no_grad():
        index = frozen.encode_image(images, normalize=True)  # the existing index
    assert all(not p.requires_grad for p in frozen.parameters()) and not frozen.training

    def forward(mb):
        with torch.no_grad():
            right = frozen.encode_image(images[mb], normalize=True)
        return {"left": model.encode_text(texts[mb], normalize=True), "right": right,
                "weights": torch.ones(mb.stop - mb.start), "logit_scale": model.logit_scale.exp()}

    def loss_now():
        with torch.no_grad():
            return weighted_contrastive_loss(model.encode_text(texts, normalize=True), index, torch.ones(16),
                                             model.logit_scale.exp()).item()

    before = loss_now()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3)
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        contrastive_step(forward, [slice(0, 8), slice(8, 16)])
        opt.step()
    # The right side is bit-for-bit the starting model's: the index needs no re-embedding.
    with torch.no_grad():
        assert torch.equal(frozen.encode_image(images, normalize=True), index)
    assert all(torch.equal(p, start[n]) for n, p in frozen.named_parameters())
    # Only the query path moved; the live image tower got no gradient at all.
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert moved and not any(n.startswith("visual.") for n in moved)
    assert all(p.grad is None for p in model.visual.parameters())
    # And the fine-tuned queries retrieve the old documents better.
    assert loss_now() < before - 0.1
