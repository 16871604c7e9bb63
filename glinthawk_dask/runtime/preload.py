"""A Dask preload that gives a plain ``dask scheduler`` the glinthawk control plane.

.. code-block:: bash

    dask scheduler --preload glinthawk_dask.runtime.preload

``glinthawk scheduler`` does the same itself.  Without either, the first client to
connect registers the plugin (``ensure_plugins``); preloading it only means that the
registry of tier workers exists before any client does.
"""

from __future__ import annotations

from typing import Any

from .plugins import GlinthawkSchedulerPlugin

__all__ = ["dask_setup"]


def dask_setup(scheduler: Any) -> None:
    """Add the control plane (started with the scheduler's other plugins)."""
    plugin = GlinthawkSchedulerPlugin()
    if plugin.name not in scheduler.plugins:
        scheduler.add_plugin(plugin)
