"""Measure a cluster's profile: its dense and attention workers' costs and the data plane
between them, on the workers themselves (random weights of the model's shape).

:func:`measure_profile` asks the first dense worker and the first attention worker (the
workers of one kind are taken to be alike) for timings over their compute streams, then
fits them into a :class:`~glinthawk_dask.planner.profile.Profile`.  When both share a
host, it also measures how much each tier slows the other while both compute.
:func:`cluster_profile` keeps one per cluster and model on the scheduler, so auto plans
measure once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from typing import Any

from ..errors import GlinthawkError
from ..model.config import ModelConfig
from ..planner.microbench import ROWS, TOKENS, TOKENS_QUICK, attention_shapes, dense_profile
from ..planner.profile import (AttentionCost, AttentionProfile, DenseProfile, Profile, attention_work, fit_cold,
                                request_bytes)
from .messages import DTYPES

__all__ = ["measure_profile", "cluster_profile", "drift_scale", "profile_key"]

logger = logging.getLogger(__name__)

_PROBE_TOKENS = [1, 16, 64, 256]
_MEASURES = 8  # how profiles are measured: profiles kept on disk by other measures are not read
# (6: dense layers timed through every layer in turn, see planner.microbench.LayerCycle;
# 7: attention in slots longer than its contexts, the dense side's on one thread;
# 8: what longer idle gaps add to a dense job, see planner.microbench.idle_points)
# a kept profile's check (see _probed): the dense layer's token counts, the rounds through
# them, how far a tier's probe may stray before its costs are scaled, and how far from the
# measured costs a probe is taken as a busy moment instead
_DRIFT_TOKENS = [16, 64]
_DRIFT_ROUNDS = 8
_DRIFT = 0.15
_DRIFT_MAX = 2.0
_BUSY_RETRY = 60.0  # seconds before a check that caught the workers busy is tried again (at most)


def profile_key(model: str, dtype: str, info: dict) -> str:
    """Names a profile by model, dtype and the cluster's tier workers."""
    return f"{model}|{dtype}|{','.join(info['dense'])}|{','.join(info['attention'])}"


async def _rpc(client: Any, addr: str, op: str, **kwargs: Any) -> Any:
    return await getattr(client.rpc(addr), op)(**kwargs)


async def _settled(client: Any, info: dict, timeout: float = 30.0) -> None:
    """Wait for the attention workers to finish loading their kernel (about a second
    of a core each as they start): a measurement beside it prices the tiers for that
    moment (a check of a kept profile run right after the embedded cluster started
    found its dense tier x4.3).  A worker that fails or does not answer in ``timeout``
    seconds is not waited for."""
    calls = asyncio.gather(*(_rpc(client, a, "glinthawk_attention_ready", timeout=timeout)
                             for a in info["attention"]), return_exceptions=True)
    try:
        await asyncio.wait_for(calls, timeout + 1.0)
    except asyncio.TimeoutError:  # a worker that is gone but still listed: measure without it
        pass


async def measure_profile(client: Any, model_config: ModelConfig, *, model: str = "", dtype: str = "float32",
                          quick: bool = False, name: str | None = None) -> Profile:
    """Profile the cluster of ``client`` (an asynchronous call on its loop)."""
    t0 = time.time()
    info = await client.scheduler.glinthawk_cluster_info()
    if not info["dense"]:
        raise GlinthawkError("the cluster has no dense worker to profile: start one with "
                             "`glinthawk worker --tier dense`")
    await _settled(client, info)
    cfg = dataclasses.asdict(model_config)
    dense = info["dense"][0]
    tokens = list(TOKENS_QUICK if quick else TOKENS)
    shapes = attention_shapes(model_config)
    d = await _rpc(client, dense, "glinthawk_profile_dense", config=cfg, dtype=dtype, tokens=tokens, rows=ROWS,
                   attention=shapes, cold=not info["attention"],  # with attention workers: measured below
                   idle=True)
    local = AttentionCost.fit([tuple(p) for p in d["attention"]])
    attention = AttentionProfile(cost=local, threads=d["threads"])
    rtt_s, net_GBps, msg_cpu_s, msg_cpu_GBps = 0.0, float("inf"), 0.0, float("inf")
    elem = DTYPES[dtype].itemsize
    shared = False
    if info["attention"]:
        att = info["attention"][0]
        a = await _rpc(client, att, "glinthawk_profile_attention", config=cfg, shapes=shapes, dtype=dtype)
        attention = AttentionProfile(cost=AttentionCost.fit([tuple(p) for p in a["points"]]), threads=a["threads"],
                                     kv_bytes=min(info["kv_budget"].values()))
        rtt_s, net_GBps, msg_cpu_s, msg_cpu_GBps = await _network(client, dense, att, cfg, dtype, model_config, elem)
        hosts = info["hosts"]
        shared = hosts.get(dense) is not None and hosts.get(dense) == hosts.get(att)
    profile = Profile(
        name=name or f"measured-{d['device']}", source="",
        dense=_with_kv_memory(dense_profile(d, local), info["dense_kv_free"]),
        attention=attention, rtt_s=rtt_s, net_GBps=net_GBps, msg_cpu_s=msg_cpu_s, msg_cpu_GBps=msg_cpu_GBps,
        shared_host=shared, model=model_config,
    )
    if info["attention"]:
        profile = await _run_shaped(client, profile, dense, info["attention"], cfg, dtype, elem, 10 if quick else 16)
    return dataclasses.replace(
        profile,
        source=(f"measured by glinthawk profile on {time.strftime('%Y-%m-%d %H:%M')} in {time.time() - t0:.1f} s: "
                f"{len(info['dense'])} dense worker(s) ({d['device']}, {d['threads']} threads), "
                f"{len(info['attention'])} attention worker(s); random weights of {model or 'the model'}'s shape"),
        extra={"workers": {"dense": len(info["dense"]), "attention": len(info["attention"])},
               "seconds": round(time.time() - t0, 2), "measured_at": time.time()},
    )


def _with_kv_memory(dense: DenseProfile, free: dict[str, int | None]) -> DenseProfile:
    """``dense`` with the KV memory of the smallest dense worker (``free``: each one's
    free KV bytes with no weights loaded, as the scheduler places runs): on a CPU its KV
    budget, whatever the weights; on a GPU its device memory, of which a plan's slice of
    weights takes its share (``memory_bytes``).  So plans made from the profile keep the
    dense tier's KV within what placement will give it."""
    known = [int(v) for v in free.values() if v is not None]
    if not known:
        return dense
    if dense.device == "cpu":
        return dataclasses.replace(dense, kv_bytes=float(min(known)))
    return dataclasses.replace(dense, memory_bytes=float(min(known)), workspace_bytes=0.0)


async def _run_shaped(client, profile: Profile, dense: str, attention: list[str], cfg: dict, dtype: str, elem: int,
                      n: int) -> Profile:
    """``profile`` with the costs only a run's shape shows, measured in chains of dense
    jobs and attention round trips (``glinthawk_profile_alternate``).

    One chain is a pipeline one micro-batch deep.  The cold cost is what makes the
    model's layer cycle (the dense job, the request's CPU, the round trip, the attention)
    the measured one: what the alternation costs beyond the parts measured alone (the
    hand-overs between the tiers' threads, attention woken on the sender's core, caches),
    fitted over chains of two job sizes as seconds plus a share of the job
    (:func:`~glinthawk_dask.planner.profile.fit_cold`); the chains' wait between jobs is
    the gap that the dense worker's idle excess is counted from.  On a shared host, two and
    three chains give how much each tier slows the other that many micro-batches deep."""
    m = profile.model
    alts, excess = [], []
    for t in (16, 64):
        x = await _rpc(client, dense, "glinthawk_profile_alternate", address=attention[0], config=cfg, tokens=t,
                       dtype=dtype, n=n)
        nbytes = request_bytes(m, t, elem)
        # the probe's attention: t sequences decoding over a context of one
        known = (profile.msg_cpu(nbytes) + profile.net_s(nbytes)
                 + profile.attention.cost.seconds(*attention_work(m, t, t, elem)))
        alts.append(x)
        excess.append((x["alone"], x["cycle"] - known - x["alone"]))
    factor, seconds = fit_cold(excess)
    # the dense worker's wait between a chain's jobs: the cold cost holds what it adds
    ref = sum(max(0.0, x["cycle"] - x["job"]) for x in alts) / len(alts)
    profile = dataclasses.replace(profile, dense=dataclasses.replace(profile.dense, cold_factor=factor,
                                                                     cold_s=seconds, idle_ref_s=ref))
    if not profile.shared_host:
        return profile
    (fd, fa), (fd3, fa3) = [await _contention(client, dense, attention, k, cfg, dtype, alts[0], n) for k in (2, 3)]
    return dataclasses.replace(profile, dense_slowdown=fd, attention_slowdown=fa, dense_slowdown_3=fd3,
                               attention_slowdown_3=fa3)


async def _network(client, dense, att, cfg, dtype, model_config: ModelConfig, elem: int):
    """Round trip and bandwidth of the data plane (requests answered without compute),
    and the dense compute thread's time per request."""
    points, cpus = [], []
    for t in _PROBE_TOKENS:
        r = await _rpc(client, dense, "glinthawk_probe", address=att, config=cfg, tokens=t, dtype=dtype, n=9,
                       detail=True, echo=True)
        nbytes = request_bytes(model_config, t, elem)
        points.append((nbytes, r["rtt_s"]))
        cpus.append(r["cpu_s"])
    base, gbps = _line([b for b, _ in points], [s for _, s in points])
    cpu_base, cpu_gbps = _line([b for b, _ in points], cpus)
    return base, gbps, cpu_base, cpu_gbps


def _line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Fit ``y = base + x / (GBps * 1e9)``: (base, GBps)."""
    import numpy as np

    a = np.array([[1.0, v] for v in x])
    (base, per_byte), *_ = np.linalg.lstsq(a, np.array(y), rcond=None)
    base = max(float(base), 0.5 * min(y))
    return base, (1e-9 / per_byte if per_byte > 0 else float("inf"))


CONTENTION_REPEATS = 5  # measurements of each contention factor; the median is kept


async def _contention(client, dense, attention: list[str], chains: int, cfg, dtype, one: dict,
                      n: int, repeats: int = CONTENTION_REPEATS) -> tuple[float, float]:
    """How much slower each tier computes while the other one does (same host), in a
    pipeline ``chains`` micro-batches deep: that many chains of a dense job and an
    attention round trip (to as many attention workers as there are, in turn), so that
    each dense job runs while another chain's attention computes.  The dense job
    against a layer back to back; the attention request against ``one`` chain's.

    Each factor is the median of ``repeats`` measurements, run on the same layers in one
    call (a quick profile of the embedded cluster took 7.5 s with five, where one with a
    single measurement had taken 6.0 s): one measurement on a busy 2-core machine gave
    the dense tier x1.16 two deep where others gave x1.43-1.68, and a plan chosen from it
    ran two micro-batches deep at 0.59x of in-process, where one deep ran at 0.70x."""
    r = await _rpc(client, dense, "glinthawk_profile_alternate", address=(attention * chains)[:chains], config=cfg,
                   tokens=16, dtype=dtype, n=n, repeats=repeats)
    return median_factors([(x["job"] / x["alone"], x["attention"] / one["attention"] if one["attention"] > 0 else 1.0)
                           for x in r.get("rounds", [r])])


def median_factors(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """The (dense, attention) slowdowns of repeated measurements: the median of each,
    at least 1 (a tier is never faster for the other's work)."""
    import statistics

    return (max(1.0, statistics.median(d for d, _ in samples)), max(1.0, statistics.median(a for _, a in samples)))


async def cluster_profile(client: Any, model_config: ModelConfig, *, model: str, dtype: str) -> tuple[Profile, float]:
    """The cluster's profile for ``model``: the one kept on the scheduler, else (for a
    cluster on this machine) one kept on disk by an earlier cluster of the same shape
    (``glinthawk.planner.profile-cache``), else measured now (quickly) and kept.  A kept
    one measured or checked long ago is first checked against quick probes of the
    workers (:func:`_probed`).  Returns it with the seconds spent measuring (0 if kept)."""
    info = await client.scheduler.glinthawk_cluster_info()
    key = profile_key(model, dtype, info)
    doc = await client.scheduler.glinthawk_profile_get(key=key)
    kept = Profile.from_json(doc, "the cluster's profile") if doc else None
    disk = None
    if kept is None:
        disk = await _disk_path(client, model_config, dtype, info)
        kept = _read_kept(disk) if disk is not None else None
    if kept is not None:
        probed = await _probed(client, kept, model_config, dtype, info)
        if probed is not None or not doc:  # kept on the scheduler as the workers run now
            await client.scheduler.glinthawk_profile_put(key=key, profile=(probed or kept).to_json())
        if probed is not None:  # and on disk, so the next local cluster need not probe soon
            _keep(disk or await _disk_path(client, model_config, dtype, info), probed)
        return probed or kept, 0.0
    t0 = time.time()
    profile = await measure_profile(client, model_config, model=model, dtype=dtype, quick=True)
    seconds = time.time() - t0
    logger.info("glinthawk profiled the cluster for %s in %.1f s", model, seconds)
    await client.scheduler.glinthawk_profile_put(key=key, profile=profile.to_json())
    _keep(disk, profile)
    return profile, seconds


def _keep(disk, profile: Profile) -> None:
    """Write ``profile`` to ``disk`` (None: not kept on disk), whole or not at all."""
    if disk is None:
        return
    try:
        disk.parent.mkdir(parents=True, exist_ok=True)
        tmp = disk.with_suffix(".tmp")
        profile.save(tmp)
        tmp.replace(disk)
    except OSError as e:  # a read-only home: measure again next time
        logger.warning("glinthawk could not keep the cluster's profile in %s: %s", disk, e)


async def _disk_path(client: Any, model_config: ModelConfig, dtype: str, info: dict):
    """Where a profile of this cluster is kept on disk: only for clusters whose workers
    all run on this machine, named by what decides the costs (the model's shape, dtype,
    tier sizes and threads, this machine, the software)."""
    import hashlib
    import os
    import platform
    from pathlib import Path

    import torch

    from .. import __version__, config

    where = config.get("planner.profile-cache")
    if not where or not info["dense"]:
        return None
    local = {"127.0.0.1", "localhost", "::1", platform.node()}
    if not set(info["hosts"].values()) <= local:
        return None
    pids = await client.run(os.getpid)  # workers in the client's own process (test clusters) differ
    same_process = os.getpid() in pids.values()
    spins = sorted({str(s) for s in (await client.run(_openmp_spin)).values()})  # how idle OpenMP threads wait
    m = model_config
    ident = json.dumps([
        _MEASURES, __version__, torch.__version__, platform.node(), os.cpu_count(), dtype, same_process,
        [m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size],
        len(info["dense"]), len(info["attention"]), config.get("dense.threads"), config.get("attention.threads"),
        spins,
    ])
    return Path(os.path.expanduser(where)) / f"{hashlib.sha256(ident.encode()).hexdigest()[:20]}.json"


async def _probed(client: Any, profile: Profile, model_config: ModelConfig, dtype: str,
                  info: dict) -> Profile | None:
    """A kept ``profile`` checked against the workers as they run now, when it was
    measured (or last checked) over ``glinthawk.planner.profile-probe-after`` seconds
    ago; None when it is more recent than that.

    A dense layer at a few token counts and a few decode attention shapes are measured
    quickly (about a second on the 2-core VM), and each tier's median ratio to the
    costs the profile was measured with is its scale now (:func:`drift_scale`): the
    profile's costs are the measured ones times it
    (:meth:`~glinthawk_dask.planner.profile.Profile.scaled`).  A shared machine's speed
    drifts by a third within hours (a profile kept on disk from a slow hour predicted a
    run 37% low, and a probe found the next day 1.8x faster).  A probe further off than
    :data:`_DRIFT_MAX` caught the workers busy with something else, not a new speed (one
    beside two workers loading tokenizers found the dense tier x6.9): it is logged, the
    scale kept, and the check is not counted as one: a plan a minute later (or
    ``profile-probe-after`` later, if that is shorter) checks again.  The probes wait
    for the attention workers' kernel to be loaded (:func:`_settled`)."""
    import statistics

    from .. import config

    after = config.get("planner.profile-probe-after")
    checked = max(float(profile.extra.get("measured_at") or 0), float(profile.extra.get("probed_at") or 0))
    if after is None or time.time() - checked < float(after) or not info["dense"]:
        return None
    if time.time() - float(profile.extra.get("busy_at") or 0) < min(float(after), _BUSY_RETRY):
        return None  # the last check caught the workers busy a moment ago
    if profile.dense.layer_s is None or not profile._same_model(model_config):
        return None  # a profile written for other shapes: nothing measured here to compare
    await _settled(client, info)
    t0 = time.time()
    cfg = dataclasses.asdict(model_config)
    elem = DTYPES[dtype].itemsize
    try:
        d = await _rpc(client, info["dense"][0], "glinthawk_profile_dense", config=cfg, dtype=dtype,
                       tokens=_DRIFT_TOKENS, rows=None, attention=None, cold=False, rounds=_DRIFT_ROUNDS)
        ratios = {"dense": statistics.median(s / profile.dense_layer_s(model_config, int(t), elem)
                                             for t, s in d["layer_s"])}
        shapes = [s for s in attention_shapes(model_config) if s[2] == 1][:3]  # decode, as most of a run's steps
        if info["attention"] and shapes:
            a = await _rpc(client, info["attention"][0], "glinthawk_profile_attention", config=cfg, shapes=shapes,
                           dtype=dtype)
            ratios["attention"] = statistics.median(s / profile.attention.cost.seconds(kv, flops)
                                                    for kv, flops, s in a["points"])
        if not all(r > 0 for r in ratios.values()):
            raise ValueError(f"probe ratios {ratios}")
    except Exception as e:  # a worker gone or busy failing: plan from the profile as kept, check next time
        logger.warning("glinthawk could not check the cluster's kept profile (%s: %s); planning from it as kept",
                       type(e).__name__, e)
        return None
    seconds = time.time() - t0
    was = {"dense": 1.0, "attention": 1.0, **(profile.extra.get("scale") or {})}
    measured = {tier: ratio * was[tier] for tier, ratio in ratios.items()}  # against the measured costs
    scale = {**was, **{tier: drift_scale(r, was[tier]) for tier, r in measured.items()}}
    busy = any(_busy(r) for r in measured.values())
    notes = []
    for tier, r in measured.items():
        notes.append(f"{tier} x{r:.2f} its measured costs" + (" (a busy moment: not taken)" if _busy(r) else "")
                     + f", scale x{scale[tier]:.2f}")
    logger.info("glinthawk checked the cluster's kept profile in %.1f s: %s%s", seconds, "; ".join(notes),
                "; checked again at the next plan" if busy else "")
    out = profile.scaled(dense=scale["dense"] / was["dense"], attention=scale["attention"] / was["attention"])
    extra = {k: v for k, v in profile.extra.items() if k != "busy_at"}
    extra["scale"] = {tier: float(f"{f:.6g}") for tier, f in scale.items()}
    extra["probe"] = {**{tier: float(f"{r:.4g}") for tier, r in measured.items()}, "seconds": round(seconds, 2)}
    # a busy probe is not a check: the next plan checks again (after _BUSY_RETRY at most)
    extra["busy_at" if busy else "probed_at"] = time.time()
    return dataclasses.replace(out, extra=extra)


def drift_scale(ratio: float, was: float = 1.0) -> float:
    """A tier's scale once a probe ran ``ratio`` times its measured costs, where it was
    ``was``: the ratio, unless within :data:`_DRIFT` of ``was`` (kept, so that noise does
    not move it) or more than :data:`_DRIFT_MAX` from the measured costs (a busy moment:
    kept)."""
    if abs(math.log(ratio / was)) <= math.log1p(_DRIFT) or _busy(ratio):
        return was
    return ratio


def _busy(ratio: float) -> bool:
    """Whether a probe at ``ratio`` times the measured costs caught the workers busy
    (more than :data:`_DRIFT_MAX` off either way) rather than at a new speed."""
    return abs(math.log(ratio)) > math.log(_DRIFT_MAX)


def _openmp_spin() -> str | None:
    import os

    return os.environ.get("GOMP_SPINCOUNT")


def _read_kept(path) -> Profile | None:
    from .. import config

    try:
        mtime = path.stat().st_mtime
        profile = Profile.from_json(json.loads(path.read_text()), str(path))
        if not isinstance(profile.extra.get("measured_at"), (int, float)):  # an earlier version's: when written
            profile = dataclasses.replace(profile, extra={**profile.extra, "measured_at": mtime})
        # trusted for a while after it was measured (a check on reuse rewrites the file, not the age)
        if time.time() - float(profile.extra["measured_at"]) > float(config.get("planner.profile-max-age")):
            return None
        return profile
    except (OSError, ValueError, GlinthawkError):
        return None  # missing, old, torn or from another version: measure again
