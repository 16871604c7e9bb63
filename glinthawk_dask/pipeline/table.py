"""Reading the output of a pipeline: its committed rows, whole or a row chunk at a time.

The layout is described in :mod:`.layout`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from functools import cached_property
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import zarr

from ..engine.request import FINISH_ERROR, sampled_tokens
from .layout import OFFSETS, ROW_COLUMNS, TOKEN_IDS, Location, OutputError, committed_arrays, storage_access

__all__ = ["OutputTable", "read_output"]


def read_output(url: str, *, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> OutputTable:
    """Open the output at ``url`` for reading: its committed rows only."""
    location = Location.parse(url, storage_options)
    with storage_access(url, "read"):
        meta = location.existing_meta()
        if meta is None:
            raise OutputError(f"there is no glinthawk output at {url}")
        group = zarr.open_group(location.store(read_only=True), mode="r")
        return OutputTable(url, meta, committed_arrays(url, group, meta))


class OutputTable:
    """The committed rows of an output, read from Zarr on demand.

    ``attrs`` is the ``glinthawk`` attribute dict; ``columns`` loads the per-row arrays
    whole; :meth:`batches` and :meth:`records` stream one row chunk at a time.
    """

    def __init__(self, url: str, attrs: dict[str, Any], arrays: dict[str, zarr.Array]):
        self.url = url
        self.attrs = attrs
        self._arrays = arrays

    def __len__(self) -> int:
        return self.attrs["rows"]

    def __repr__(self) -> str:
        return f"OutputTable({self.url!r}, rows={len(self)}, model={self.attrs.get('model')!r})"

    @cached_property
    def columns(self) -> dict[str, np.ndarray]:
        """Every per-row array (not the flat token ids: see :meth:`token_ids`), committed rows only."""
        return self._read(ROW_COLUMNS, 0, len(self))

    def token_ids(self, i: int) -> list[int]:
        """The completion token ids of row ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        start = int(self._arrays[OFFSETS][i])
        return self._arrays[TOKEN_IDS][start : start + int(self._arrays["completion_tokens"][i])].tolist()

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The committed rows a row chunk at a time: the per-row arrays, plus ``completion_token_ids``
        holding the batch's ids end to end, with ``completion_offsets`` counted from its start."""
        size = self._arrays["id"].chunks[0]
        for start in range(0, len(self), size):
            batch = self._read(ROW_COLUMNS, start, min(start + size, len(self)))
            first = int(batch[OFFSETS][0])
            last = int(batch[OFFSETS][-1] + batch["completion_tokens"][-1])
            batch[TOKEN_IDS] = self._arrays[TOKEN_IDS][first:last]
            batch[OFFSETS] = batch[OFFSETS] - first
            yield batch

    def records(self) -> Iterator[dict[str, Any]]:
        """The committed rows as JSON-able records (the shape :meth:`ZarrSink.append` takes).

        ``error`` and unknown timings are None; a prompt stored as JSON is decoded.
        """
        for batch in self.batches():
            for j in range(len(batch["id"])):
                yield _record(batch, j)

    def to_pandas(self) -> Any:
        """The committed rows as a ``pandas.DataFrame``, with the columns of :meth:`records`
        (``error`` None when there is none; unknown timings NaN).  Loads the whole output."""
        import pandas as pd

        c = self.columns
        flat = self._arrays[TOKEN_IDS][: self.attrs["tokens"]]
        return pd.DataFrame({
            "id": c["id"].tolist(),
            "prompt": [json.loads(p) if j else p for p, j in zip(c["prompt"].tolist(), c["prompt_is_json"])],
            "completion": c["completion"].tolist(),
            TOKEN_IDS: [flat[o : o + n].tolist() for o, n in zip(c[OFFSETS], c["completion_tokens"])],
            "finish_reason": c["finish_reason"].tolist(),
            "error": [e or None for e in c["error"].tolist()],
            "prompt_tokens": c["prompt_tokens"].astype(np.int64),
            "completion_tokens": c["completion_tokens"].astype(np.int64),
            "time_to_first_token": c["time_to_first_token"].astype(np.float64),
            "time_per_token": c["time_per_token"].astype(np.float64),
        })

    def summary(self) -> dict[str, Any]:
        """Row and token counts, finish reasons, mean timings (None when unknown)."""
        c = self._read(["finish_reason", "prompt_tokens", "completion_tokens", "time_to_first_token",
                        "time_per_token"], 0, len(self))
        reasons = Counter(str(r) for r in c["finish_reason"])
        return {
            "rows": len(self),
            "errors": reasons.get(FINISH_ERROR, 0),
            "prompt_tokens": int(c["prompt_tokens"].sum(dtype=np.int64)),
            "completion_tokens": int(c["completion_tokens"].sum(dtype=np.int64)),
            "finish_reasons": dict(reasons),
            "mean_time_to_first_token": _mean(c["time_to_first_token"]),
            "mean_time_per_token": _mean(c["time_per_token"]),
        }

    def lengths(self, n: int = 256) -> list[tuple[int, int]]:
        """``(prompt tokens, tokens sampled)`` of up to ``n`` rows spread evenly over the
        committed ones that did not fail: how long the rows of this dataset are, to plan by.
        A row that stopped at a stop token sampled it too (the output leaves it out)."""
        c = self._read(["prompt_tokens", "completion_tokens", "finish_reason"], 0, len(self))
        ok = np.flatnonzero(c["finish_reason"] != FINISH_ERROR)
        picked = ok[np.linspace(0, len(ok) - 1, min(n, len(ok))).round().astype(int)] if len(ok) else ok
        return [(int(c["prompt_tokens"][i]), sampled_tokens(int(c["completion_tokens"][i]), c["finish_reason"][i]))
                for i in picked]

    def _read(self, names: Iterable[str], start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: self._arrays[name][start:stop] for name in names}


def _record(batch: Mapping[str, np.ndarray], j: int) -> dict[str, Any]:
    """Row ``j`` of a batch from :meth:`OutputTable.batches` as a record."""
    start, n = int(batch[OFFSETS][j]), int(batch["completion_tokens"][j])
    prompt = str(batch["prompt"][j])
    return {
        "id": str(batch["id"][j]),
        "prompt": json.loads(prompt) if batch["prompt_is_json"][j] else prompt,
        "completion": str(batch["completion"][j]),
        "completion_token_ids": batch[TOKEN_IDS][start : start + n].tolist(),
        "finish_reason": str(batch["finish_reason"][j]),
        "error": str(batch["error"][j]) or None,
        "prompt_tokens": int(batch["prompt_tokens"][j]),
        "completion_tokens": n,
        "time_to_first_token": _optional(batch["time_to_first_token"][j]),
        "time_per_token": _optional(batch["time_per_token"][j]),
    }


def _optional(seconds: np.floating) -> float | None:
    return None if math.isnan(seconds) else float(seconds)


def _mean(seconds: np.ndarray) -> float | None:
    known = seconds[~np.isnan(seconds)]
    return float(known.mean()) if len(known) else None
