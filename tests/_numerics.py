"""Tolerances derived from floating-point error bounds, for comparisons that are not bitwise.

Two engines (the simulator and gloo, or gloo's zero-copy and copying paths) run the same
arithmetic except the order in which an all-reduce sums the M workers' values: the simulator
sums ``((x_0 + x_1) + x_2) + ...``, gloo's ring starts each chunk at another rank, and another
CPU's kernels may group the terms differently again. The rules used here:

* One mean of M values of unit roundoff u (``2**-24`` in fp32), summed in any order, is within
  ``gamma_{M-1} * sum_i |x_i|`` of the exact sum (Higham, *Accuracy and Stability of Numerical
  Algorithms*, eq. 4.4), with ``gamma_n = n u / (1 - n u)``; dividing by M adds at most one more
  rounding (none when M is a power of two). So two orders differ by at most
  :func:`mean_reorder_bound` ``(M) * max_i |x_i|`` per element and per all-reduce.
* Over a training run the differences injected at ``rounds`` all-reduces are carried forward by
  the inner steps. In a *well-conditioned* run (no division by a quantity comparable to the
  injected differences) each is amplified by at most a bounded factor ``gain``, so the final
  tensors differ by at most ``gain * rounds * mean_reorder_bound(M) * scale``, with ``scale`` the
  largest magnitude of the compared tensor (:func:`reorder_tolerance`).

A run that is ill-conditioned (ADOPT's ``g / max(sqrt(v), eps)`` with v = 0 after a state reset and
``|g|`` near ``eps``) does not satisfy the second rule; the workloads are chosen so that it
holds, and ``tests/test_simulator.py::test_workload_is_well_conditioned_under_any_summation_order``
checks it for every workload in the simulator.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of n roundings in a row."""
    u = UNIT_ROUNDOFF[dtype]
    assert n * u < 1, (n, dtype)
    return n * u / (1 - n * u)


def mean_reorder_bound(world_size: int, dtype: torch.dtype = torch.float32) -> float:
    """Bound on |mean in order A - mean in order B| / max_i |x_i| for one mean of M values.

    Each order's sum is within gamma_{M-1} sum|x_i| <= gamma_{M-1} M max|x_i| of the exact sum;
    after the division by M (at most one rounding, of relative size u) each mean is within
    (gamma_{M-1} + u) max|x_i| (to first order) of the exact mean, and the two orders differ
    by at most twice that.
    """
    exact_division = world_size & (world_size - 1) == 0
    return 2 * (gamma(world_size - 1, dtype) + (0.0 if exact_division else UNIT_ROUNDOFF[dtype]))


def reorder_tolerance(reference: torch.Tensor, world_size: int, rounds: int, gain: float) -> float:
    """Absolute tolerance for two runs that differ only in the summation order of ``rounds``
    M-term means, each difference amplified at most ``gain``-fold: ``gain * rounds *
    mean_reorder_bound(M) * max|reference|`` (0 for an all-zero reference: then both must be 0)."""
    scale = reference.detach().abs().max().item() if reference.numel() else 0.0
    return gain * rounds * mean_reorder_bound(world_size, reference.dtype) * scale


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: float | torch.Tensor, what: str) -> float:
    """Assert ``|actual - expected| <= tol`` elementwise (``tol`` a number or a broadcastable
    tensor; same shapes); returns the largest ``|diff| / tol`` (0 where both are equal)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(diff)
    bad = ~(diff <= tol)  # NaN fails
    assert not bad.any(), (f"{what}: max |diff| {diff.max().item():.3e} exceeds the error bound "
                           f"(at the worst element |diff| {diff[bad].max().item():.3e} > {tol[bad][diff[bad].argmax()].item():.3e})")
    return (diff / tol).nan_to_num(0.0, posinf=0.0).max().item() if diff.numel() else 0.0
