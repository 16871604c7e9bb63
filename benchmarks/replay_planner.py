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

    python benchmarks/replay_planner.py [RESULT.json ...] [--pairs-since 2026-12-03] [--json OUT]

Without files it reads every ``benchmarks/results/planner-*.json`` whose profiles this
version reads (runs kept from before the profile format had them are listed as skipped).

It also replays the kept runs of ``bench_two_tier.py`` part 1 (``two-tier-*.json``, with
their profile, from ``--pairs-since`` on: by default the runs with the compiled attention
kernel, which changed both engines): each one's two-tier plan and its in-process engine,
from the same profile,
as the ratio of the two against the measured ratio (the first pair, and the alternating
rounds' medians where there were any).  A profile's level moves with the minute it was
measured in and moves both engines alike; the ratio says whether the model prices what
one engine pays and the other does not.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
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


KERNEL_DAY = "2026-12-03"  # the first runs with the compiled attention kernel, in every engine
RATIO_ERROR = 0.05  # predicted two-tier / in-process ratios this close to the measured one count as right


def replay_pair(doc: dict, model) -> tuple[float, float]:
    """(two-tier, in-process) tokens/s the simulator predicts now for a kept
    ``bench_two_tier.py`` part 1 run, both from the run's kept profile.  Prompts are
    taken at their mean length (the runs kept their total)."""
    t = doc["throughput"]
    plan = t["two_tier_plan"]
    n, new = t["batch"], t["new_tokens"]
    workload = Workload.uniform(n, max(1, round(t["prompt_tokens"] / n)), new)
    profile = Profile.from_json(doc["profile"], "a kept profile")
    two = simulate(profile, model, workload, RunConfig(
        micro_batch_size=plan["micro_batch_size"], micro_batches=plan["n_micro_batches"], attention=2,
        max_step_tokens=plan["max_step_tokens"]))
    one = simulate(profile, model, workload, RunConfig(mode="in-process", micro_batch_size=n,
                                                       max_step_tokens=t["prompt_tokens"]))
    return two.tokens_per_s, one.tokens_per_s


def _day(name: str) -> str:
    """The date a result file's name carries (``...-2026-12-03-...``), or ""."""
    m = re.search(r"\d{4}-\d{2}-\d{2}", name)
    return m.group(0) if m else ""


def replay_pairs(paths: list[Path], model) -> list[dict]:
    """The two engines' predicted ratio against the measured one, for each kept run."""
    rows = []
    for path in paths:
        doc = json.loads(path.read_text())
        if "two_tier_plan" not in doc.get("throughput", {}):
            continue  # a run of the other parts only
        try:
            two, one = replay_pair(doc, model)
            measured = doc["throughput"]["ratio_two_tier_over_inprocess"]
        except (KeyError, TypeError, ProfileError) as e:
            print(f"{path.name}: skipped ({type(e).__name__}: {e})")
            continue
        alternating = (doc["throughput"].get("alternating") or {})
        first = alternating.get("first_ratio", measured)
        rounds = alternating.get("ratio")
        results = doc["throughput"]["results"]
        rows.append({"file": path.name, "plan": "{micro_batch_size} x {n_micro_batches}".format(
                     **doc["throughput"]["two_tier_plan"]), "predicted_ratio": two / one, "first_ratio": first,
                     "rounds_ratio": rounds, "two_tier_error": two / results["two-tier"]["tokens_per_s"] - 1,
                     "in_process_error": one / results["in-process"]["tokens_per_s"] - 1})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="bench_planner.py and bench_two_tier.py (two-tier-*.json) JSON results "
                                           "(default: all kept)")
    p.add_argument("--pairs-since", default=KERNEL_DAY,
                   help=f"replay bench_two_tier.py runs of this day (YYYY-MM-DD) or later (default {KERNEL_DAY})")
    p.add_argument("--json", help="write every prediction to this JSON file")
    args = p.parse_args(argv)
    given = [Path(f) for f in args.files]
    files = [f for f in given if not f.name.startswith("two-tier-")] if given else sorted(RESULTS.glob("planner-*.json"))
    pair_files = [f for f in given if f.name.startswith("two-tier-")] if given else [
        f for f in sorted(RESULTS.glob("two-tier-*.json")) if _day(f.name) >= args.pairs_since]
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
    if files:
        print(f"\nall runs: {within} of {total} configurations within {TARGET_ERROR:.0%}; runs with at least 6 of "
              f"7: {sum(r['within'] >= 6 for r in report)} of {len(report)}")
    pairs = replay_pairs(pair_files, model)
    if pairs:
        print(f"\nbench_two_tier.py part 1 runs: the two engines from the run's profile, their ratio predicted now "
              "against the measured one (first pair; alternating rounds' medians)")
        for r in pairs:
            rounds = f"{r['rounds_ratio']:.2f}x" if r["rounds_ratio"] else "-"
            print(f"  {r['file']:48s} {r['plan']:>7s}  predicted {r['predicted_ratio']:.2f}x, measured "
                  f"{r['first_ratio']:.2f}x; {rounds}   levels: two-tier {r['two_tier_error']:+.0%}, in-process "
                  f"{r['in_process_error']:+.0%}")
        for plan in sorted({r["plan"] for r in pairs}):
            of = [r for r in pairs if r["plan"] == plan]
            rounds = [r["rounds_ratio"] for r in of if r["rounds_ratio"]]
            print(f"  plan {plan}, {len(of)} runs: predicted {statistics.mean(r['predicted_ratio'] for r in of):.2f}x "
                  f"on average, measured {statistics.mean(r['first_ratio'] for r in of):.2f}x (first pairs, "
                  f"{min(r['first_ratio'] for r in of):.2f}-{max(r['first_ratio'] for r in of):.2f}x)"
                  + (f" and {statistics.mean(rounds):.2f}x (rounds)" if rounds else ""))
        close = sum(abs(r["predicted_ratio"] - r["first_ratio"]) <= RATIO_ERROR for r in pairs)
        print(f"predicted ratio within {RATIO_ERROR:.2f} of the first pair's: {close} of {len(pairs)} runs; "
              f"median |two-tier error| {statistics.median(abs(r['two_tier_error']) for r in pairs):.0%}, "
              "median |ratio error| "
              f"{statistics.median(abs(r['predicted_ratio'] - r['first_ratio']) for r in pairs):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"within": within, "configurations": total, "runs": report,
                                               "pairs": pairs}, indent=1) + "\n")
    return 0 if report or pairs else 1


if __name__ == "__main__":
    sys.exit(main())
