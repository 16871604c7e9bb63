"""glinthawk-dask: high-throughput LLM batch inference on Dask.

Dense math of every layer runs on GPU-tagged workers; KV caches and attention live on
CPU-tagged workers (after Glinthawk, arXiv 2501.11779).  This package also carries the
in-process engine that the distributed one is checked against.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("glinthawk-dask")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

#: public name -> the module that defines it, imported on first use (PEP 562): workers
#: that import ``glinthawk_dask.model`` load neither the API, the pipeline, Zarr nor fsspec
_LAZY = {
    "LLM": "api",
    "EngineConfig": "engine.engine",
    "InProcessEngine": "engine.engine",
    "Completion": "engine.request",
    "Request": "engine.request",
    "SamplingParams": "sampling",
    "GlinthawkError": "errors",
    "InvalidRequestError": "errors",
    "ModelLoadError": "errors",
    "submit": "jobs",
    "submit_prompts": "jobs",
    "PipelineJob": "jobs",
    "GenerationJob": "jobs",
    "JobProgress": "jobs",
    "JobCancelledError": "jobs",
    "submit_detached": "pipeline.detached",
    "DetachedPipeline": "pipeline.detached",
    "detached_pipelines": "pipeline.detached",
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .api import LLM
    from .engine.engine import EngineConfig, InProcessEngine
    from .engine.request import Completion, Request
    from .errors import GlinthawkError, InvalidRequestError, ModelLoadError
    from .jobs import GenerationJob, JobCancelledError, JobProgress, PipelineJob, submit, submit_prompts
    from .pipeline.detached import DetachedPipeline, detached_pipelines, submit_detached
    from .sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
