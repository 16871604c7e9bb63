"""glinthawk-dask: two-tier LLM batch inference on Dask."""
