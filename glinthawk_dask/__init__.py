"""glinthawk-dask: high-throughput LLM batch inference on Dask.

Dense math of every layer runs on GPU-tagged workers; KV caches and attention live on
CPU-tagged workers (after Glinthawk, arXiv 2501.11779).  This package also carries the
in-process engine that the distributed one is checked against.
"""

from importlib.metadata import PackageNotFoundError, version

from .api import LLM
from .engine.engine import EngineConfig, InProcessEngine
from .engine.request import Completion, Request
from .errors import GlinthawkError, InvalidRequestError, ModelLoadError
from .jobs import GenerationJob, JobCancelledError, JobProgress, PipelineJob, submit, submit_prompts
from .sampling import SamplingParams

try:
    __version__ = version("glinthawk-dask")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "LLM",
    "EngineConfig",
    "InProcessEngine",
    "Completion",
    "Request",
    "SamplingParams",
    "GlinthawkError",
    "InvalidRequestError",
    "ModelLoadError",
    "submit",
    "submit_prompts",
    "PipelineJob",
    "GenerationJob",
    "JobProgress",
    "JobCancelledError",
    "__version__",
]
