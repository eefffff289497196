"""What the hardware does fast: the one place that decides bfloat16 vs float32.

bfloat16 halves memory and is ~2x faster than float32 on GPUs and on CPUs with AMX or
AVX512-BF16 instructions. On other CPUs torch emulates it, and it is ~10x *slower*:
measured on a 2-core AVX2 machine of this workplace, a [4096, 576] x [576, 1536] matmul
on one thread ran at 58.6 GFLOPS in float32 and 6.1 GFLOPS in bfloat16. So "auto"
settings resolve through :func:`fast_bf16` instead of assuming bfloat16.
"""

from __future__ import annotations

import functools


@functools.cache
def fast_bf16(device: str = "cpu") -> bool:
    """True when bfloat16 matmuls are fast on ``device`` ("cpu", "cuda", "cuda:1", ...):
    any CUDA device, or a CPU with AMX tiles or AVX512-BF16 (torch's own probes)."""
    import torch

    if device.split(":")[0] == "cuda":
        return True
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_bf16(requested: bool | None, device: str = "cpu") -> bool:
    """``requested`` if given, else (None, "auto") :func:`fast_bf16` of ``device``."""
    return fast_bf16(device) if requested is None else bool(requested)


__all__ = ["fast_bf16", "resolve_bf16"]
