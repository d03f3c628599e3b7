"""Shared fixtures: tiny random Llama parents and a tiny tokenizer, all built here (nothing downloaded)."""

import os
import secrets
from pathlib import Path

# Ray reads its auth token when it is imported: set one for the session before anything imports ray, so a
# head a test starts (`ray start --head`, given this environment) admits this process and nobody else.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import pytest
import yaml
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from puzzle.model import PuzzleForCausalLM
from puzzle.model.checkpoint import to_puzzle

REPO = Path(__file__).resolve().parents[1]
REFERENCE_GGUF = REPO / "assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE_CORPUS = REPO / "assets" / "corpus" / "python-docs"

# Tiny tensors: one thread beats two (no sync overhead), and leaves a core for Ray workers in the tests.
torch.set_num_threads(int(os.environ.get("PUZZLE_TEST_THREADS", "1")))

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Python is a programming language that lets you work quickly and integrate systems effectively.",
    "A list is a mutable sequence; a tuple is an immutable one.",
    "Dictionaries map hashable keys to arbitrary values.",
    "The interpreter reads a line, evaluates it and prints the result.",
]


def make_llama_config(**overrides) -> LlamaConfig:
    """A 4-layer, hidden-64 Llama (4 query heads, 2 KV heads, FFN 128, vocab 320)."""
    kwargs = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_llama_config(**overrides)).eval()
    # transformers' init is small (std 0.02); widen it so layers matter and differences are visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    return model


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_llama()


@pytest.fixture
def tiny_parent(tiny_llama) -> PuzzleForCausalLM:
    """The tiny Llama as an all-parent heterogeneous child (same weights, same logits)."""
    return to_puzzle(tiny_llama)


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process on SAMPLE_TEXT (ids < vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXT * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def tiny_parent_dir(tmp_path, tiny_llama, tiny_tokenizer) -> Path:
    """A plain Hugging Face Llama directory (safetensors + tokenizer), as a user would hand us."""
    out = tmp_path / "parent"
    tiny_llama.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer.save_pretrained(out)
    return out


requires_reference = pytest.mark.skipif(
    not REFERENCE_GGUF.exists(), reason="reference parent not fetched (scripts/fetch_reference_assets.sh)"
)


@pytest.fixture
def tiny_cpu_profile(tmp_path):
    """cpu_local with a tiny workload, so measuring the tiny parent takes a moment."""
    path = tmp_path / "tiny_cpu.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny_cpu",
        "device": {"name": "cpu", "kind": "cpu", "peak_flops": {"fp32": 1e10}, "memory_bandwidth": 1e10,
                   "memory_bytes": 1e9, "threads": 1},
        "workload": {"batch_size": 1, "input_len": 8, "output_len": 4, "dtype": "fp32"},
        "constraints": {"speedup": 1.2},
    }))
    return path
