"""The machine line every benchmark prints: CPU model, family/model, the SIMD that matters, cores."""

from __future__ import annotations

import os
import platform
import subprocess


def describe_cpu() -> str:
    """E.g. 'AMD EPYC (family 25 model 17, AVX-512/VNNI+BF16), 2 CPUs' (lscpu, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    fields = {
        k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)
    }
    flags = set(fields.get("Flags", "").split())
    if "avx512_vnni" in flags:
        isa = "AVX-512/VNNI" + ("+BF16" if "avx512_bf16" in flags else "")
    else:
        isa = "AVX2" if "avx2" in flags else "no AVX2"
    name = fields.get("Model name", platform.machine())
    family, model = fields.get("CPU family", "?"), fields.get("Model", "?")
    return f"{name} (family {family} model {model}, {isa}), {os.cpu_count()} CPUs"
