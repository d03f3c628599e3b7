"""Corpus -> tokenised, packed, split blocks in `runs/R/data/` (`puzzle prepare-data`), and reading them back."""

from puzzle.data.blocks import SPLITS, data_dir, iterate_batches, load_blocks, load_meta
from puzzle.data.corpus import SUPPORTED_SUFFIXES, Corpus, corpus_files, iter_documents
from puzzle.data.prepare import prepare_blocks, prepare_data, split_documents

__all__ = [
    "SPLITS",
    "SUPPORTED_SUFFIXES",
    "Corpus",
    "corpus_files",
    "data_dir",
    "iter_documents",
    "iterate_batches",
    "load_blocks",
    "load_meta",
    "prepare_blocks",
    "prepare_data",
    "split_documents",
]
