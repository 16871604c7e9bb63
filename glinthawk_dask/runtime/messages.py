"""The messages of a run, typed: what the client, the driver and the two tiers send
each other, and the run's placement.

Each message is a dataclass with ``to_wire()`` (plain msgpack-able data: ints,
floats, strings, lists, dicts) and ``from_wire()`` (its inverse; lists that msgpack
gave back as tuples become lists again).  Nothing here is pickled.

* :class:`Plan`: where a run goes (the scheduler plugin places it, the client reads it);
* :class:`SliceSpec`: what a dense worker needs to take part in a run (client → dense);
* :class:`StepMessage`: one micro-batch step (driver → every slice, forwarded slice to slice);
* :class:`StepLayout`: the step's layout as an attention worker's cache sees it, and
  :class:`AttendRequest` / :class:`AttendReply` (dense ↔ attention, per layer);
* :class:`ForwardRequest` / :class:`ForwardReply` (slice → next slice: hidden states in, tokens back);
* :class:`Results`: what a run finished since the last poll (driver → client).

Tensors in messages of distributed's rpc travel as ``{"dtype", "shape", "data"}``
(:func:`pack`, :func:`unpack`) where ``data`` is a numpy byte view wrapped for
distributed's zero-copy frame serialization; bfloat16 (which numpy lacks) travels as
its 16-bit pattern.  The data plane has its own frames (:mod:`~.wire`): there the
tensors travel beside a message, not inside it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from distributed.protocol import to_serialize

from .wire import CARRIERS, DTYPE_NAMES, DTYPES

__all__ = [
    "AttendReply", "AttendRequest", "DTYPES", "ForwardReply", "ForwardRequest", "Plan", "Results",
    "SliceSpec", "StepLayout", "StepMessage", "pack", "unpack",
]

W = TypeVar("W", bound="_Wire")


def lists(x: Any) -> Any:
    """msgpack gives tuples back for lists: restore lists (nested ones too)."""
    if isinstance(x, (list, tuple)):
        return [lists(v) for v in x]
    if isinstance(x, dict):
        return {k: lists(v) for k, v in x.items()}
    return x


class _Wire:
    """``to_wire``/``from_wire`` for a dataclass of plain fields."""

    def to_wire(self) -> dict[str, Any]:
        """This message as plain msgpack-able data (its fields as they are: msgpack packs
        tuples as lists, and :meth:`from_wire` turns them back into lists)."""
        return {name: getattr(self, name) for name in _fields(type(self))}

    @classmethod
    def from_wire(cls: type[W], d: dict[str, Any]) -> W:
        """The message ``to_wire`` gave (after a trip through msgpack)."""
        unknown = d.keys() - _fields(cls)
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}: the peer runs another "
                             "version of glinthawk-dask; run the same version on every worker and client")
        return cls(**{k: lists(v) for k, v in d.items()})


@functools.cache
def _fields(cls: type) -> frozenset[str]:
    """The field names of a message class (looked up once: messages go by per layer)."""
    return frozenset(f.name for f in dataclasses.fields(cls))


# -- placement ---------------------------------------------------------------------------


@dataclass
class Plan(_Wire):
    """The placement of one run.

    Micro-batch ``m`` has ``sizes[m]`` slots and, on every slice, keeps its KV either on
    the slice's dense worker (``local[m]``: attention in the dense worker's own compute
    job) or on an attention worker (``attention[s][m]``).  Local micro-batches come
    first.  ``slot_base[s][m]`` is the micro-batch's first slot in the cache that holds
    it (the dense worker's or the attention worker's)."""

    mode: str
    slices: list[list[int]]  # per slice: [start, stop) layers
    dense: list[str]  # address per slice
    attention: list[list[str]] = field(default_factory=list)  # per slice: address per micro-batch ("" if local)
    slot_base: list[list[int]] = field(default_factory=list)  # per slice: first slot per micro-batch
    n_slots: list[dict[str, int]] = field(default_factory=list)  # per slice: slots per attention worker
    micro_batch_size: int = 1  # of the remote micro-batches (of all, in single-tier mode)
    n_micro_batches: int = 1
    max_seq_len: int = 1
    local: list[bool] = field(default_factory=list)  # per micro-batch: KV on the dense worker
    sizes: list[int] = field(default_factory=list)  # slots per micro-batch
    dense_kv: dict[str, int] = field(default_factory=dict)  # KV bytes reserved on each dense worker
    kv_bytes_per_token_layer: int = 0  # of the run's dtype
    # per slice: the cache (kv run id) holding each micro-batch ("": the run's own); set once a run grows
    kv_runs: list[list[str]] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)  # micro-batches that admit no more (the run grew past them)

    def live_sizes(self) -> list[int]:
        """Slots of the micro-batches that still admit requests."""
        return [n for m, n in enumerate(self.sizes) if m not in self.retired]

    def grown(self, new: "Plan", kv_runs: list[str], keep: bool = False) -> "Plan":
        """This plan with ``new``'s micro-batches (remote ones, placed by the scheduler for
        the same slices) after its own, each slice's in cache ``kv_runs[s]``; its own
        micro-batches retired, unless ``keep``."""
        n = self.n_micro_batches
        own = self.kv_runs or [[""] * n for _ in self.slices]
        n_slots = [dict(a) for a in self.n_slots] or [{} for _ in self.slices]
        for s, slots in enumerate(new.n_slots):
            for addr, k in slots.items():
                n_slots[s][addr] = n_slots[s].get(addr, 0) + k
        return dataclasses.replace(
            self, attention=[a + b for a, b in zip(self.attention, new.attention)],
            slot_base=[a + b for a, b in zip(self.slot_base, new.slot_base)], n_slots=n_slots,
            micro_batch_size=new.micro_batch_size, n_micro_batches=n + new.n_micro_batches,
            local=self.local + new.local, sizes=self.sizes + new.sizes,
            kv_runs=[own[s] + [kv_runs[s]] * new.n_micro_batches for s in range(len(self.slices))],
            retired=sorted(set(self.retired) | (set() if keep else set(range(n)))),
        )

    def resized(self, mb: int, n: int) -> "Plan":
        """This plan with remote micro-batch ``mb`` of ``n`` slots (its caches resized in
        place on every slice)."""
        old = self.sizes[mb]
        n_slots = [dict(a) for a in self.n_slots]
        for s, addrs in enumerate(self.attention):
            if addrs[mb]:
                n_slots[s][addrs[mb]] = n_slots[s].get(addrs[mb], 0) + n - old
        sizes = list(self.sizes)
        sizes[mb] = n
        live = [k for m, k in enumerate(sizes) if not self.local[m] and m not in self.retired]
        return dataclasses.replace(self, sizes=sizes, n_slots=n_slots, micro_batch_size=max(live or sizes))

    def moved(self, s: int, mb: int, address: str, kv_run: str) -> "Plan":
        """This plan with remote micro-batch ``mb`` of slice ``s`` moved to attention worker
        ``address``, alone in its cache ``kv_run`` from slot 0 (its worker was lost)."""
        attention, slot_base = [list(a) for a in self.attention], [list(b) for b in self.slot_base]
        kv_runs = [list(k) for k in self.kv_runs] or [[""] * self.n_micro_batches for _ in self.slices]
        n_slots = [dict(a) for a in self.n_slots]
        old = attention[s][mb]
        n_slots[s][old] = n_slots[s].get(old, 0) - self.sizes[mb]
        if n_slots[s][old] <= 0:
            del n_slots[s][old]
        n_slots[s][address] = n_slots[s].get(address, 0) + self.sizes[mb]
        attention[s][mb], slot_base[s][mb], kv_runs[s][mb] = address, 0, kv_run
        return dataclasses.replace(self, attention=attention, slot_base=slot_base, kv_runs=kv_runs, n_slots=n_slots)

    def attention_workers(self) -> list[str]:
        """Every attention worker holding a cache of the run at the start (sorted)."""
        return sorted({a for slots in self.n_slots for a in slots})

    def attention_kv(self) -> dict[str, int]:
        """KV bytes the run takes on each attention worker (by address), for the
        micro-batches that still admit requests (a grown run's drained ones gave theirs back)."""
        if not self.retired:
            slots_at = self.n_slots
        else:
            slots_at = [{} for _ in self.slices]
            for s, addrs in enumerate(self.attention):
                for m, addr in enumerate(addrs):
                    if addr and m not in self.retired:
                        slots_at[s][addr] = slots_at[s].get(addr, 0) + self.sizes[m]
        seq = self.kv_bytes_per_token_layer * self.max_seq_len
        out: dict[str, int] = {}
        for (a, b), slots in zip(self.slices, slots_at):
            for addr, n in slots.items():
                out[addr] = out.get(addr, 0) + n * (b - a) * seq
        return out

    def kv_bytes(self) -> dict[str, int]:
        """KV bytes the run reserved on each tier (summed over its workers)."""
        return {"dense": int(sum(self.dense_kv.values())), "attention": int(sum(self.attention_kv().values()))}


@dataclass
class SliceSpec(_Wire):
    """What a dense worker needs to take part in a run."""

    run_id: str
    model: str
    start: int
    stop: int
    micro_batch_size: int
    n_micro_batches: int
    max_seq_len: int
    mode: str = "two-tier"  # or "single-tier" or "hybrid"
    dtype: str = "float32"
    device: str | None = None
    next_address: str | None = None  # the next slice's dense worker
    attention: list[str] = field(default_factory=list)  # attention worker of each micro-batch ("": local)
    slot_base: list[int] = field(default_factory=list)  # first slot of each micro-batch in the cache holding it
    local: list[bool] = field(default_factory=list)  # per micro-batch: KV on this worker (default: single-tier)
    sizes: list[int] = field(default_factory=list)  # slots per micro-batch (default: micro_batch_size each)
    latency: float = 0.0  # induced delay of every inter-tier message, seconds
    peer_timeout: float = 60.0  # a peer that does not answer within this is treated as lost
    slice_index: int = 0
    dense: list[str] = field(default_factory=list)  # every slice's dense worker (the driver reroutes)
    slices: list[list[int]] = field(default_factory=list)  # every slice's [start, stop) layers
    engine: dict = field(default_factory=dict)  # first slice: scheduler settings

    @classmethod
    def of_plan(cls, plan: Plan, s: int, **kw: Any) -> "SliceSpec":
        """Slice ``s`` of ``plan`` (``kw``: the run's other settings)."""
        a, b = plan.slices[s]
        return cls(
            start=a, stop=b, micro_batch_size=plan.micro_batch_size, n_micro_batches=plan.n_micro_batches,
            max_seq_len=plan.max_seq_len, mode=plan.mode,
            next_address=plan.dense[s + 1] if s + 1 < len(plan.dense) else None,
            attention=list(plan.attention[s]) if plan.attention else [],
            slot_base=list(plan.slot_base[s]) if plan.slot_base else [],
            local=list(plan.local), sizes=list(plan.sizes), slice_index=s, dense=list(plan.dense),
            slices=lists(plan.slices), **kw,
        )


# -- a step through the slices -----------------------------------------------------------


@dataclass
class StepMessage(_Wire):
    """One step of micro-batch ``mb``, as the driver plans it (slots are the driver's
    numbering: each slice maps them to the cache that holds the micro-batch)."""

    mb: int
    step: int  # the micro-batch's step number (from 1)
    slots: list[int]  # per segment
    starts: list[int]  # per segment: position of its first token
    counts: list[int]  # per segment: tokens
    input_ids: list[int]  # [T] tokens of all segments end to end
    admitted: list[list]  # [seq id, slot, sampling params as a dict] of sequences new in a slot
    released: list[str]  # sequences whose slots are free again
    sample_rows: list[int]  # row of each sampled sequence's last token
    sample: list[str]  # ids of the sampled sequences


@dataclass
class StepLayout(_Wire):
    """A step's segments in the slots of the cache that holds its micro-batch."""

    slots: list[int]
    starts: list[int]
    counts: list[int]
    admitted: list[list]  # [seq id, slot]
    released: list[str]


@dataclass
class AttendRequest(_Wire):
    """Attention for one layer of a micro-batch step (the tensors q [T, H, D] and k, v
    [T, KVH, D] travel beside it).  The first layer of a step carries its ``layout``;
    the following layers refer to it by ``step``."""

    run_id: str  # the cache: the run's own, or one opened for a micro-batch that moved
    micro_batch: int
    step: int
    layer: int
    layout: dict | None = None  # StepLayout.to_wire()

    # one per layer and micro-batch: written out, not walked field by field (the attention
    # worker's handler takes these fields as its arguments: no from_wire on the hot path)
    def to_wire(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "micro_batch": self.micro_batch, "step": self.step, "layer": self.layer,
                "layout": self.layout}


@dataclass
class AttendReply(_Wire):
    """Attention outputs ``o`` [T, H, D], or why the request was refused (``stale``:
    the run or the step's layout is not held there, nothing was applied)."""

    o: Any = None
    stale: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"o": self.o} if self.stale is None else {"stale": self.stale}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "AttendReply":
        if len(d) == 1 and ("o" in d or "stale" in d):  # one per layer and micro-batch: the short way
            return cls(o=d.get("o"), stale=d.get("stale"))
        return super().from_wire(d)


@dataclass
class ForwardRequest(_Wire):
    """A step's hidden states for the next slice (``x`` [T, dim] travels beside it)."""

    run_id: str
    msg: dict  # StepMessage.to_wire()


@dataclass
class ForwardReply(_Wire):
    """The tokens the last slice sampled for a step."""

    tokens: list[int]


# -- driver → client ---------------------------------------------------------------------


@dataclass
class Results(_Wire):
    """What a run did since the caller's last poll."""

    completions: list[dict]  # Completion fields
    moves: list[dict]  # micro-batches moved to another attention worker (recovery records)
    retired: list[dict]  # micro-batches a grown run drained and closed (records, see RunDriver.grow)
    error: str | None
    worker_failure: bool  # the error means a lost or wedged worker: the run can restart
    in_flight_tokens: int  # tokens whose KV the run held when it failed (0 while it runs)
    n_submitted: int
    n_done: int
    n_steps: int
    n_tokens: int
    n_generated: int


# -- tensors in rpc messages -------------------------------------------------------------


def pack(t: torch.Tensor) -> dict[str, Any]:
    """A tensor (any device) → a message field."""
    if t.dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot send tensors of dtype {t.dtype}")
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    arr = t.view(CARRIERS.get(t.dtype, t.dtype)).numpy()
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data": to_serialize(arr)}


def unpack(d: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
    """A message field → a tensor on ``device``."""
    dtype = DTYPES[d["dtype"]]
    arr = np.asarray(d["data"])
    if not arr.flags.writeable:
        arr = arr.copy()
    t = torch.from_numpy(arr).view(dtype).reshape(d["shape"])
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)
