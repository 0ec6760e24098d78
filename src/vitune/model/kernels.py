"""The matrix-product kernel for decode steps: the faster of two, measured on this machine.

A decode step multiplies a few rows (one per sequence) by every weight matrix, so its speed is
that of reading the weights. How close a CPU kernel gets to that bound depends on the machine: on
the AMD EPYC this was written on, `F.linear` (MKL) read a 32000 x 1536 head at 16.6 GB/s for one
row and under 5 GB/s for 4-8 rows, where oneDNN's linear read it at 25.3 and 12. On other CPUs MKL
is the faster. So the choice is measured, once per process for each (rows, weight shape), on the
real weight, and oneDNN is taken only when it is faster and gives the same numbers (to fp32
rounding). Larger products (prefill, training) and anything needing gradients stay on `F.linear`.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import statistics
import time

import torch
import torch.nn.functional as F

MAX_ROWS = 16  # beyond this a product is compute-bound and MKL's blocking is at least as good
_REPEATS = 5
# Taking oneDNN must pay for the indirection: a choice within noise keeps the default.
_MIN_GAIN = 1.1

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_chosen: dict[tuple, Linear] = {}


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def _has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _seconds(fn: Callable[[], object]) -> float:
    fn()
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _choose(rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    try:
        with torch.inference_mode():
            same = torch.allclose(_onednn(x, weight, bias), F.linear(x, weight, bias), rtol=1e-4, atol=1e-5)
            if not same:
                return F.linear
            fast = _seconds(lambda: _onednn(x, weight, bias))
            default = _seconds(lambda: F.linear(x, weight, bias))
    except RuntimeError:  # a torch build whose oneDNN lacks the op for this shape
        return F.linear
    return _onednn if default > _MIN_GAIN * fast else F.linear


def _kernel(rows: int, weight: torch.Tensor, bias: torch.Tensor | None, x_dtype: torch.dtype) -> Linear:
    key = (rows, weight.shape, bias is not None, weight.dtype, x_dtype, weight.device, torch.get_num_threads())
    fn = _chosen.get(key)
    if fn is None:
        cpu32 = weight.device.type == "cpu" and weight.dtype == x_dtype == torch.float32
        fn = _chosen[key] = _choose(rows, weight, bias) if cpu32 and _has_onednn() else F.linear
    return fn


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` by the kernel measured fastest for this many rows and this shape."""
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return _kernel(rows, weight, bias, x.dtype)(x, weight, bias)


def linear_for(rows: int, weights: list[tuple[torch.Tensor, torch.Tensor | None]], dtype: torch.dtype) -> Linear:
    """The linear to use for products of `rows` rows with these (weight, bias) pairs: plain
    `F.linear` when it is the fastest for all of them (no per-call dispatch), else `decode_linear`."""
    if rows > MAX_ROWS or torch.is_grad_enabled():
        return F.linear
    if all(_kernel(rows, w, b, dtype) is F.linear for w, b in weights):
        return F.linear
    return decode_linear


def choices() -> dict[str, str]:
    """What was chosen so far, for reports: "rows x out x in" -> kernel name."""
    return {f"{r} x {s[0]} x {s[1]}{' +bias' if b else ''} ({t} threads)": ("onednn" if fn is _onednn else "default")
            for (r, s, b, _, _, _, t), fn in _chosen.items()}
