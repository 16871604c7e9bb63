"""The ``glinthawk`` click group; the commands register on it."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="glinthawk-dask")
def main() -> None:
    """glinthawk: high-throughput LLM batch inference, attention and KV caches on a CPU tier."""
