"""The run directory's store of accepted steps: manifests, side tensors, metrics; atomic writes."""
