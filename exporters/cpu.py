"""What this CPU can execute: the feature flags kernels dispatch on (int8 schemes, channel blocks, the report)."""
from __future__ import annotations

from pathlib import Path

# Instruction-set extensions int8 and float kernels dispatch on (as /proc/cpuinfo spells them).
ISA_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
             "asimd", "asimddp", "i8mm", "sve", "sve2")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, ARM `Features`); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()
