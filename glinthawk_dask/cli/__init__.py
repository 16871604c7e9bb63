"""The ``glinthawk`` command line.

User mistakes (a missing file, a bad option, an unknown model) end with one line on
stderr and a non-zero exit code; a row that cannot be processed becomes an error
record in the output and the run goes on.

Commands: ``generate`` (prompts in, JSONL out), ``run``/``export``/``inspect`` (dataset
pipelines and their Zarr output), ``attach``/``cancel`` (pipelines run with ``run
--detach``), ``bench`` (a throughput number), and the long-running
processes of a cluster: ``scheduler``, ``worker --tier dense|attention`` and ``cluster``
(all of it on this machine).  Those run until SIGINT or SIGTERM, then close cleanly.
"""

from ._group import main
from . import cluster, detached, generate, pipeline, planning  # noqa: F401  (register the commands)

__all__ = ["main"]
