"""glinthawk's section of dask.config, with defaults from ``glinthawk.yaml``.

Read values with ``dask.config.get("glinthawk.engine.micro-batch-size")``; override
them like any dask setting (``DASK_GLINTHAWK__ENGINE__MICRO_BATCH_SIZE=64``, YAML
files, ``dask.config.set``).
"""

from __future__ import annotations

import os

import dask.config
import yaml

_FILE = os.path.join(os.path.dirname(__file__), "glinthawk.yaml")

with open(_FILE) as f:
    _DEFAULTS = yaml.safe_load(f)

dask.config.update_defaults(_DEFAULTS)


def default(key: str):
    """The shipped default of ``glinthawk.<key>``."""
    node = _DEFAULTS["glinthawk"]
    for part in key.split("."):
        node = node[part]
    return node


def get(key: str):
    """``dask.config.get("glinthawk." + key)``, falling back to the shipped default (also
    where a caller replaced dask's config wholesale, as test harnesses do)."""
    return dask.config.get(f"glinthawk.{key}", default=default(key))
