"""dynamicBatchSize's probe on the real model (the CUDA memory check is injected: no GPU here)."""

import torch

from scale.helpers import tiny_resnet_clip

from kontrast.trainer.step.micro_batch import param_bytes, probe_micro_batch


def test_probe_runs_real_steps_and_leaves_the_model_and_rng_as_they_were():
    model = tiny_resnet_clip()  # BatchNorm: a probe in train mode would move its statistics
    model.train()
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(24, 3, 32, 32, generator=g), torch.randint(1, 64, (24, 8), generator=g)
    seen = []

    def forward_rows(m):
        pick = torch.arange(m) % 24
        out = model(images[pick], texts[pick])
        return out["text_features"], out["image_features"], out["logit_scale"]

    def fits_factory(step, device, reserve):
        seen.append(("reserve", reserve))

        def fits(m):
            step(m)  # the real forward + backward
            seen.append(m)
            assert all(p.grad is None for p in model.parameters())  # gradients released after each probe
            return m <= 20

        return fits

    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    micro = probe_micro_batch(48, forward_rows, model, torch.device("cpu"), optimizer_bytes=1000, world_size=2,
                              fits_factory=fits_factory)
    assert micro == 16  # the largest divisor of 48 that fits 20
    probes = [m for m in seen if not isinstance(m, tuple)]
    assert probes[:3] == [48, 24, 12] and 16 in probes
    trainable = param_bytes(p for p in model.parameters() if p.requires_grad)
    assert seen[0] == ("reserve", 1000 + 4 * 6 * 96 * 96 + trainable)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)
