"""Tiny children of every block kind, saved as `puzzle realize` saves them, for the export tests."""

from pathlib import Path

import torch

from puzzle.model import BlockConfig, PuzzleForCausalLM
from puzzle.model.checkpoint import save_model, to_puzzle
from puzzle.model.surgery import replace_sublayer

from conftest import make_llama, make_tokenizer


def make_child(blocks: list[str], seed: int = 0, **overrides) -> PuzzleForCausalLM:
    """The tiny Llama (conftest) with one block per name ("attn_g2+ffn_96", "attn_noop+ffn_noop", ...),
    every weight random and large enough to matter, norms included (a swapped norm must show)."""
    child = to_puzzle(make_llama(seed, num_hidden_layers=len(blocks), **overrides))
    for i, name in enumerate(blocks):
        block = BlockConfig.from_name(name)
        if block != child.config.blocks[i]:
            replace_sublayer(child, i, "attention", block.attention)
            replace_sublayer(child, i, "ffn", block.ffn)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in child.parameters():
            p.copy_(torch.randn_like(p) * 0.08 if p.ndim == 2 else 1 + 0.5 * torch.rand_like(p))
    return child.eval()


def save_child(child: PuzzleForCausalLM, out: Path) -> Path:
    return save_model(child, out, make_tokenizer(child.config.vocab_size))


def logits(model: PuzzleForCausalLM, tokens: list[int]) -> torch.Tensor:
    """(T, vocab) float32 logits of one sequence."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()
