"""Floating-point comparisons scaled to the tensor, for every exactness test.

Why: float32 results of long reductions (matmuls, summed gradients) differ between CPUs by
summation order. An element-wise ``rtol`` with a tiny ``atol`` fails on one small element
of a large tensor (issue 9: 1.4e-6 off in an element of -9.8e-5, in a gradient whose largest
element is 50.7), while a real error (a missing micro-batch, a wrong 1/k factor, a row's
weight off by 10%) moves the whole tensor's norm by orders of magnitude more than rounding
does. So we compare ``||actual - expected|| / ||expected||`` against a tolerance, and every
exactness test also shows that a deliberately broken variant exceeds it.
"""

from __future__ import annotations

from typing import Mapping

import torch

#: Relative norm error allowed for float32 results that went through different summation
#: orders (accumulated vs full batch, several ranks vs one, another CPU's kernels). Rounding
#: gave at most 4.3e-6 on a 2-core Xeon; the deliberately broken variants give 2e-3 and more.
EXACT = 1e-4


def _as_tensor(x) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(x)).detach().double()


def rel_err(actual, expected, *, floor: float = 0.0) -> float:
    """``||actual - expected|| / max(||expected||, floor)`` in float64.

    ``floor`` sets the scale for an expected tensor that is (nearly) zero, e.g. a gradient
    that is exactly zero in theory, where any rounding noise would otherwise be "infinitely"
    wrong; pass a size that matters for the comparison (such as a fraction of the norm of
    all gradients together)."""
    a, e = _as_tensor(actual), _as_tensor(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    scale = max(float(torch.linalg.vector_norm(e)), floor)
    diff = float(torch.linalg.vector_norm(a - e))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_rel_close(actual, expected, rel: float = EXACT, *, floor: float = 0.0, msg: str = "") -> None:
    """Fail when the relative norm error exceeds ``rel``; the message gives the error found."""
    err = rel_err(actual, expected, floor=floor)
    assert err <= rel, f"{msg + ': ' if msg else ''}relative error {err:.3g} > {rel:.3g}"


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors together (e.g. the whole gradient)."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(_as_tensor(t)) for t in tensors.values()])))


def worst_rel_err(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                  *, floor_fraction: float = 1e-3) -> tuple[float, str]:
    """The largest per-tensor relative error over a dict of tensors, and its name.

    Each tensor is measured against its own norm, floored at ``floor_fraction`` of the
    global norm so that a (theoretically) zero gradient is judged on the whole gradient's
    scale, not on its own rounding noise."""
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    floor = floor_fraction * global_norm(expected)
    return max((rel_err(actual[k], expected[k], floor=floor), k) for k in expected)


def assert_all_rel_close(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                         rel: float = EXACT, *, floor_fraction: float = 1e-3, msg: str = "") -> None:
    """Every tensor of ``actual`` within ``rel`` of ``expected`` (see ``worst_rel_err``)."""
    err, name = worst_rel_err(actual, expected, floor_fraction=floor_fraction)
    assert err <= rel, f"{msg + ': ' if msg else ''}{name}: relative error {err:.3g} > {rel:.3g}"


def assert_detects(broken_err: float, rel: float = EXACT, margin: float = 100.0) -> None:
    """A deliberately broken variant must miss the tolerance by a wide ``margin``, so the
    test would catch a real error on any CPU, not just this one."""
    assert broken_err > margin * rel, f"broken variant is only {broken_err:.3g} off; tolerance {rel:.3g} is too loose"
