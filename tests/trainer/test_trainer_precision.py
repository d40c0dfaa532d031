"""Pure bf16/fp16 weights lose small updates: the warning fires exactly when AdamW cannot move them."""

from __future__ import annotations

import pytest
import torch

from kontrast.trainer.precision import lost_update_share, lost_update_warning, resolve_precision


def changed_share(dtype, lr, steps=100):
    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 25).to(dtype)      # 1000 weights, |w| up to ~0.16
    before = layer.weight.detach().clone()
    opt = torch.optim.AdamW([layer.weight], lr=lr, weight_decay=0.0, eps=1e-6)
    for _ in range(steps):
        opt.zero_grad()
        layer(torch.randn(8, 40, dtype=dtype)).square().mean().backward()
        opt.step()
    return float((layer.weight != before).float().mean()), layer.weight


def test_warning_matches_updates_lost_in_real_bf16_adamw():
    p = resolve_precision("bf16", "cpu")
    moved, weight = changed_share(torch.bfloat16, 5e-6)
    assert moved < 0.2                                      # most weights never move
    assert lost_update_share(5e-6, [weight], torch.bfloat16) > 0.8
    assert "amp_bf16" in lost_update_warning(p, 5e-6, [weight])
    moved, weight = changed_share(torch.bfloat16, 1e-3)
    assert moved > 0.9
    assert lost_update_warning(p, 1e-3, [weight]) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lr", [1e-7, 1e-6, 1e-5, 1e-4])
def test_predicted_share_is_the_share_a_step_of_lr_cannot_change(dtype, lr):
    w = (torch.randn(10000, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    stuck = float(((w + torch.tensor(lr, dtype=dtype)) == w).float().mean())
    assert lost_update_share(lr, [w], dtype) == pytest.approx(stuck, abs=0.02)


def test_no_warning_for_fp32_weights():
    w = torch.nn.Linear(4, 4).weight
    assert lost_update_warning(resolve_precision("amp_bf16", "cpu"), 1e-9, [w]) is None
