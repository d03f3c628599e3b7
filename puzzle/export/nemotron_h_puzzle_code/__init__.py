"""Remote code that travels with a NemotronHPuzzle export (puzzle/export/nemotron_h_puzzle.py copies both files)."""
