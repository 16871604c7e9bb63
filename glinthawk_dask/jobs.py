"""Jobs: generation and pipelines running in the background, with handles for notebooks.

>>> from glinthawk_dask import LLM, SamplingParams, submit, submit_prompts
>>> llm = LLM(mode="in-process")
>>> job = submit_prompts(llm, ["The capital of France is"], SamplingParams(max_tokens=8))
>>> job                   # status, rows done/total, tok/s, errors (a small table in Jupyter)
>>> job.show_progress()   # a live bar until the job ends: a widget in Jupyter, text in a terminal
>>> job.result()          # the completions, in input order
>>> pipe = submit("pipelines/quickstart.yaml", llm=llm, output="/tmp/quickstart.zarr")
>>> pipe.cancel()         # stops between completions; the committed rows stay, submitting again resumes
>>> pipe.to_pandas()      # the committed rows of the output

Both :func:`submit` and :func:`submit_prompts` return at once; the work runs in a
``concurrent.futures`` executor with one worker thread per :class:`~glinthawk_dask.LLM`,
so jobs given the same LLM take turns in submission order: one generates at a time (an
engine runs one generation at a time), the others wait as ``queued``; do not call
``llm.generate`` while a job runs on that LLM.  A pipeline loading its own model runs in
a thread of its own.  When the interpreter exits, running jobs are cancelled and waited
for, so a pipeline keeps every row it finished; queued ones end without running.
The handles' base and :class:`GenerationJob` live in :mod:`glinthawk_dask.handles`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from .errors import GlinthawkError
from .handles import COLUMNS, GenerationJob, JobCancelledError, JobProgress, _Job, submit_prompts
from .pipeline.run import Progress, RunReport, run_pipeline
from .pipeline.layout import OutputError
from .pipeline.table import read_output
from .pipeline.spec import PipelineSpec, load_spec, parse_spec

__all__ = [
    "COLUMNS", "GenerationJob", "JobCancelledError", "JobProgress", "PipelineJob", "submit", "submit_prompts",
]


class PipelineJob(_Job):
    """A pipeline run in the background (see :func:`submit`).

    :meth:`result` gives the :class:`~glinthawk_dask.pipeline.run.RunReport`, with
    ``cancelled`` set when :meth:`cancel` stopped it; :meth:`to_pandas` reads the
    committed rows of the output.
    """

    def __init__(self, spec: PipelineSpec, llm: Any, run_kwargs: dict[str, Any]) -> None:
        super().__init__(llm, JobProgress(shards_read=0))
        self.spec = spec
        self._run_kwargs = run_kwargs

    @property
    def output(self) -> str:
        """The URL of the output."""
        return self.spec.output.url

    def _run(self) -> RunReport:
        report = run_pipeline(self.spec, llm=self._llm, progress=self._on_progress, cancel=self._cancel,
                              **self._run_kwargs)
        self._on_progress(report)
        return report

    def _not_run(self) -> RunReport:
        try:
            rows = len(read_output(self.output, storage_options=self.spec.storage_options))
        except OutputError:
            rows = 0
        return RunReport(output=self.output, rows_in_output=rows, cancelled=True)

    def _on_progress(self, p: Progress) -> None:
        self._update(rows_done=p.rows_done, errors=p.errors, skipped=p.skipped, generated_tokens=p.generated_tokens,
                     seconds=p.seconds, shards_read=p.shards_read, shards_total=p.shards_total,
                     rows_total=p.rows_total, rows_total_exact=p.rows_total_exact, tokens_left=p.tokens_left)

    def _was_cancelled(self, value: Any) -> bool:
        return bool(value is not None and value.cancelled)

    def result(self, timeout: float | None = None) -> RunReport:
        """The run's report (``cancelled`` set if it was stopped early)."""
        return super().result(timeout)

    def to_pandas(self) -> Any:
        """The committed rows of the output as a DataFrame (:data:`COLUMNS`), in output order."""
        import pandas as pd

        try:
            table = read_output(self.output, storage_options=self.spec.storage_options)
        except OutputError:
            if self.done():
                raise
            return pd.DataFrame(columns=list(COLUMNS))  # not created yet
        return table.to_pandas()[list(COLUMNS)]

    def _label(self) -> str:
        return f"PipelineJob {self.spec.name!r}"

    def _where(self) -> list[tuple[str, str]]:
        return [("output", self.output)]


def submit(
    spec_or_path: PipelineSpec | Mapping[str, Any] | str | os.PathLike[str],
    *,
    llm: Any = None,
    client: Any = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    output: str | None = None,
) -> PipelineJob:
    """Start a pipeline in the background and return its handle at once.

    ``spec_or_path`` is a :class:`PipelineSpec`, a spec as a dict (see
    :func:`~glinthawk_dask.pipeline.spec.parse_spec`) or the path/URL of a YAML spec;
    mistakes in it raise here.  ``output`` replaces the spec's ``output.url``.  The other
    arguments are those of :func:`~glinthawk_dask.pipeline.run.run_pipeline`: ``llm``
    generates (its model must be the spec's), else a model is loaded for the run on
    ``client``, ``scheduler`` or a local cluster as the spec's topology says.
    """
    if isinstance(spec_or_path, PipelineSpec):
        spec = spec_or_path
    elif isinstance(spec_or_path, Mapping):
        spec = parse_spec(dict(spec_or_path))
    else:
        spec = load_spec(spec_or_path)
    if output is not None:
        spec = spec.replace(output=dataclasses.replace(spec.output, url=output))
    if llm is not None and llm.model != spec.model:
        raise GlinthawkError(f"the spec's model is {spec.model!r} but the LLM given runs {llm.model!r}")
    job = PipelineJob(spec, llm, dict(client=client, scheduler=scheduler, overwrite=overwrite, force=force))
    job._start()
    return job
