"""Evaluating a model: perplexity, KL and agreement with the parent, multiple choice, throughput."""
