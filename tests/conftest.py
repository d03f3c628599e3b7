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
            if p.ndim >= 2:
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


# ---- parents of every supported family (puzzle/model/family.py), from transformers' own config classes ----

FAMILY_WINDOW = 5  # a sliding window short enough to bind at the tests' sequence lengths (>= 12 tokens)


def make_family_config(family: str, **overrides):
    """A tiny config of `family` built by transformers' own config class, shaped like make_llama_config:
      llama           the conftest Llama
      mistral         every layer a sliding window of FAMILY_WINDOW keys ("mistral_nowindow": none)
      qwen2           q/k/v biases; layers 2-3 windowed (use_sliding_window, max_window_layers=2)
      qwen3           per-head q/k RMSNorm, explicit head_dim 24 (H*d != hidden), layer 3 windowed
      qwen3_moe       Qwen3's attention, 8 experts of 32 top-2 (not renormalised), layer 1 a dense SwiGLU
                      (mlp_only_layers), every layer windowed ("qwen3_moe_norm": renormalised top-k, every
                      2nd layer MoE (decoder_sparse_step), no window)
      mixtral         4 experts of intermediate_size top-2 (always renormalised), every layer windowed
      qwen2_moe       Qwen2's attention (q/k/v biases, layers 0 and 2 windowed), 6 experts of 32 top-2
                      renormalised, a gated shared expert of 48, layer 3 dense (mlp_only_layers)
      gpt_oss         sinks, q/k/v/o biases, layers 0 and 2 windowed (GptOssConfig's alternating layer_types),
                      head_dim 24, 4 experts of 96 top-2 with biases; swiglu_limit 0.5, low enough that the
                      clamps bind (7.0 in the real models)
    """
    from transformers import MistralConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    base = make_llama_config().to_dict()
    common = {k: base[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                   "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                                   "pad_token_id")}
    if family == "llama":
        return make_llama_config(**overrides)
    if family in ("mistral", "mistral_nowindow"):
        kwargs = dict(common, sliding_window=FAMILY_WINDOW if family == "mistral" else None)
        cls = MistralConfig
    elif family == "qwen2":
        kwargs = dict(common, use_sliding_window=True, sliding_window=FAMILY_WINDOW, max_window_layers=2)
        cls = Qwen2Config
    elif family == "qwen3":
        layer_types = ["full_attention"] * (common["num_hidden_layers"] - 1) + ["sliding_attention"]
        kwargs = dict(common, head_dim=24, use_sliding_window=True, sliding_window=FAMILY_WINDOW,
                      layer_types=layer_types)
        cls = Qwen3Config
    elif family == "qwen3_moe":
        kwargs = dict(common, head_dim=24, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=False, mlp_only_layers=[1], use_sliding_window=True, sliding_window=FAMILY_WINDOW)
        cls = Qwen3MoeConfig
    elif family == "qwen3_moe_norm":
        kwargs = dict(common, head_dim=24, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, decoder_sparse_step=2)
        cls = Qwen3MoeConfig
    elif family == "qwen2_moe":
        kwargs = dict(common, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[3],
                      use_sliding_window=True, sliding_window=FAMILY_WINDOW, max_window_layers=4)
        cls = Qwen2MoeConfig
    elif family == "mixtral":
        kwargs = dict(common, num_local_experts=4, num_experts_per_tok=2, sliding_window=FAMILY_WINDOW)
        cls = MixtralConfig
    elif family == "gpt_oss":
        from transformers import GptOssConfig

        kwargs = dict(common, head_dim=24, num_local_experts=4, num_experts_per_tok=2, intermediate_size=96,
                      sliding_window=FAMILY_WINDOW, swiglu_limit=0.5, max_position_embeddings=131072)
        cls = GptOssConfig
    else:
        raise ValueError(family)
    kwargs.update(overrides)
    return cls(**kwargs)


FAMILY_PARENTS = ("llama", "mistral", "mistral_nowindow", "qwen2", "qwen3")
MOE_PARENTS = ("qwen3_moe", "qwen3_moe_norm", "mixtral", "qwen2_moe", "gpt_oss")  # the MoE families' tiny parents (family: the prefix)


def make_family_parent(family: str, seed: int = 0, **overrides):
    """transformers' own causal LM of `family`, with weights wide enough that every part matters: matrices
    N(0, 0.08) (an MoE's router and its experts' fused 3-D weights too), biases N(0, 0.1), q/k norm weights
    N(1, 0.2), attention sinks N(0, 1) (transformers initialises the biases and norms constant, Qwen3-MoE's
    router to zeros, the sinks N(0, 0.02))."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_family_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "q_norm" in name or "k_norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("sinks"):
                p.normal_(0.0, 1.0)
    return model


import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

RELOAD = textwrap.dedent(
    """
    import json, sys, torch, transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    print("transformers", transformers.__version__)
    x = load_file(sys.argv[2])["x"]
    out = {}
    for name, path in json.loads(sys.argv[1]).items():
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=sys.argv[4] == "1").eval()
        with torch.no_grad():
            out[name] = model(x).logits
        print(name, type(model).__name__, type(model).__module__)
    assert "puzzle" not in sys.modules, "must load without the puzzle package"
    save_file(out, sys.argv[3])
    """
)


def reload_elsewhere(dirs: dict, x: torch.Tensor, tmp_path, remote_code: bool,
                     pythonpath: str | None = None) -> tuple[dict, str]:
    """Logits of each checkpoint loaded by AutoModelForCausalLM in a process that never imports puzzle
    (`pythonpath`: where that process finds its transformers first, e.g. an older release)."""
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    run = subprocess.run(
        [sys.executable, "-c", RELOAD, json.dumps({k: str(v) for k, v in dirs.items()}), str(tmp_path / "x.safetensors"),
         str(tmp_path / "logits.safetensors"), "1" if remote_code else "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(tmp_path / "logits.safetensors")), run.stdout
