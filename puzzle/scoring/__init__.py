"""Replace-1-block scoring: the quality of each library variant alone in the parent (`puzzle score`)."""

from .replace1 import ParentReference, Sums, parent_reference, score_batch, score_variants, swapped

__all__ = ["ParentReference", "Sums", "parent_reference", "score_batch", "score_variants", "swapped"]
