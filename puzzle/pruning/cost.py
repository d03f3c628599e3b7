"""importance's and prune's cost models (`puzzle plan`)."""

from typing import Any

from puzzle.footprint import DTYPE_BYTES, FP32, Context, Estimate, load_peak_bytes, placed, unread_bytes
from puzzle.metrics import CHUNK_TOKENS, KL_CHUNK_TEMPORARIES
from puzzle.model.blocks import FFNConfig
from puzzle.pruning.shape import pruned_shape, target_sizes
from puzzle.shape import ModelShape


def score_floats(shape: ModelShape) -> int:
    """The fp32 scores importance writes (importance.py's keys): per layer its heads, KV groups and FFN
    neurons, or an MoE layer's three router statistics and neurons per expert (E x (3 + I)) and its shared
    expert's; the channels; Block Importance and, for block size 1 (the default), the drop losses and KL
    (each written twice: `.k1` and plain)."""
    per_layer = 0
    for name in shape.parent_ffns or [f"ffn_{shape.intermediate_size}"] * shape.num_hidden_layers:
        ffn = FFNConfig.from_name(name)
        if ffn.is_moe:
            per_layer += ffn.moe.num_experts * (3 + ffn.moe.expert_size) + (ffn.moe.shared_expert_size or 0)
        else:
            per_layer += ffn.intermediate_size or 0
    heads = shape.num_attention_heads + shape.num_key_value_heads
    return per_layer + shape.num_hidden_layers * (heads + 5) + shape.hidden_size + 1  # + the intact model's loss


def importance_cost(ctx: Context, s: Any) -> Estimate:
    """importance: to_puzzle(load_model(parent, dtype)) placed on its device (P_e; on the CPU less what it
    never reads, `unread_bytes`), then forward passes of batch_size x seq_len with hooks: one layer's
    activations (e; the largest layer's) and, when drop_samples > 0, the batch's logits (fp32) alive at a
    time; the statistics (`score_floats`, fp32) are small. An MoE layer's router statistics recompute its
    router (N x E logits and probabilities in fp32, N x k weights) beside its forward: E*D multiply-adds
    per token, next to the k*3*D*I of its experts, left out (puzzle/pruning/commands.py, importance.py)."""
    shape, T = ctx.shape, s.seq_len or ctx.seq_len
    device, dtype = ctx.runtime(s.device, s.dtype)
    e, b = DTYPE_BYTES[dtype], s.batch_size * T
    logits = s.drop_samples > 0  # only the drop-layer losses use the LM head (importance.py)
    working = ctx.model_bytes(e) - unread_bytes(ctx, device, e, logits) + ctx.layer_activation_bytes(b, e)
    if logits:  # the batch's reference logits, and one chunk's loss temporaries per dropped run (kd_terms)
        working += (b + KL_CHUNK_TEMPORARIES * min(b, CHUNK_TOKENS)) * ctx.logits_bytes_per_token
    est = Estimate("", "importance", disk_bytes=score_floats(shape) * FP32, dtype=dtype,
                   flops=s.n_samples * T * shape.model_flops_per_token(None, T / 2))
    return placed(est, device, load_peak_bytes(ctx, e), working)


# Tokens of one packed cloze item (context once, then its 4 choices; mc.py `_pack`): 132 on the reference
# run's held-out passages with SmolLM2's tokenizer (13,233 tokens for 100 items).
TASK_ITEM_TOKENS = 132


def task_forwards(layers: int, k: int) -> float:
    """Whole-model forwards that `--depth-method task` costs (task_depth.score_windows): the intact model,
    then each of the L - k + 1 windows with its suffix and one layer of prefix replay (none after the last):
    7.3 for 12 of SmolLM2's 30 layers, where running each pruned model in full would be 12.4."""
    windows = range(layers - k + 1)
    return 1 + sum(layers - s - k + (s < layers - k) for s in windows) / layers


def prune_cost(ctx: Context, s: Any) -> Estimate:
    """prune (puzzle/pruning/commands.py, prune.py): to_puzzle(load_model(parent, dtype)) placed on its
    device (P_e, every weight read: each kept one is sliced or copied into the pruned model), the sliced
    state dict (at most the pruned model C_e, on the device), then the pruned model built by transformers on
    the host in fp32 (C_fp32; cast to e after) into which the state is copied, and streamed to safetensors
    (`save_checkpoint`). No FLOPs to speak of (index_select and copies), except `--depth-method task`'s
    forward passes over its task items (`task_forwards`); the activations of one task batch are small next to
    the two models. An MoE parent's pruned experts (`--experts`, `--top-k`) shrink C like any other width;
    its experts are restacked into transformers' fused parameters (`transformers_moe_state`: one more copy of
    C's experts, on the device) before the copy into the built model."""
    device, dtype = ctx.runtime(s.device, s.dtype)
    e = DTYPE_BYTES[dtype]
    parent = ctx.shape
    hidden, ffn, drop = target_sizes(parent, s.target_params, s.target_mode, s.params_scope, s.hidden_size,
                                     s.ffn_size, s.drop_layers)
    # which layers go leaves the count unchanged (but for a Qwen-MoE parent's dense layers: the last go here)
    keep = list(range(parent.num_hidden_layers - drop))
    child = pruned_shape(parent, hidden, ffn, s.heads_per_group, s.kv_groups, keep, s.experts, s.top_k)
    built = child.model_bytes(None, FP32) + (child.model_bytes(None, e) if e != FP32 else 0)  # fp32, then cast
    est = Estimate("", "prune", disk_bytes=child.model_bytes(None, e), dtype=dtype, seconds=0.0,
                   note=f"pruned: {child.total_params() / 1e9:.3f}B parameters")
    if s.depth_method == "task" and drop:  # the windows are scored by forward passes over the task's items
        T = TASK_ITEM_TOKENS
        est.seconds = None
        est.flops = s.task_items * T * parent.model_flops_per_token(None, T / 2) * task_forwards(parent.num_hidden_layers, drop)
    working = ctx.model_bytes(e) + child.model_bytes(None, e) * (2 if parent.parent_ffns else 1)
    if device == "cuda":
        return placed(est, device, max(load_peak_bytes(ctx, e), built), working)
    return placed(est, device, 0, working + built)
