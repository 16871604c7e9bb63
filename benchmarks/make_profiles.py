#!/usr/bin/env python
"""Write the shipped profiles for hardware this project's machines do not have.

* ``h200``: one machine with an NVIDIA H200 and 16 CPU cores, from the measured figures
  in ``benchmarks/inputs/h200-rig.json`` (Llama-2-7B shapes, bf16, random weights; see
  that folder's README): the dense layer curve is the measured 32-layer step divided by
  32, the roofline is fitted to it, GPU attention (single-tier) is fitted to the measured
  decode attention, CPU attention to the 16-thread SDPA figure; the data plane is the
  host's loopback plus the measured PCIe copies.
* ``t4``: a cloud VM with one NVIDIA T4, from public figures stated below (no
  measurement): 65 TFLOPS fp16 tensor peak and 320 GB/s, of which a roofline takes 40%
  and 70%; 16 GB of memory; the attention workers are 8-vCPU VMs (attention at the
  4-thread figures of the H200 rig's CPU, scaled to 8 threads), 10 Gbit/s between VMs.
  Prices are typical on-demand list prices of such VMs and are inputs, not facts.

``vm-2core`` is measured, not written here: ``benchmarks/bench_planner.py
--profile-out glinthawk_dask/planner/profiles/vm-2core.json``.

Usage::

    python benchmarks/make_profiles.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glinthawk_dask.model.config import ModelConfig  # noqa: E402
from glinthawk_dask.planner.profile import AttentionCost, _layer_params, attention_work  # noqa: E402

OUT = ROOT / "glinthawk_dask" / "planner" / "profiles"
INPUTS = ROOT / "benchmarks" / "inputs"
GiB = 2**30


def h200() -> dict:
    rig = json.loads((INPUTS / "h200-rig.json").read_text())
    m = ModelConfig.from_name("llama-2-7b")
    layers = m.n_layers
    points = sorted([int(t), v["step_s"] / layers] for t, v in rig["dense_7b"].items())
    params = _layer_params(m)
    mem_gbps = params * 2 / points[0][1] / 1e9  # one token: bound by reading the bf16 weights
    tflops = max(2 * params * t / s / 1e12 for t, s in points)
    gpu_attn = []
    for shape, v in rig["gpu_attn"].items():
        b, ctx = (int(x) for x in shape.split("x"))
        gpu_attn.append((*attention_work(m, b * ctx, b * ctx, 2), v["s"]))  # decode: one query a sequence
    gpu = AttentionCost.fit(gpu_attn)
    cpu = rig["cpu"]["attn_t16_bfloat16_B32_S1024_kvh32"]  # Llama-2-7B is MHA: 32 KV heads
    xfer = rig["xfer"]["1024"]
    pcie_gbps = xfer["bytes"] / xfer["d2h_s"] / 1e9
    return {
        "glinthawk_profile": 1, "name": "h200",
        "source": ("measured on one machine with an NVIDIA H200 (139 GiB), 16 CPU cores and 128 GiB on 2026-11-26 "
                   "(benchmarks/inputs/h200-rig.json, Llama-2-7B shapes, bf16, random weights); roofline fitted to "
                   "the dense steps; GPU attention fitted to the decode-attention points (to their KV read: decode "
                   "shapes alone cannot split it from FLOPs); CPU attention from the 16-thread SDPA figure (32 KV "
                   "heads, bf16); data plane: loopback (stated 100 us, 5 GB/s) and "
                   f"the measured PCIe copies ({pcie_gbps:.0f} GB/s); the tiers share the host's CPU, not the GPU"),
        "model": dataclasses.asdict(m),
        "dense": {
            "device": "cuda", "dtype": "bfloat16", "threads": None,
            "layer_s": points, "head_s": None, "step_s": 3e-4, "step_per_seq_s": 3e-6, "cold_factor": 1.0,
            "roofline": {"tflops": round(tflops, 1), "mem_GBps": round(mem_gbps, 1), "overhead_s": 0.0},
            "attention": gpu.to_json(), "kv_bytes": None, "memory_bytes": 139 * GiB, "workspace_bytes": 8 * GiB,
            "price_per_hour": None,
        },
        "attention": {"overhead_s": 1e-4, "kv_GBps": round(cpu["sdpa_GBps"], 1), "gflops": None, "threads": 16,
                      "kv_bytes": 96 * GiB, "price_per_hour": None},
        "network": {"rtt_s": 1e-4, "GBps": round(min(5.0, pcie_gbps), 1), "msg_cpu_s": 3e-5, "msg_cpu_GBps": 10.0},
        "host": {"shared": False, "dense_slowdown": 1.0, "attention_slowdown": 1.0},
    }


def t4() -> dict:
    rig = json.loads((INPUTS / "h200-rig.json").read_text())
    cpu4 = rig["cpu"]["attn_t4_float32_B32_S1024_kvh8"]  # GQA, like Llama-2-70B
    return {
        "glinthawk_profile": 1, "name": "t4",
        "source": ("stated, not measured: a cloud VM with one NVIDIA T4 (public figures: 65 TFLOPS fp16 tensor peak, "
                   "320 GB/s GDDR6, 16 GB), roofline at 40% of peak FLOPS and 70% of peak bandwidth, 15 GB usable "
                   "of which 1 GB is kept as workspace; GPU attention at 70% of the bandwidth; attention workers are "
                   "8-vCPU VMs with 64 GB (48 GiB of KV), attention at twice the 4-thread GQA SDPA figure of the "
                   "H200 rig's CPU; 10 Gbit/s and 150 us round trips between VMs; prices: $0.54/h for the T4 VM "
                   "(GPU $0.35 + 4 vCPU host), $0.52/h for an 8-vCPU 64 GB VM (typical on-demand list prices)"),
        "model": None,
        "dense": {
            "device": "cuda", "dtype": "float16", "threads": None, "layer_s": None, "head_s": None,
            "step_s": 5e-4, "step_per_seq_s": 5e-6, "cold_factor": 1.0,
            "roofline": {"tflops": 26.0, "mem_GBps": 224.0, "overhead_s": 3e-5},
            "attention": {"overhead_s": 3e-5, "kv_GBps": 224.0, "gflops": 26000.0},
            "kv_bytes": None, "memory_bytes": 15 * 10**9, "workspace_bytes": 1 * 10**9, "price_per_hour": 0.54,
        },
        "attention": {"overhead_s": 2e-4, "kv_GBps": round(2 * cpu4["sdpa_GBps"], 1), "gflops": None, "threads": 8,
                      "kv_bytes": 48 * GiB, "price_per_hour": 0.52},
        "network": {"rtt_s": 1.5e-4, "GBps": 1.25, "msg_cpu_s": 5e-5, "msg_cpu_GBps": 5.0},
        "host": {"shared": False, "dense_slowdown": 1.0, "attention_slowdown": 1.0},
    }


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, doc in (("h200", h200()), ("t4", t4())):
        (OUT / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {OUT / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
