"""Dataset pipelines: specs, input sources, Zarr output, the run loop."""
