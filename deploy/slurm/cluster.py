"""A two-tier glinthawk cluster on SLURM with dask-jobqueue, then a pipeline run on it.

One Dask scheduler (in this process) and two SLURM job templates:

* **dense** jobs: one GPU each (``#SBATCH --gres=gpu:1``), running
  ``python -m glinthawk_dask worker --tier dense <scheduler>`` (resources ``GPU=1``);
* **attention** jobs: CPUs and memory only, running
  ``python -m glinthawk_dask worker --tier attention <scheduler> --kv-bytes <bytes>``
  (resources ``KV=<bytes>``), with ``--kv-bytes`` at most 0.6 x the job's memory limit.

Run it where ``sbatch`` works (a login node, or inside an allocation), in the Python
environment that the compute nodes will use too (a shared filesystem)::

    python deploy/slurm/cluster.py pipelines/s3-jsonl.yaml --dense-jobs 1 --attention-jobs 4 \\
        --gpu-partition gpu --cpu-partition cpu --account myproject

``--dry-run`` prints both job scripts and submits nothing (no SLURM needed).  With
``--dask-worker`` the jobs run plain ``dask worker`` with ``--resources GPU=1`` /
``--resources KV=<bytes>`` and the tier's memory thresholds as DASK_* variables instead;
the glinthawk plugins are registered by the client either way.

Importing this module needs neither SLURM nor dask-jobqueue; building job scripts needs
dask-jobqueue (``pip install dask-jobqueue``); submitting needs SLURM.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

from dask.utils import parse_bytes

try:  # optional: only building and submitting jobs need it
    from dask_jobqueue import SLURMCluster
    from dask_jobqueue.slurm import SLURMJob
except ImportError:  # pragma: no cover - exercised where dask-jobqueue is missing
    SLURMCluster = SLURMJob = None

__all__ = ["ATTENTION", "DENSE", "TierJob", "default_kv_bytes", "job_options", "job_script", "main", "make_cluster", "run"]

logger = logging.getLogger("glinthawk.slurm")


@dataclass
class TierJob:
    """What one SLURM job of a tier asks for and runs (one Dask worker per job)."""

    tier: str  # "dense" or "attention"
    cpus: int  # CPUs of the job (--cpus-per-task); torch threads of the tier's compute stream
    memory: str  # the job's memory (--mem) == the worker's --memory-limit
    nthreads: int = 1  # Dask task threads of the worker
    kv_bytes: str | None = None  # attention: KV budget (<= 0.6 x memory)
    partition: str | None = None
    walltime: str = "04:00:00"
    directives: list[str] = field(default_factory=list)  # extra #SBATCH lines


# Defaults: a dense job per GPU; attention jobs on CPU nodes with lots of memory.
DENSE = TierJob("dense", cpus=8, memory="32GiB", directives=["--gres=gpu:1"])
ATTENTION = TierJob("attention", cpus=16, memory="64GiB", nthreads=2, kv_bytes="35GiB")


def default_kv_bytes(memory: str) -> str:
    """A KV budget of 56% of ``memory`` (under glinthawk.attention.kv-memory-fraction, 0.6),
    rounded down: what an attention job gets unless --kv-bytes says otherwise."""
    gib = parse_bytes(memory) * 0.56 / 2**30
    return f"{int(gib)}GiB" if gib >= 1 else f"{int(gib * 1024)}MiB"


def _memory_env(tier: str) -> dict[str, str]:
    """The tier's Dask memory thresholds as DASK_* variables (for plain ``dask worker``)."""
    from glinthawk_dask.runtime.cluster import ATTENTION_MEMORY, DENSE_MEMORY

    memory = ATTENTION_MEMORY if tier == "attention" else DENSE_MEMORY
    return {f"DASK_DISTRIBUTED__WORKER__MEMORY__{k.upper()}": str(v) for k, v in memory.items()}


def job_options(
    job: TierJob,
    *,
    account: str | None = None,
    prologue: list[str] | None = None,
    dask_worker: bool = False,
    log_directory: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``SLURMCluster``/``SLURMJob`` for one tier's jobs."""
    from glinthawk_dask.runtime.cluster import tier_environment

    if job.tier not in ("dense", "attention"):
        raise ValueError(f"unknown tier {job.tier!r}; use dense or attention")
    env: dict[str, str] = {}
    threads_key = "DASK_GLINTHAWK__DENSE__THREADS" if job.tier == "dense" else "DASK_GLINTHAWK__ATTENTION__THREADS"
    env[threads_key] = str(job.cpus)
    env.update(tier_environment(job.tier))  # in the job's environment: read as torch loads
    if dask_worker:
        worker_command = "distributed.cli.dask_worker"
        kv = parse_bytes(job.kv_bytes) if job.kv_bytes else 1
        extra_args = ["--resources", "GPU=1" if job.tier == "dense" else f"KV={kv}"]
        env.update(_memory_env(job.tier))
    else:
        worker_command = f"glinthawk_dask worker --tier {job.tier}"
        extra_args = ["--kv-bytes", job.kv_bytes] if job.kv_bytes else []
    exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return {
        "cores": job.nthreads,  # dask-jobqueue's --nthreads
        "job_cpu": job.cpus,  # --cpus-per-task
        "processes": 1,  # one worker per job: the tiers keep their state per process
        "memory": job.memory,  # --mem and --memory-limit
        "queue": job.partition,
        "account": account,
        "walltime": job.walltime,
        "job_name": f"glinthawk-{job.tier}",
        "job_extra_directives": list(job.directives),
        "job_script_prologue": list(prologue or []) + exports,
        "worker_command": worker_command,
        "worker_extra_args": extra_args,
        "log_directory": log_directory,
    }


def _require_jobqueue() -> None:
    if SLURMJob is None:
        raise SystemExit("dask-jobqueue is not installed: pip install dask-jobqueue")


def job_script(options: dict[str, Any], scheduler: str = "tcp://<scheduler>:8786", name: str = "<name>") -> str:
    """The sbatch script a job of ``options`` would submit (no SLURM needed)."""
    _require_jobqueue()
    return SLURMJob(scheduler, name=name, **options).job_script()


def make_cluster(
    dense: dict[str, Any], attention: dict[str, Any], *, n_dense: int, n_attention: int,
    dashboard_address: str = ":8787", scheduler_options: dict[str, Any] | None = None,
) -> Any:
    """One scheduler, ``n_dense`` dense jobs and ``n_attention`` attention jobs.

    The cluster's job template is switched after the dense jobs are asked for, so that
    later ``cluster.scale(jobs=...)`` adds attention jobs.  ``scheduler_options`` go to
    the scheduler (e.g. ``{"interface": "ib0"}`` or ``{"host": ...}``).
    """
    _require_jobqueue()
    options = {"dashboard_address": dashboard_address, **(scheduler_options or {})}
    cluster = SLURMCluster(**dense, name="glinthawk", scheduler_options=options)
    cluster.scale(jobs=n_dense)
    cluster.new_spec = {"cls": cluster.job_cls, "options": {**cluster.new_spec["options"], **attention}}
    cluster.scale(jobs=n_dense + n_attention)
    return cluster


def run(spec_path: str, cluster: Any, *, n_workers: int, timeout: float = 1800.0) -> Any:
    """Wait for the workers, then run the pipeline spec on the cluster."""
    from distributed import Client

    from glinthawk_dask.pipeline.run import run_pipeline
    from glinthawk_dask.pipeline.spec import load_spec

    spec = load_spec(spec_path)  # a bad spec fails here, before anything waits
    with Client(cluster) as client:
        logger.info("dashboard: %s", client.dashboard_link)
        client.wait_for_workers(n_workers, timeout=timeout)
        return run_pipeline(spec, client=client)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", help="pipeline spec (YAML); not needed with --dry-run")
    p.add_argument("--dense-jobs", type=int, default=1, help="dense jobs (GPUs, layer slices) [1]")
    p.add_argument("--attention-jobs", type=int, default=4, help="attention jobs [4]")
    p.add_argument("--gpu-partition", default=None, help="partition of the dense jobs")
    p.add_argument("--cpu-partition", default=None, help="partition of the attention jobs")
    p.add_argument("--account", default=None)
    p.add_argument("--dense-cpus", type=int, default=DENSE.cpus)
    p.add_argument("--dense-memory", default=DENSE.memory)
    p.add_argument("--attention-cpus", type=int, default=ATTENTION.cpus)
    p.add_argument("--attention-memory", default=ATTENTION.memory)
    p.add_argument("--kv-bytes", default=None, help="KV budget of an attention job [56%% of its memory]")
    p.add_argument("--walltime", default="04:00:00")
    p.add_argument("--prologue", action="append", default=[], metavar="LINE",
                   help="job script line before the worker starts, e.g. 'source ~/venv/bin/activate' (repeatable)")
    p.add_argument("--log-directory", default=None)
    p.add_argument("--dask-worker", action="store_true",
                   help="run plain `dask worker --resources ...` instead of `glinthawk worker --tier ...`")
    p.add_argument("--dry-run", action="store_true", help="print both job scripts and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kv = args.kv_bytes or default_kv_bytes(args.attention_memory)
    dense_job = TierJob("dense", cpus=args.dense_cpus, memory=args.dense_memory, partition=args.gpu_partition,
                        walltime=args.walltime, directives=list(DENSE.directives))
    attention_job = TierJob("attention", cpus=args.attention_cpus, memory=args.attention_memory,
                            nthreads=ATTENTION.nthreads, kv_bytes=kv, partition=args.cpu_partition,
                            walltime=args.walltime)
    common = {"account": args.account, "prologue": args.prologue, "dask_worker": args.dask_worker,
              "log_directory": args.log_directory}
    dense, attention = job_options(dense_job, **common), job_options(attention_job, **common)
    if args.dry_run:
        print(job_script(dense, name="glinthawk-dense-0"))
        print(job_script(attention, name="glinthawk-attention-0"))
        return 0
    if not args.spec:
        raise SystemExit("a pipeline spec is needed (or --dry-run)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cluster = make_cluster(dense, attention, n_dense=args.dense_jobs, n_attention=args.attention_jobs)
    try:
        report = run(args.spec, cluster, n_workers=args.dense_jobs + args.attention_jobs)
    finally:
        cluster.close()
    print(f"{report.rows_done} rows ({report.errors} errors) in {report.seconds:.0f} s -> {report.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
