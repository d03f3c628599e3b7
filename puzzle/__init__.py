"""puzzle: Puzzle-style NAS for Hugging Face decoder LLMs."""
