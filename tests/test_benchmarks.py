"""Smoke test of the benchmark scripts: they run at a tiny size and print their numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_inprocess_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    # Batch 2, 4 new tokens, no prefill-estimate runs: well under a minute with model loads.
    cmd = [sys.executable, str(BENCHMARKS / "bench_inprocess.py"),
           "--batch", "2", "--new-tokens", "4", "--no-prefill", "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout

    assert "torch.get_num_threads()" in text
    rows = {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(in-process|hf-transformers)\s+2\s+4\s+8\s+[\d.]+\s+([\d.]+)$", text, re.MULTILINE)}
    assert set(rows) == {"in-process", "hf-transformers"}, text
    assert all(v > 0 for v in rows.values())
    assert re.search(r"^ratio in-process / HF \(tokens/s\): [\d.]+x$", text, re.MULTILINE), text

    report = json.loads(out.read_text())
    for name in ("in-process", "hf-transformers"):
        assert report["results"][name]["generated_tokens"] == 8
    assert report["ratio_inprocess_over_hf"] > 0
