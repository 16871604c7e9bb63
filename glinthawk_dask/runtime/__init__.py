"""The two-tier runtime on Dask: worker plugins, the control plane and the client side.

Importing this package registers glinthawk's defaults in ``dask.config``.
"""

from .. import config  # noqa: F401  (registers the defaults)
from .client import DaskEngine, RunSummary
from .cluster import cluster_status
from .plugins import AttentionWorkerPlugin, DenseWorkerPlugin, GlinthawkSchedulerPlugin

__all__ = ["DaskEngine", "RunSummary", "cluster_status", "GlinthawkSchedulerPlugin", "DenseWorkerPlugin", "AttentionWorkerPlugin"]
