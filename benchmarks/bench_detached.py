"""A detached pipeline against the same pipeline driven by its client, on one cluster.

Starts ``glinthawk cluster`` (1 dense, 2 attention worker processes), warms it with one
run driven from here, then alternates ``--rounds`` times:

* ``client``: :func:`run_pipeline` in this process, on a Dask client of the cluster (as
  ``glinthawk run --scheduler`` runs it);
* ``detached``: :func:`submit_detached` (as ``glinthawk run --scheduler --detach``),
  then the scheduler's record, polled twice a second until the run ends; its driver is
  a process of its own under a worker.

Each run starts its output over; its tokens/s are its report's (first request to last
commit).  It prints every run with the machine's CPU shares, the medians, the ratio
detached / client, and how many rows of the two outputs have the same tokens.

    python benchmarks/bench_detached.py                # 3 rounds, ~3 minutes on 2 cores
    python benchmarks/bench_detached.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_two_tier import cpu_text, with_cpu  # noqa: E402

from glinthawk_dask.pipeline.detached import report_from, submit_detached  # noqa: E402
from glinthawk_dask.pipeline.run import run_pipeline  # noqa: E402
from glinthawk_dask.pipeline.spec import load_spec  # noqa: E402
from glinthawk_dask.pipeline.table import read_output  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(REPO / "pipelines" / "quickstart.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="Also write the results here.")
    args = ap.parse_args(argv)

    from distributed import Client

    work = Path(tempfile.mkdtemp(prefix="bench-detached-"))
    spec = load_spec(args.spec)
    outputs = {kind: str(work / f"{kind}.zarr") for kind in ("client", "detached")}
    cluster = subprocess.Popen([sys.executable, "-m", "glinthawk_dask", "cluster", "--dashboard-address", ":0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    runs: list[dict] = []
    try:
        address = cluster.stdout.readline().split()[-1]
        client = Client(address)

        def with_output(kind: str):
            return replace(spec, output=replace(spec.output, url=outputs[kind]))

        def by_client():
            return run_pipeline(with_output("client"), client=client, overwrite=True)

        def detached():
            record = submit_detached(with_output("detached"), client, overwrite=True).wait(poll=0.5)
            if record["state"] != "finished":
                raise SystemExit(f"the detached run ended {record['state']}: {record.get('error')}")
            return report_from(record["report"])

        by_client()  # warm: the model on the workers, the cluster's profile for auto plans
        print(f"cluster {address}; spec {args.spec}; {args.rounds} rounds, alternating", flush=True)
        for i in range(args.rounds):
            for kind, fn in (("client", by_client), ("detached", detached)) if i % 2 == 0 else \
                    (("detached", detached), ("client", by_client)):
                report, cpu = with_cpu(fn)
                plan = report.plan or {}
                runs.append({"round": i + 1, "kind": kind, "tokens_per_s": report.tokens_per_s,
                             "tokens": report.generated_tokens, "seconds": report.seconds,
                             "plan": f"{plan.get('micro_batch_size')} x {plan.get('micro_batches')}", "cpu": cpu})
                print(f"  round {i + 1} {kind:9s} {report.tokens_per_s:6.1f} tok/s ({report.generated_tokens} tokens "
                      f"in {report.seconds:.1f} s, plan {runs[-1]['plan']}); machine CPU: {cpu_text(cpu)}",
                      flush=True)
        client.close()
    finally:
        cluster.send_signal(signal.SIGINT)
        try:
            cluster.wait(60)
        except subprocess.TimeoutExpired:
            cluster.kill()

    medians = {k: statistics.median(r["tokens_per_s"] for r in runs if r["kind"] == k) for k in ("client", "detached")}
    tables = {k: {r["id"]: list(r["completion_token_ids"]) for r in read_output(u).records()}
              for k, u in outputs.items()}
    same = sum(tables["client"].get(rid) == tokens for rid, tokens in tables["detached"].items())
    print(f"median tok/s: client {medians['client']:.1f}, detached {medians['detached']:.1f}; "
          f"ratio detached / client {medians['detached'] / medians['client']:.2f}x")
    print(f"rows with the same tokens in both outputs: {same}/{len(tables['client'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": medians, "same_rows": same,
                                               "rows": len(tables["client"])}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
