"""``python -m glinthawk_dask`` runs the ``glinthawk`` command line."""

from .cli import main

main()
