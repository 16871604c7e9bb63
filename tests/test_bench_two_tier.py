"""Smoke test of benchmarks/bench_two_tier.py: at a tiny size it runs end to end on the
embedded local cluster and prints every section of its report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_two_tier.py"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_two_tier_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    # 4 prompts x 4 tokens, then 8 prompts x 2 tokens at 0 and 5 ms, then the three modes at
    # three budgets: ~60 s, most of it the cluster start and the workers' weight load.
    cmd = [sys.executable, str(SCRIPT), "--batch", "4", "--new-tokens", "4", "--latency-prompts", "8",
           "--latency-new-tokens", "2", "--latencies", "0,5", "--skip-hf", "--budget-seqs", "2",
           "--budget-max-seq-len", "64", "--long-budget-seqs", "1", "--long-max-seq-len", "128",
           "--long-prompts", "2", "--long-new-tokens", "3", "--budget-repeats", "1", "--alternate", "1",
           "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=220, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    text = proc.stdout

    # part 1: one row per engine (4 prompts x 4 tokens = 16 generated), ratios, plan, overlap
    rows = {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(two-tier|in-process)\s+4\s+4\s+16\s+[\d.]+\s+([\d.]+)$", text, re.MULTILINE)}
    assert set(rows) == {"two-tier", "in-process"}, text
    assert all(v > 0 for v in rows.values())
    assert "hf-transformers" not in rows
    assert re.search(r"^ratio two-tier / in-process \(tokens/s\): [\d.]+x$", text, re.MULTILINE), text
    assert re.search(r"^two-tier plan: micro-batch \d+ x \d+ micro-batches \(auto x auto asked\)", text, re.MULTILINE), text
    assert re.search(r"^tier overlap \(two-tier run, [\d.]+ s wall\): dense busy [\d.]+ s, attention busy "
                     r"[\d.]+ s, both busy [\d.]+ s = [\d.]+% of wall$", text, re.MULTILINE), text
    # greedy two-tier is token-identical to in-process
    assert re.search(r"^greedy outputs of two-tier identical to in-process token for token: 4/4$",
                     text, re.MULTILINE), text
    assert "every engine generated exactly 16 tokens: yes" in text
    # one alternating round, the lower ratio judged
    assert re.search(r"^  round 1: in-process [\d.]+ tok/s \(busy .*\), two-tier [\d.]+ \(busy .*\): [\d.]+x$",
                     text, re.MULTILINE), text

    # part 2: a row per latency, the cost of 5 ms relative to 0 ms
    prefill = re.search(r"^  prefill alone \(1 new token each, depth 1\): [\d.]+ s, the dense tier busy ([\d.]+) s",
                        text, re.MULTILINE)
    assert prefill and float(prefill[1]) > 0, text
    lat = re.findall(r"^\s+(0|5)\s+(\d+)x(\d+)\s+16\s+[\d.]+\s+([\d.]+)\s+([\d.]+|n/a)\s+([\d.]+)x\s+[\d.]+s\s+"
                     r"([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", text, re.MULTILINE)
    assert [r[0] for r in lat] == ["0", "5"], text
    assert all(int(r[1]) == 8 and float(r[3]) > 0 for r in lat)
    # the latency floor: 2 passes x 30 layers x 2 messages x 5 ms; none at 0 ms
    assert [float(r[6]) for r in lat] == [0.0, 0.6], text
    # with every prompt in flight (8 prompts, micro-batches of 8): the prefill's dense
    # work, then 1 pass x 30 layers x 2 messages x 5 ms; the floor alone where higher
    report_rows = json.loads(out.read_text())["latency"]["runs"]
    row5 = report_rows[1]
    assert row5["prefill_floor_seconds"] == pytest.approx(max(0.6, row5["prefill_dense_seconds"] + 0.3))
    assert float(lat[1][7]) == pytest.approx(row5["prefill_floor_seconds"], abs=0.006), text
    assert float(lat[0][7]) == 0.0, text
    assert float(lat[0][8]) == 1.0 and 0 < float(lat[1][8]) <= 1.0, text
    assert re.search(r"^latency 5 ms costs -?[\d.]+% of the 0 ms throughput", text, re.MULTILINE), text
    # where a layer of the chain went: 5 ms each way, held on the attention side
    chains = re.findall(r"^    a layer of a micro-batch's chain: dense job ([\d.]+) ms, out to attention ([\d.]+) ms, "
                        r"back to its next dense job ([\d.]+) ms; step boundary ([\d.]+) ms$", text, re.MULTILINE)
    assert len(chains) == 2, text
    # (a job sends its request before it ends, so on a loaded machine its end can come up to
    # the send's bookkeeping after the send: the 5 ms out are held from within the job)
    assert float(chains[1][0]) + float(chains[1][1]) >= 5.0 and float(chains[1][2]) >= 5.0, text
    assert "every latency run generated exactly 16 tokens: yes" in text

    # part 3: each mode at each budget, token-identical; the dense budget honoured
    modes = re.findall(r"^  (single-tier|two-tier|hybrid)\s+[\d.]+ tok/s  plan ([\d+]+) \((\d+) of (\d+) micro-batches "
                       r"attend on the dense worker\); KV (\d+) MB dense, (\d+) MB attention; predicted [\d.]+; "
                       r"identical (\d+)/(\d+)", text, re.MULTILINE)
    assert [m[0] for m in modes] == ["single-tier", "two-tier", "hybrid"] * 3, text
    assert all(m[6] == m[7] for m in modes), text
    assert all(m[2] == m[3] for m in modes if m[0] == "single-tier") and all(
        m[2] == "0" for m in modes if m[0] == "two-tier"), text
    assert re.search(r"^budget of 2 x 64: better of two-tier and hybrid >= 2\.5x single-tier: [\d.]+x (PASS|SHORT)$",
                     text, re.MULTILINE), text
    assert re.search(r"^no budget: hybrid >= 0\.95x the better of single-tier and two-tier: [\d.]+x (PASS|SHORT)$",
                     text, re.MULTILINE), text
    assert "greedy tokens of all three modes identical to in-process: yes" in text

    # targets, honestly marked
    assert re.search(r"^two-tier >= 0\.9x in-process: [\d.]+x (PASS|SHORT)$", text, re.MULTILINE), text
    assert re.search(r"^two-tier >= 2x HF generate: n/a \(--skip-hf\)$", text, re.MULTILINE), text
    assert re.search(r"^50 ms latency costs <= 10%: n/a", text, re.MULTILINE), text

    report = json.loads(out.read_text())
    assert report["throughput"]["identical_to_inprocess"] == 4
    alt = report["throughput"]["alternating"]
    assert len(alt["rounds"]) == 1 and report["throughput"]["ratio_two_tier_over_inprocess"] == min(
        alt["ratio"], alt["first_ratio"])
    assert report["throughput"]["results"]["two-tier"]["generated_tokens"] == 16
    assert [r["latency_ms"] for r in report["latency"]["runs"]] == [0.0, 5.0]
    assert report["targets"]["two_tier_vs_hf"] is None
    bound = report["budget"]["bound"]
    slot = bound["dense_kv_budget"] // 2
    for mode in ("single-tier", "hybrid"):
        assert bound["runs"][mode]["kv_bytes"]["dense"] <= 2 * slot
    assert sum(bound["runs"]["single-tier"]["micro_batch_sizes"]) <= 2
