"""Conformance: every model family depthray runs, compared with the upstream library's own
end-to-end path (transformers' pipeline and post-processing, diffusers' pipelines called as
their users call them, the authors' inference code), never with a re-derivation from
depthray's code. Tiny random-weight checkpoints built with the upstream config classes."""
