#!/usr/bin/env python
"""The planner's predictions for runs already measured, from the simulator as it stands.

``bench_planner.py --json`` keeps, for every configuration it ran, the profile its
prediction came from and the tokens/s it measured.  This predicts each of them again
with the current simulator and prints the errors and how many configurations are within
15%, per run and over all of them.  A change to the simulator can so be checked against
every run kept (on this VM, a single run's errors move by a fifth with the minute its
profile was measured in), not only against the next one.  Runs bracketed by profiles
(``--profile-each``) are predicted from the mean of the two sides, as they were.

Usage::

    python benchmarks/replay_planner.py [RESULT.json ...] [--json OUT]

Without files it reads every ``benchmarks/results/planner-*.json`` whose profiles this
version reads (runs kept from before the profile format had them are listed as skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout

from glinthawk_dask.model.config import from_name  # noqa: E402
from glinthawk_dask.model.resolve import DEFAULT_MODEL  # noqa: E402
from glinthawk_dask.planner.profile import Profile, ProfileError  # noqa: E402
from glinthawk_dask.planner.simulate import RunConfig, Workload, simulate  # noqa: E402

TARGET_ERROR = 0.15
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS = 16  # bench_planner.py's default, for runs that did not record theirs


def replay(run: dict, model) -> float:
    """Tokens/s the simulator predicts now for one configuration of a kept run."""
    cfg = RunConfig(mode=run["mode"], micro_batch_size=run["micro_batch_size"], micro_batches=run["micro_batches"],
                    attention=run["attention_workers"], latency=run["latency_ms"] / 1e3)
    workload = Workload.uniform(run["prompts"], run.get("prompt_tokens", PROMPT_TOKENS), run["new_tokens"])
    sides = [run["profile"]] + ([run["profile_after"]] if "profile_after" in run else [])
    return sum(simulate(Profile.from_json(p, "a kept profile"), model, workload, cfg).tokens_per_s
               for p in sides) / len(sides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="bench_planner.py JSON results (default: all kept)")
    p.add_argument("--json", help="write every prediction to this JSON file")
    args = p.parse_args(argv)
    files = [Path(f) for f in args.files] or sorted(RESULTS.glob("planner-*.json"))
    model = from_name(DEFAULT_MODEL)
    report, within, total = [], 0, 0
    for path in files:
        runs = json.loads(path.read_text())["runs"]
        try:
            rows = [(r["label"], r["measured_tokens_per_s"], r["predicted_tokens_per_s"], replay(r, model))
                    for r in runs]
        except (KeyError, ProfileError) as e:
            print(f"{path.name}: skipped (kept before this profile format: {e})")
            continue
        ok = sum(abs(now / measured - 1) <= TARGET_ERROR for _, measured, _, now in rows)
        within, total = within + ok, total + len(rows)
        print(f"{path.name}: {ok} of {len(rows)} within {TARGET_ERROR:.0%}")
        for label, measured, then, now in rows:
            print(f"  {label:32s} measured {measured:7.1f} tok/s, predicted {now:7.1f} ({now / measured - 1:+.0%}); "
                  f"when run {then:7.1f} ({then / measured - 1:+.0%})")
        report.append({"file": path.name, "within": ok, "configurations": [
            {"label": label, "measured_tokens_per_s": measured, "predicted_then": then, "predicted_now": now}
            for label, measured, then, now in rows]})
    print(f"\nall runs: {within} of {total} configurations within {TARGET_ERROR:.0%}; runs with at least 6 of 7: "
          f"{sum(r['within'] >= 6 for r in report)} of {len(report)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"within": within, "configurations": total, "runs": report},
                                              indent=1) + "\n")
    return 0 if report else 1


if __name__ == "__main__":
    sys.exit(main())
