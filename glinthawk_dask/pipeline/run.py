"""Running a pipeline: shards in, tokenized on CPU workers, generated, committed to Zarr.

Order of work, so that mistakes in the spec cost nothing:

1. resolve the model, list the input shards and open the output (create it, or
   check that it was started by the same spec and model and take its committed ids);
2. start (or connect to) the cluster and load the model;
3. read and tokenize shards as ordinary Dask tasks on the attention (CPU) workers,
   a couple of shards ahead of the engine; the engine pulls requests only as it has
   room, so a dataset far larger than memory flows through;
4. append every completion and every error record to the output, which commits a
   chunk at a time.  Rows already committed are skipped, so a rerun resumes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Iterator

from ..api import LLM
from ..engine.progress import estimate_tokens_left
from ..engine.request import FINISH_ERROR, Completion, Request, sampled_tokens
from ..errors import GlinthawkError, ModelLoadError
from ..model.resolve import missing_elsewhere, resolve_checkpoint
from ..prompts import RequestBuilder
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .layout import OutputError
from .sink import ZarrSink
from .sources import InputError, Shard, list_shards, read_shard
from .versions import inputs_key
from .spec import PipelineSpec, options_for

__all__ = [
    "Progress", "RunReport", "load_model", "pipeline_llm", "plan_record", "run_pipeline", "spec_shards",
    "tokenize_shard",
]

logger = logging.getLogger(__name__)

#: shards read ahead of the engine
PREFETCH_SHARDS = 2


@dataclass
class Progress:
    """Where a pipeline run stands (passed to the ``progress`` callback)."""

    rows_done: int = 0  # rows committed or waiting in the output buffer during this run
    errors: int = 0
    skipped: int = 0  # rows already in the output from an earlier run
    generated_tokens: int = 0
    shards_read: int = 0
    shards_total: int = 0
    seconds: float = 0.0  # since the engine was ready, less ``waited_seconds``
    waited_seconds: float = 0.0  # waiting to be placed, for KV that other runs on the cluster held
    rows_total: int | None = None  # this run's rows: exact once every shard is read, else estimated from those read
    rows_total_exact: bool = False
    tokens_left: int | None = None  # tokens still to generate (see _RequestFeed.tokens_left; unread shards
    # estimated from those read)
    recoveries: list[dict] = field(default_factory=list)  # workers lost so far and how the run went on
    first_token_seconds: float | None = None  # ``seconds`` when the first token came

    @property
    def tokens_per_s(self) -> float:
        """Tokens sampled per second so far (rows still running included)."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Remaining time: the tokens the rows left will take (``tokens_left``: their
        ``max_tokens``, scaled by the share the finished rows used once enough have) at
        the rate since the first token (the wait for it, the plan's check and the first
        prefill, is not the pace of the rest), once there is a second of it (None until
        then, and when unknown; the rate so far where the first token's time is not)."""
        rate, since = self.tokens_per_s, self.first_token_seconds
        if since is not None:
            rate = self.generated_tokens / (self.seconds - since) if self.seconds - since >= 1.0 else 0.0
        if self.tokens_left is None or rate <= 0:
            return None
        return self.tokens_left / rate


@dataclass
class RunReport(Progress):
    """What a finished run did."""

    output: str = ""
    rows_in_output: int = 0
    error_examples: list[str] = field(default_factory=list)
    startup_seconds: float = 0.0  # cluster start and model load, before the first row
    shutdown_seconds: float = 0.0  # after the last commit: closing the run (and the cluster made for it)
    cancelled: bool = False  # stopped early by ``cancel``: a rerun resumes
    plan: dict | None = None  # how the cluster generated (see :func:`plan_record`); None in process or with no rows
    complete: bool = False  # the output already held every row of these inputs: nothing ran


def run_pipeline(
    spec: PipelineSpec,
    *,
    scheduler: str | None = None,
    client: Any = None,
    overwrite: bool = False,
    force: bool = False,
    progress: Callable[[Progress], None] | None = None,
    llm: Any = None,
    cancel: threading.Event | None = None,
) -> RunReport:
    """Run ``spec`` to completion and return what it did.

    Generates with ``llm`` (an :class:`~glinthawk_dask.LLM` of the spec's model,
    left open), or one made for the run: on ``client``, on the cluster at
    ``scheduler``, or on the embedded local cluster (``topology.mode: in-process``
    runs without Dask).  An output started by another spec or model is refused
    unless ``force``; ``overwrite`` starts it over.

    Setting ``cancel`` stops the run between completions: no more requests are fed,
    the engine's run is closed, the rows finished so far are committed, and the report
    has ``cancelled`` set.  A rerun resumes from there.
    """
    source = resolve_checkpoint(spec.model)  # unknown model: fails here, before anything runs
    shards = spec_shards(spec)
    sink = ZarrSink.open(
        spec.output.url, storage_options=spec.storage_options, fingerprint=spec.fingerprint(), model=spec.model,
        spec=spec.to_dict(), sampling=spec.sampling.to_dict(), chunk_rows=spec.output.chunk_rows,
        overwrite=overwrite, force=force, commit_seconds=spec.output.commit_seconds,
    )
    topo = spec.topology
    given = llm is not None
    if llm is not None and llm.model != spec.model:
        raise GlinthawkError(f"the spec's model is {spec.model!r} but the LLM given runs {llm.model!r}")
    inputs = inputs_key(spec, shards)
    if inputs is not None and sink.complete_inputs == inputs:  # a rerun of a finished run: no cluster
        sink.close()
        return RunReport(shards_total=len(shards), skipped=sink.rows, output=spec.output.url,
                         rows_in_output=sink.rows, complete=True)
    t_start = time.perf_counter()
    state = Progress(shards_total=len(shards))
    examples: list[str] = []
    try:
        with contextlib.nullcontext(llm) if given else pipeline_llm(spec, scheduler=scheduler, client=client) as llm:
            if not given:
                llm.label = f"pipeline {spec.name}, loading the model"
                load_model(llm, spec.model)
                llm.label = f"pipeline {spec.name}"
            t0 = time.perf_counter()
            startup = t0 - t_start
            feed = _RequestFeed(spec, shards, llm, source.config.vocab_size, sink)  # (skips ids committed before)
            page = _page_reporter(llm, spec.name)

            done_tokens = [0]  # tokens of the rows finished (the sampled ones include their stop tokens)
            sampled = [0]  # ... and the stop tokens they sampled (the engine counts them; their rows do not)

            def recovered() -> None:  # each worker lost, recorded in the output as soon as it is known
                seen = llm.recoveries
                if len(seen) > len(state.recoveries):
                    sink.record_recoveries(seen[len(state.recoveries):])
                    state.recoveries = seen

            def clock() -> None:  # the run's seconds, less a wait for KV that other runs held
                state.waited_seconds = llm.placement_wait_seconds
                state.seconds = time.perf_counter() - t0 - state.waited_seconds
                if state.first_token_seconds is None and state.generated_tokens > 0:
                    state.first_token_seconds = state.seconds

            def refresh() -> None:
                recovered()
                sink.commit_due()  # rows finished a while ago, while no row finishes
                live = max(done_tokens[0], llm.generated_tokens)
                state.generated_tokens = live
                feed.count_into(state)
                state.tokens_left = feed.tokens_left(running=max(0, llm.generated_tokens - sampled[0]),
                                                     done=sampled[0])
                clock()
                if progress is not None:
                    progress(state)
                if page is not None:
                    page(state)

            def note(record: dict) -> None:
                sink.append([record])
                feed.finished(record["id"])
                state.rows_done += 1
                done_tokens[0] += len(record["completion_token_ids"])
                sampled[0] += sampled_tokens(len(record["completion_token_ids"]), record["finish_reason"])
                if record["error"]:
                    state.errors += 1
                    if len(examples) < 5:
                        examples.append(f"{record['id']}: {record['error']}")
                refresh()

            stop = cancel.is_set if cancel is not None else (lambda: False)
            before = [n for _, n in sink.lengths()] if sink.rows else None  # a resumed run plans on them
            completions = llm.stream_requests(feed.requests(on_error=note, stop=stop), max_seq_len=topo.max_seq_len,
                                              on_tick=refresh, output_lengths=before, stop=stop)
            with contextlib.closing(completions):  # a break closes the engine's run
                for c in completions:
                    note(c.to_row())
                    if stop():
                        break
            recovered()
            if page is not None:
                page.close()
            sink.close()  # the last rows committed: the run's work is done
            clock()
            plan = plan_record(llm.last_summary, topo, done_tokens[0] / state.seconds) if feed.fed else None
            if plan is not None:
                sink.record_plan(plan)
            if inputs is not None and not stop() and feed.all_read:
                sink.mark_complete(inputs)  # every row of every shard committed
            t_close = time.perf_counter()
    except BaseException:
        with contextlib.suppress(OutputError):  # (the store failing again: the error raised already says so)
            sink.close()  # commits every finished row, also when interrupted
        raise
    shutdown = time.perf_counter() - t_close  # the cluster's (if made for the run) and the run's close
    feed.count_into(state)
    state.generated_tokens, state.tokens_left = done_tokens[0], 0  # the rows' own tokens, exactly
    return RunReport(**vars(state), output=spec.output.url, rows_in_output=sink.rows, error_examples=examples,
                     startup_seconds=startup, shutdown_seconds=shutdown, plan=plan,
                     cancelled=cancel is not None and cancel.is_set())


def plan_record(summary: Any, topology: Any, tokens_per_s: float) -> dict | None:
    """How a run generated, from its engine's summary (None in process): mode,
    micro-batches (``sizes``, ``local`` ones of a hybrid run), whether the planner chose
    them (``planned``: on ``max_tokens``, or on the lengths of ``planned_on_rows`` rows
    committed before) with its prediction, the same for the lengths its rows stopped at
    (``predicted_for_lengths``) and the profiling it took, the other runs that shared the
    cluster for a while (``runs_beside``), each time it grew into KV they freed (``grew``:
    from and to which micro-batches, seconds after it started, the new prediction) or
    gave micro-batches up to runs waiting for KV (``yielded``), and
    the run's rate over the same span as its report."""
    if summary is None:
        return None
    return {
        "mode": summary.mode, "micro_batch_size": summary.micro_batch_size, "micro_batches": summary.n_micro_batches,
        "sizes": summary.placement.live_sizes(), "local": summary.local_micro_batches,
        "planned": "auto" in (topology.micro_batch_size, topology.micro_batches),
        "predicted_tokens_per_s": summary.predicted_tokens_per_s, "profile_seconds": summary.profile_seconds,
        "runs_beside": summary.runs_beside, "predicted_for_lengths": summary.predicted_for_lengths,
        "planned_on_rows": summary.planned_on_rows,
        "grew": [{k: g[k] for k in ("from", "to", "after_s", "predicted")} for g in summary.growths
                 if g["kind"] == "grew"],
        "yielded": [{k: g[k] for k in ("from", "to", "after_s")} for g in summary.growths if g["kind"] == "yielded"],
        "tokens_per_s": tokens_per_s, "time": time.time(),
    }


def _page_reporter(llm: Any, name: str) -> Any:
    """Progress for the Glinthawk dashboard page, on runs with a cluster."""
    if llm.client is None:
        return None
    from ..runtime.dashboard import ProgressReporter

    return ProgressReporter(llm.client, name)


def spec_shards(spec: PipelineSpec) -> list[Shard]:
    """The shards of ``spec``'s input, as a run reads them."""
    inp = spec.input
    return list_shards(inp.urls, format=inp.format, compression=inp.compression, text_mode=inp.text_mode,
                       blocksize=inp.blocksize, storage_options=spec.storage_options)


def pipeline_llm(spec: PipelineSpec, *, scheduler: str | None = None, client: Any = None) -> LLM:
    """The :class:`~glinthawk_dask.LLM` a run of ``spec`` makes for itself (its
    topology: mode, workers, plan, device and dtype): on ``client``, on the cluster at
    ``scheduler``, or on the embedded local cluster."""
    topo = spec.topology
    return LLM(
        spec.model, mode=topo.mode, scheduler=scheduler, client=client, device=topo.device, dtype=topo.dtype,
        micro_batch_size=topo.micro_batch_size, n_micro_batches=topo.micro_batches, n_slices=topo.dense_workers,
        local_workers=(topo.dense_workers, topo.attention_workers),
        dense_kv_budget=topo.dense_kv_budget, local_micro_batches=topo.local_micro_batches,
    )


def load_model(llm: Any, model: str) -> None:
    """Load the model where it runs (weights on the dense workers with a one-token
    generation, the tokenizer on the CPU workers that read shards), so that start-up
    and generation are timed apart.  One after the other: a plan's check of the
    cluster's profile runs inside the generation and must not share the cores with
    the tokenizers' load (measured: a check beside it priced a dense layer x6.9)."""
    list(llm.generate([{"prompt_token_ids": [0]}], SamplingParams(max_tokens=1, ignore_eos=True)))
    if llm.client is not None:
        try:
            llm.client.run(_load_worker_tokenizer, model, workers=_cpu_workers(llm))
        except ModelLoadError as e:
            if not missing_elsewhere(e, model):
                raise
            raise ModelLoadError(f"the CPU workers, which tokenize the input, do not find the model {model}, which "
                                 "is on this machine: put it at the same path on their hosts too (or on a "
                                 "filesystem they share)") from None


def _load_worker_tokenizer(model: str) -> None:
    _worker_tokenizer(model)


class _RequestFeed:
    """Requests of a run in input order, read shard by shard a little ahead.

    Rows already committed are skipped; error records go to ``on_error`` as they are
    met, so they are committed in input order with the completions around them.  An
    id seen before in this run or in the output becomes an error record under the id
    ``<id>#dup<n>`` (the n-th repeat), deterministic across reruns.
    """

    def __init__(self, spec: PipelineSpec, shards: list[Shard], llm: Any, vocab_size: int,
                 committed: Container[str]):  # the output's ids (its sink: the ids are not copied)
        self.spec = spec
        self.shards = shards
        self.llm = llm
        self.vocab_size = vocab_size
        self.committed = committed
        self.seen: set[str] = set()
        self.repeats: collections.Counter[str] = collections.Counter()
        self.shards_read = 0
        self.skipped = 0
        self.rows_read = 0  # every row of the shards read, committed before or not
        self.rows_todo = 0  # the rows of the shards read that this run commits
        self.budget_read = 0  # max_tokens of every request in the shards read
        self.token_budget = 0  # max_tokens of the requests this run feeds, of the shards read
        self.budget_done = 0  # ... of those finished
        self.running: dict[str, int] = {}  # max_tokens of each request fed and not finished
        self.fed = 0  # requests fed to the engine

    def requests(
        self, on_error: Callable[[dict], None], stop: Callable[[], bool] = lambda: False
    ) -> Iterator[Request]:
        """Yield the requests; when ``stop()`` turns true, feed no more."""
        for entries in self._tokenized_shards():
            todo = [e for e in map(self._dedupe, entries) if e is not None]  # a shard counted whole, then fed
            self.shards_read += 1
            self.rows_read += len(entries)
            self.rows_todo += len(todo)
            self.budget_read += sum(e.params.max_tokens for e in entries if isinstance(e, Request))
            self.token_budget += sum(e.params.max_tokens for e in todo if isinstance(e, Request))
            for e in todo:
                if stop():
                    return
                if isinstance(e, Request):
                    self.running[e.id] = e.params.max_tokens
                    self.fed += 1
                    yield e
                else:
                    on_error(e.to_row())

    def finished(self, rid: str) -> None:
        """Row ``rid`` is done (an error record that was never fed: nothing to count)."""
        self.budget_done += self.running.pop(rid, 0)

    def _unread_share(self) -> float:
        """Unread shards as a multiple of the shards read (taken to be alike and not yet
        committed)."""
        return (len(self.shards) - self.shards_read) / self.shards_read

    @property
    def all_read(self) -> bool:
        """Whether every shard is read."""
        return self.shards_read == len(self.shards)

    def count_into(self, progress: Progress) -> None:
        """Set ``progress``'s counts of the input: shards read, rows skipped, this run's rows."""
        progress.shards_read, progress.skipped = self.shards_read, self.skipped
        progress.rows_total, progress.rows_total_exact = self.rows_expected(), self.all_read

    def rows_expected(self) -> int | None:
        """This run's rows: exact once every shard is read (None before the first)."""
        if not self.shards_read:
            return None
        return round(self.rows_todo + self.rows_read * self._unread_share())

    def tokens_left(self, running: int, done: int = 0) -> int | None:
        """Tokens the run will still generate (None before the first shard), by
        :func:`~glinthawk_dask.engine.progress.estimate_tokens_left`: the rows fed and not
        finished are in flight, with ``running`` tokens; the finished ones sampled ``done``.
        Each row in flight counts at least one token more."""
        if not self.shards_read:
            return None
        held = sum(self.running.values())
        return estimate_tokens_left(
            held=held, waiting=self.token_budget - self.budget_done - held + self.budget_read * self._unread_share(),
            running=running, finished=self.fed - len(self.running), in_flight=len(self.running),
            budget_done=self.budget_done, tokens_done=done, floor=len(self.running))

    def _dedupe(self, e: Request | Completion) -> Request | Completion | None:
        if e.id in self.seen:
            self.repeats[e.id] += 1
            dup = f"{e.id}#dup{self.repeats[e.id]}"
            e = Completion(dup, e.prompt, [], "", [], FINISH_ERROR,
                           f"duplicate id {e.id!r}: ids must be unique (recorded as {dup!r})")
        self.seen.add(e.id)
        if e.id in self.committed:
            self.skipped += 1
            return None
        return e

    def _tokenized_shards(self) -> Iterator[list[Request | Completion]]:
        client = self.llm.client
        spec, max_seq_len = self.spec, self.spec.topology.max_seq_len
        if client is None:  # in-process: read here
            builder = RequestBuilder(self.llm.tokenizer, vocab_size=self.vocab_size, max_seq_len=max_seq_len,
                                     model=spec.model, limit_name="topology.max_seq_len")
            for shard in self.shards:
                yield _tokenize(builder, spec, shard)
            return
        workers = _cpu_workers(self.llm)
        pending: collections.deque = collections.deque()
        todo = iter(self.shards)
        run = f"{spec.name}-{spec.fingerprint()[:8]}"

        def submit() -> None:
            shard = next(todo, None)
            if shard is not None:
                pending.append((shard, client.submit(
                    tokenize_shard, shard, spec, key=f"glinthawk-read-shard-{run}-{shard.index}",
                    workers=workers, allow_other_workers=True, pure=False,
                )))

        for _ in range(PREFETCH_SHARDS):
            submit()
        while pending:
            shard, future = pending.popleft()
            submit()
            try:
                entries = future.result()
            except InputError as e:
                raise _unseen_by_workers(e, shard, spec) from None
            finally:
                future.release()
            yield entries


def _unseen_by_workers(error: InputError, shard: Shard, spec: PipelineSpec) -> InputError:
    """``error``, a CPU worker's failure to read ``shard``, told as what it likely is when
    this machine can read the file: a path on this machine that the workers do not see."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.implementations.memory import MemoryFileSystem

    if not error.missing:
        return error
    try:
        fs, path = fsspec.core.url_to_fs(shard.url, **options_for(shard.url, spec.storage_options))
        here = isinstance(fs, (LocalFileSystem, MemoryFileSystem)) and fs.exists(path)
    except Exception:  # (cannot tell: the worker's message as it is)
        here = False
    if not here:
        return error
    return InputError(f"{error}; the file is on this machine, but the cluster's CPU workers, which read the "
                      "input, do not see it: give the input as a URL every worker can read (s3://, gs://, "
                      "https://, ...) or a path on a filesystem they share")


def tokenize_shard(shard: Shard, spec: PipelineSpec) -> list[Request | Completion]:
    """Read one shard and tokenize its rows (a Dask task on a CPU worker)."""
    tokenizer, vocab_size = _worker_tokenizer(spec.model)
    builder = RequestBuilder(tokenizer, vocab_size=vocab_size, max_seq_len=spec.topology.max_seq_len,
                             model=spec.model, limit_name="topology.max_seq_len")
    return _tokenize(builder, spec, shard)


def _tokenize(builder: RequestBuilder, spec: PipelineSpec, shard: Shard) -> list[Request | Completion]:
    rows = read_shard(shard, fields=spec.fields, template=spec.template, storage_options=spec.storage_options)
    return builder.build(rows, spec.sampling, chat=spec.chat, seen=None)


@functools.lru_cache(maxsize=4)
def _worker_tokenizer(model: str) -> tuple[Tokenizer | None, int]:
    source = resolve_checkpoint(model)
    return Tokenizer.from_checkpoint(source), source.config.vocab_size


def _cpu_workers(llm: Any) -> list[str] | None:
    """Attention (CPU) workers of the LLM's cluster, where shards are read and tokenized
    (None: any worker)."""
    return llm.tier_workers()["attention"] or None

