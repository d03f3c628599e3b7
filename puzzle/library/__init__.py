"""The block library: every child block of the search space, initialised from the parent and trained by BLD.

`store` (the manifest and the files, `variant_state` for scoring and realisation), `init` (pruned
initialisation), `bld` (decoupled blockwise local distillation of a layer group), `ray_jobs` (layer
groups as Ray tasks), `commands` (`puzzle build-library`).
"""
