"""Hardware profiles: what one dense worker, one attention worker and the network
between them cost, as measured by ``glinthawk profile`` or stated by hand.

A profile is a versioned JSON document (``"glinthawk_profile": 1``)::

    {
      "glinthawk_profile": 1,
      "name": "cpu-vm-2core",
      "source": "how the figures were obtained (measured: when and where; stated: from what)",
      "model": {ModelConfig fields} | null,      # the model the dense curves were measured on
      "dense": {
        "device": "cpu", "dtype": "float32", "threads": 2,
        "layer_s": [[tokens, seconds], ...],       # dense half of one layer (projections, FFN)
        "head_s": [[rows, seconds], ...],          # final norm, LM head and sampling
        "step_s": 0.0004, "step_per_seq_s": 2e-5,  # the driver's cost per micro-batch step
        "cold_factor": 1.5,                        # a job after an idle gap (cold caches) costs this much more
        "cold_s": 3e-4,                            # ... and this many seconds more (the round trip's hand-overs)
        "idle_excess": [[gap_s, seconds], ...] | absent,  # a job after an idle gap of gap_s, against one back to back
        "idle_ref_s": 0.002,                       # the gap the cold cost above was measured at
        "local_factor": 1.1,                       # a layer with its attention here, against the two alone
        "roofline": {"tflops": 500, "mem_GBps": 2300, "overhead_s": 2e-5} | absent,
        "attention": {ATTENTION COSTS} | absent,   # attention on the dense worker (single-tier)
        "kv_bytes": 12e9 | null,                   # KV memory per dense worker (null: not bounded, or
        "memory_bytes": 16e9, "workspace_bytes": 1e9,  # what device memory less weights and workspace leaves)
        "price_per_hour": 0.35 | null
      },
      "attention": {ATTENTION COSTS, "threads": 1, "kv_bytes": 4e9, "price_per_hour": 0.1},
      "network": {"rtt_s": 2e-4, "GBps": 1.0, "msg_cpu_s": 8e-5, "msg_cpu_GBps": 2.0},
      "host": {"shared": true, "dense_slowdown": 1.4, "attention_slowdown": 1.3,   # two micro-batches in flight
               "dense_slowdown_3": 1.8, "attention_slowdown_3": 1.4}       # three or more (absent: as two)
    }

ATTENTION COSTS is ``{"overhead_s", "kv_GBps", "gflops"}``: one layer's attention for a
micro-batch costs ``overhead_s + KV bytes read / kv_GBps + attention FLOPs / gflops``.
``idle_excess`` prices what a longer wait adds: a job after a gap of ``g`` seconds costs
``idle_excess(g) - idle_excess(idle_ref_s)`` more than the cold cost (linear between the
points, from 0 at no gap, held beyond the last).  ``layer_s``/``head_s`` are used for
the profile's own model; for another model the ``roofline`` (if given) or a scaling by
weight bytes stands in.  ``host.shared`` says the
tiers share one machine's cores, and how much each slows the other while both compute.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import GlinthawkError
from ..model.config import ModelConfig

__all__ = ["VERSION", "Curve", "AttentionCost", "DenseProfile", "AttentionProfile", "Profile",
           "load_profile", "shipped_profiles", "ProfileError", "request_bytes", "attention_work", "fit_cold",
           "idle_excess_at"]

VERSION = 1
_SHIPPED = Path(__file__).parent / "profiles"


class ProfileError(GlinthawkError):
    """A profile file that cannot be read (the message says what to fix)."""


@dataclass(frozen=True)
class Curve:
    """A cost against a size, from measured points: linear between them, clamped below
    the first, extended along the last segment above the last."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ProfileError("a curve needs at least one [size, seconds] point")
        object.__setattr__(self, "points", tuple(sorted((float(x), float(y)) for x, y in self.points)))

    def __call__(self, x: float) -> float:
        pts = self.points
        if len(pts) == 1 or x <= pts[0][0]:
            return pts[0][1]
        i = min(bisect.bisect_left(pts, (x,)), len(pts) - 1)  # the segment [i-1, i] holds x (or the last)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return max(y, y1) if x > x1 else y

    def scaled(self, factor: float) -> "Curve":
        """The same curve with every cost ``factor`` times as large."""
        return Curve(tuple((x, y * factor) for x, y in self.points))

    def to_json(self) -> list[list[float]]:
        return [list(p) for p in self.points]


@dataclass(frozen=True)
class AttentionCost:
    """One layer's attention for one micro-batch step: fixed cost, KV read, arithmetic."""

    overhead_s: float
    kv_GBps: float
    gflops: float

    def seconds(self, kv_bytes: float, flops: float) -> float:
        return self.overhead_s + kv_bytes / (self.kv_GBps * 1e9) + flops / (self.gflops * 1e9)

    def scaled(self, factor: float) -> "AttentionCost":
        """The same cost model with every call ``factor`` times as long."""
        return AttentionCost(self.overhead_s * factor, self.kv_GBps / factor, self.gflops / factor)

    @classmethod
    def fit(cls, points: list[tuple[float, float, float]]) -> "AttentionCost":
        """Fit to measured ``(kv_bytes, flops, seconds)`` by non-negative least squares
        over the three coefficients (a tiny active-set solve), in relative terms: each
        point weighs by its own size, so the small calls a decode step makes (where the
        fixed overhead is most of the time) count as much as the large ones (an absolute
        fit let the largest shapes set the slopes and priced the overhead at zero).

        Points whose FLOPs are proportional to their KV bytes (decode shapes alone: one
        query a sequence) cannot tell the two slopes apart; they are fitted to the KV
        read alone (decode attention is bound by it), which gives the same costs for
        such shapes, the same on every machine (the split of a least-squares solve
        between two proportional columns depends on the linear algebra library)."""
        import numpy as np

        w = np.array([1.0 / max(p[2], 1e-12) for p in points])  # [points]
        a = np.array([[1.0, p[0], p[1]] for p in points]) * w[:, None]  # [points, 3]
        b = np.array([p[2] for p in points]) * w  # [points]
        active = [0, 1, 2]
        slopes = a[:, 1:]  # [points, 2]
        norms = np.linalg.norm(slopes, axis=0)  # [2]
        if norms.min() == 0 or np.linalg.svd(slopes / norms, compute_uv=False)[-1] < 1e-9:
            active = [0, 1] if norms[0] > 0 else [0, 2]  # proportional (or one unused): one slope
        while True:
            coef = np.zeros(3)
            if active:
                sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
                coef[active] = sol
            neg = [i for i in active if coef[i] < 0]
            if not neg:
                break
            active.remove(min(neg, key=lambda i: coef[i]))
        return cls(overhead_s=float(coef[0]), kv_GBps=1e-9 / coef[1] if coef[1] > 0 else math.inf,
                   gflops=1e-9 / coef[2] if coef[2] > 0 else math.inf)

    def to_json(self) -> dict:
        return {k: (None if math.isinf(v) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict, where: str) -> "AttentionCost":
        try:
            return cls(overhead_s=float(d.get("overhead_s") or 0.0),
                       kv_GBps=float(d["kv_GBps"]) if d.get("kv_GBps") else math.inf,
                       gflops=float(d["gflops"]) if d.get("gflops") else math.inf)
        except (TypeError, ValueError, AttributeError) as e:
            raise ProfileError(f"{where}: overhead_s, kv_GBps and gflops must be numbers ({e})") from None


def fit_cold(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(cold_factor, cold_s)`` from ``[(alone, excess), ...]``: a dense job of
    ``alone`` seconds measured in a pipeline one micro-batch deep, and what its cycle took
    beyond the parts the model prices apart (the job alone, the request's CPU, the round
    trip, the attention).  The excess is fitted as ``cold_s + (cold_factor - 1) * alone``
    through the two points of the smallest and largest job (least squares would need more
    points than a profile measures), neither term below zero; one point, or jobs of one
    size, give the factor alone.  On the 2-core VM most of the excess is the hand-overs of
    the round trip, the same at every size, which a factor alone overprices for large
    jobs and underprices for small ones."""
    pts = sorted((float(a), max(0.0, float(e))) for a, e in points if a > 0)
    if not pts:
        return 1.0, 0.0
    (a0, e0), (a1, e1) = pts[0], pts[-1]
    if a1 - a0 < 1e-9 * a1:
        return 1.0 + sum(e / a for a, e in pts) / len(pts), 0.0
    slope = (e1 - e0) / (a1 - a0)
    if slope <= 0:  # the excess does not grow with the job: all of it a constant
        return 1.0, sum(e for _, e in pts) / len(pts)
    base = e0 - slope * a0
    if base < 0:  # it grows faster than in proportion: all of it a factor
        return 1.0 + sum(e / a for a, e in pts) / len(pts), 0.0
    return 1.0 + slope, base


def idle_excess_at(points: Sequence[tuple[float, float]], gap: float) -> float:
    """An ``idle_excess`` curve at ``gap``: linear between its points and from 0 at no
    gap, held at the last point beyond it (a wait longer than the profile measured is
    not extrapolated)."""
    x0, y0 = 0.0, 0.0
    for x1, y1 in points:
        if gap <= x1:
            return y0 + (y1 - y0) * (gap - x0) / (x1 - x0) if x1 > x0 else y1
        x0, y0 = x1, y1
    return y0


@dataclass(frozen=True)
class DenseProfile:
    """One dense worker: its layer and head curves, driver cost, memory and price."""

    device: str
    dtype: str
    layer_s: Curve | None
    head_s: Curve | None
    step_s: float = 0.0
    step_per_seq_s: float = 0.0
    cold_factor: float = 1.0  # a job that starts after the worker idled (caches cold) costs this much more
    cold_s: float = 0.0  # ... and this many seconds more (a cycle's hand-overs, whatever the job's size)
    # a job after an idle gap of g seconds costs idle_excess(g) seconds more than one back
    # to back ([(gap, seconds)], rising; None: not measured); the cold cost above already
    # holds what a gap of idle_ref_s adds (see idle_extra)
    idle_excess: tuple[tuple[float, float], ...] | None = None
    idle_ref_s: float = 0.0
    # a layer with its attention computed here costs this much more than the dense half
    # and the attention, each measured alone (the two share the caches in a run)
    local_factor: float = 1.0
    threads: int | None = None
    roofline: dict | None = None  # {"tflops", "mem_GBps", "overhead_s"}
    attention: AttentionCost | None = None
    kv_bytes: float | None = None
    price_per_hour: float | None = None
    memory_bytes: float | None = None  # device memory; with no kv_bytes, KV gets what weights leave
    workspace_bytes: float = 0.0  # kept free for activations and the runtime

    def idle_extra(self, gap: float) -> float:
        """Seconds a dense job after ``gap`` seconds idle costs beyond the cold cost (which
        was measured after gaps of ``idle_ref_s``): 0 without an ``idle_excess`` curve."""
        if not self.idle_excess:
            return 0.0
        return max(0.0, idle_excess_at(self.idle_excess, gap) - idle_excess_at(self.idle_excess, self.idle_ref_s))

    def kv_budget(self, weight_bytes: float) -> float | None:
        """KV bytes a dense worker holding ``weight_bytes`` of weights may use (None: unbounded)."""
        if self.kv_bytes is not None:
            return self.kv_bytes
        if self.memory_bytes is not None:
            return self.memory_bytes - self.workspace_bytes - weight_bytes
        return None


@dataclass(frozen=True)
class AttentionProfile:
    """One attention worker: its attention costs, KV memory and price."""

    cost: AttentionCost
    threads: int | None = None
    kv_bytes: float | None = None
    price_per_hour: float | None = None
    # each attention worker's KV bytes free for a new run now, roomiest first (auto plans
    # set it from the cluster, where other runs may hold KV; not kept in profile files)
    kv_free: tuple[float, ...] | None = None

    def kv_cap(self, workers: int) -> float | None:
        """KV bytes per worker a plan on ``workers`` attention workers may use: placement
        takes the roomiest, so the least roomy of those (``kv_bytes`` without ``kv_free``)."""
        if self.kv_free:
            return self.kv_free[min(max(1, workers), len(self.kv_free)) - 1]
        return self.kv_bytes


@dataclass(frozen=True)
class Profile:
    """Costs of one kind of dense worker, one kind of attention worker and their network."""

    name: str
    source: str
    dense: DenseProfile
    attention: AttentionProfile
    rtt_s: float = 0.0  # data-plane round trip of a small message (no compute)
    net_GBps: float = math.inf  # payload bandwidth
    msg_cpu_s: float = 0.0  # the dense worker's compute-thread time per attention request
    msg_cpu_GBps: float = math.inf  # ... and per byte it carries
    shared_host: bool = False
    dense_slowdown: float = 1.0  # a dense job while attention computes on the same cores, two micro-batches deep
    attention_slowdown: float = 1.0  # and the other way round
    dense_slowdown_3: float | None = None  # the same three or more micro-batches deep (None: as two)
    attention_slowdown_3: float | None = None
    model: ModelConfig | None = None
    extra: dict = field(default_factory=dict)  # fields this version does not read, kept

    # -- costs ---------------------------------------------------------------------
    def slowdowns(self, depth: int) -> tuple[float, float]:
        """(dense, attention) slowdown while both tiers compute on a shared host, for a
        pipeline ``depth`` micro-batches deep (1.0 each where the tiers do not share)."""
        if not self.shared_host:
            return 1.0, 1.0
        if depth >= 3:
            return self.dense_slowdown_3 or self.dense_slowdown, self.attention_slowdown_3 or self.attention_slowdown
        return self.dense_slowdown, self.attention_slowdown

    def dense_layer_s(self, model: ModelConfig, tokens: int, elem: int) -> float:
        """One layer's dense half for ``tokens`` tokens of ``model``."""
        d = self.dense
        if d.layer_s is not None and self._same_model(model):
            return d.layer_s(tokens)
        if d.roofline:
            return _roofline(d.roofline, _layer_params(model), tokens, elem)
        if d.layer_s is not None and self.model is not None:  # scale by the weights read
            return d.layer_s(tokens) * _layer_params(model) / _layer_params(self.model)
        raise ProfileError(f"profile {self.name!r} has no dense layer curve and no roofline")

    def head_s(self, model: ModelConfig, rows: int, elem: int) -> float:
        """Final norm, LM head and sampling for ``rows`` sampled rows."""
        if rows <= 0:
            return 0.0
        d = self.dense
        params = model.vocab_size * model.dim
        if d.head_s is not None and self._same_model(model):
            return d.head_s(rows)
        if d.roofline:
            return _roofline(d.roofline, params, rows, elem)
        if d.head_s is not None and self.model is not None:
            return d.head_s(rows) * params / (self.model.vocab_size * self.model.dim)
        return 0.0

    def net_s(self, nbytes: float) -> float:
        """One round trip carrying ``nbytes`` in all."""
        return self.rtt_s + nbytes / (self.net_GBps * 1e9)

    def msg_cpu(self, nbytes: float) -> float:
        """The dense worker's compute-thread seconds to send one request of ``nbytes`` and
        read its reply."""
        return self.msg_cpu_s + nbytes / (self.msg_cpu_GBps * 1e9)

    def scaled(self, dense: float = 1.0, attention: float = 1.0) -> "Profile":
        """This profile with the dense worker's compute ``dense`` times as slow (its layer
        and head curves, driver, cold cost, idle excess, roofline, local attention and the
        compute thread's time per request) and the attention worker's ``attention``
        times: what a kept profile becomes when quick probes find the workers faster or
        slower than when it was measured.  The network and the contention factors are kept."""
        d = self.dense
        r = d.roofline
        roof = r and {**r, "tflops": float(r["tflops"]) / dense, "mem_GBps": float(r["mem_GBps"]) / dense,
                      "overhead_s": float(r.get("overhead_s") or 0.0) * dense}
        dense_profile = dataclasses.replace(
            d, layer_s=d.layer_s and d.layer_s.scaled(dense), head_s=d.head_s and d.head_s.scaled(dense),
            step_s=d.step_s * dense, step_per_seq_s=d.step_per_seq_s * dense, cold_s=d.cold_s * dense,
            idle_excess=d.idle_excess and tuple((g, e * dense) for g, e in d.idle_excess), roofline=roof,
            attention=d.attention and d.attention.scaled(dense))
        return dataclasses.replace(
            self, dense=dense_profile,
            attention=dataclasses.replace(self.attention, cost=self.attention.cost.scaled(attention)),
            msg_cpu_s=self.msg_cpu_s * dense, msg_cpu_GBps=self.msg_cpu_GBps / dense)

    def _same_model(self, model: ModelConfig) -> bool:
        m = self.model
        return m is not None and (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size) == (
            model.dim, model.n_layers, model.n_heads, model.n_kv_heads, model.ffn_dim, model.vocab_size)

    # -- JSON ----------------------------------------------------------------------
    def to_json(self) -> dict:
        d, a = self.dense, self.attention
        dense = {"device": d.device, "dtype": d.dtype, "threads": d.threads,
                 "layer_s": d.layer_s.to_json() if d.layer_s else None,
                 "head_s": d.head_s.to_json() if d.head_s else None,
                 "step_s": d.step_s, "step_per_seq_s": d.step_per_seq_s, "cold_factor": d.cold_factor,
                 "cold_s": d.cold_s, "local_factor": d.local_factor, "kv_bytes": d.kv_bytes,
                 "price_per_hour": d.price_per_hour,
                 "memory_bytes": d.memory_bytes, "workspace_bytes": d.workspace_bytes}
        if d.idle_excess:
            dense["idle_excess"] = [list(p) for p in d.idle_excess]
            dense["idle_ref_s"] = d.idle_ref_s
        if d.roofline:
            dense["roofline"] = d.roofline
        if d.attention:
            dense["attention"] = d.attention.to_json()
        out = {
            "glinthawk_profile": VERSION, "name": self.name, "source": self.source,
            "model": dataclasses.asdict(self.model) if self.model else None,
            "dense": dense,
            "attention": {**a.cost.to_json(), "threads": a.threads, "kv_bytes": a.kv_bytes,
                          "price_per_hour": a.price_per_hour},
            "network": {"rtt_s": self.rtt_s, "GBps": None if math.isinf(self.net_GBps) else self.net_GBps,
                        "msg_cpu_s": self.msg_cpu_s,
                        "msg_cpu_GBps": None if math.isinf(self.msg_cpu_GBps) else self.msg_cpu_GBps},
            "host": {"shared": self.shared_host, "dense_slowdown": self.dense_slowdown,
                     "attention_slowdown": self.attention_slowdown,
                     **({"dense_slowdown_3": self.dense_slowdown_3} if self.dense_slowdown_3 else {}),
                     **({"attention_slowdown_3": self.attention_slowdown_3} if self.attention_slowdown_3 else {})},
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, doc: Any, where: str = "profile") -> "Profile":
        if not isinstance(doc, dict) or "glinthawk_profile" not in doc:
            raise ProfileError(f"{where} is not a glinthawk profile (no \"glinthawk_profile\" version field)")
        if doc["glinthawk_profile"] != VERSION:
            raise ProfileError(f"{where} is profile version {doc['glinthawk_profile']}; this glinthawk reads "
                               f"version {VERSION}: measure it again with `glinthawk profile`")
        try:
            dn, at = doc["dense"], doc["attention"]
            net, host = doc.get("network") or {}, doc.get("host") or {}
            model = ModelConfig(**doc["model"]) if doc.get("model") else None
            layer = Curve(tuple(map(tuple, dn["layer_s"]))) if dn.get("layer_s") else None
            head = Curve(tuple(map(tuple, dn["head_s"]))) if dn.get("head_s") else None
            if layer is None and not dn.get("roofline"):
                raise ProfileError(f"{where}: dense needs layer_s points or a roofline")
            dense = DenseProfile(
                device=str(dn.get("device", "?")), dtype=str(dn.get("dtype", "float32")), layer_s=layer, head_s=head,
                step_s=float(dn.get("step_s") or 0.0), step_per_seq_s=float(dn.get("step_per_seq_s") or 0.0),
                cold_factor=float(dn.get("cold_factor") or 1.0), cold_s=float(dn.get("cold_s") or 0.0),
                idle_excess=_idle_points(dn.get("idle_excess"), where), idle_ref_s=float(dn.get("idle_ref_s") or 0.0),
                local_factor=float(dn.get("local_factor") or 1.0),
                threads=dn.get("threads"), roofline=dn.get("roofline"),
                attention=AttentionCost.from_json(dn["attention"], f"{where} dense.attention")
                if dn.get("attention") else None,
                kv_bytes=_opt(dn.get("kv_bytes")), price_per_hour=_opt(dn.get("price_per_hour")),
                memory_bytes=_opt(dn.get("memory_bytes")), workspace_bytes=float(dn.get("workspace_bytes") or 0.0),
            )
            attention = AttentionProfile(
                cost=AttentionCost.from_json(at, f"{where} attention"), threads=at.get("threads"),
                kv_bytes=_opt(at.get("kv_bytes")), price_per_hour=_opt(at.get("price_per_hour")),
            )
            known = {"glinthawk_profile", "name", "source", "model", "dense", "attention", "network", "host"}
            return cls(
                name=str(doc.get("name", where)), source=str(doc.get("source", "")), dense=dense,
                attention=attention, rtt_s=float(net.get("rtt_s") or 0.0),
                net_GBps=float(net["GBps"]) if net.get("GBps") else math.inf,
                msg_cpu_s=float(net.get("msg_cpu_s") or 0.0),
                msg_cpu_GBps=float(net["msg_cpu_GBps"]) if net.get("msg_cpu_GBps") else math.inf,
                shared_host=bool(host.get("shared", False)),
                dense_slowdown=float(host.get("dense_slowdown") or 1.0),
                attention_slowdown=float(host.get("attention_slowdown") or 1.0),
                dense_slowdown_3=_opt(host.get("dense_slowdown_3")),
                attention_slowdown_3=_opt(host.get("attention_slowdown_3")), model=model,
                extra={k: v for k, v in doc.items() if k not in known},
            )
        except ProfileError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{where}: malformed profile ({type(e).__name__}: {e})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def _idle_points(points: Any, where: str) -> tuple[tuple[float, float], ...] | None:
    """A profile's ``idle_excess`` points, sorted by gap (None where absent or empty)."""
    if not points:
        return None
    try:
        pts = tuple(sorted((float(g), float(e)) for g, e in points))
    except (TypeError, ValueError) as e:
        raise ProfileError(f"{where}: dense.idle_excess must be [[gap_s, seconds], ...] ({e})") from None
    if pts[0][0] <= 0:
        raise ProfileError(f"{where}: dense.idle_excess gaps must be above 0 seconds")
    return pts


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile from a JSON file, or a shipped one by name (see :func:`shipped_profiles`)."""
    p = Path(name_or_path)
    if not p.exists():
        shipped = _SHIPPED / f"{name_or_path}.json"
        if not shipped.exists():
            raise ProfileError(f"no profile file {str(name_or_path)!r} and no shipped profile of that name "
                               f"(shipped: {', '.join(shipped_profiles())}); measure one with `glinthawk profile`")
        p = shipped
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"cannot read profile {str(p)!r}: {e}") from None
    return Profile.from_json(doc, str(p))


def shipped_profiles() -> list[str]:
    """Names of the profiles that come with glinthawk."""
    return sorted(p.stem for p in _SHIPPED.glob("*.json"))


def request_bytes(model: ModelConfig, tokens: int, elem: int) -> int:
    """Bytes one attention round trip of ``tokens`` tokens carries: q, k, v out and o back."""
    return tokens * (2 * model.q_size + 2 * model.kv_size) * elem


def attention_work(model: ModelConfig, kv_read: int, attn_units: int, elem: int) -> tuple[float, float]:
    """What one layer's attention costs by (:meth:`AttentionCost.seconds` takes it): KV
    bytes read for ``kv_read`` cached positions (k and v), and FLOPs for ``attn_units``
    (query token, key position) pairs (q.k and the weighted sum of v)."""
    return kv_read * model.kv_size * 2 * elem, 4.0 * attn_units * model.q_size


def _opt(x: Any) -> float | None:
    return None if x is None else float(x)


def _layer_params(m: ModelConfig) -> int:
    """Weights of one layer's dense half: q, k, v, o projections and the gated FFN."""
    return m.dim * (m.q_size + 2 * m.kv_size) + m.q_size * m.dim + 3 * m.dim * m.ffn_dim


def _roofline(r: dict, params: int, tokens: int, elem: int) -> float:
    """Seconds to multiply ``tokens`` rows through ``params`` weights: bound by reading
    the weights or by the arithmetic, plus a fixed cost."""
    read = params * elem / (float(r["mem_GBps"]) * 1e9)
    math_s = 2.0 * params * tokens / (float(r["tflops"]) * 1e12)
    return float(r.get("overhead_s") or 0.0) + max(read, math_s)
