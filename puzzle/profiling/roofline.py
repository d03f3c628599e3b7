"""Roofline costs of every sublayer variant and of a whole model: pure functions over plain numbers.

Each sublayer is a short list of `Op`s (a norm, a matmul, the attention core, an elementwise pass);
an op takes max(flops / achievable FLOP/s, bytes / achievable bandwidth) plus a fixed cost per kernel
(eager op) it launches; a sublayer takes the sum of its ops. Weights are read once per op call
(once per forward), activations are read and written once per pass.

Phases (B = batch, T = input_len, S = decode context, D hidden, H query heads, K KV heads, d head_dim,
I FFN width, V vocabulary, e bytes per element of the workload dtype):
  prefill  B*T tokens through the sublayer; causal attention over T keys: QK^T and PV each cost
           2*B*H*d*T*(T+1)/2 FLOPs (only the lower triangle), the K/V of all T tokens are written.
  decode   one step: B tokens, each attending to S = input_len + output_len // 2 keys (the mean over
           the generation, so output_len steps at S cost what the real steps cost in total); the
           whole KV cache of the layer is read once.
  KV cache memory: 2 * K * d * B * (input_len + output_len) * e (the cache at the end of the
           generation); zero for linear and no-op attention.
  MoE FFN  (`moe_ops`) FLOPs from the active parameters (router + k experts per token); weight bytes of the
           experts the phase's n tokens touch, U = sum_j 1 - (1 - p_j)^n (uniform p_j = k/E unless measured
           frequencies are given: routing.py), so a decode step of B tokens reads U(B) <= E experts and a
           prefill of B*T tokens nearly all; per chosen expert, its eager dispatch ops; under expert
           parallelism (`workload.expert_parallel`) one GPU's share plus an all-reduce over the link.
Fixed costs (shared by every child): the embedding lookup (a gather, no matmul), the final norm and
the LM head (D x V matmul on the last position of each request only, as generation needs), with the
engine's own work per forward pass (`device.step_overhead_s`: a serving engine's scheduler, input
preparation and sampler; measured by calibration, zero for plain torch), which no child can remove and
which therefore bounds the speedup any child reaches in that engine.

Whole model = fixed + sum of sublayers; generation time = prefill + output_len * decode step;
throughput = B * output_len / generation time. A child's figures therefore follow from its block
choices alone, and the solver can add up table rows.
"""

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig, MoEConfig
from puzzle.shape import FIXED_PARTS, ModelShape, expected_experts  # noqa: F401  (re-exported for the profiling stage)
from puzzle.units import GIB

from .hardware import Device, HardwareProfile, Workload

Phase = Literal["prefill", "decode"]
# Eager PyTorch ops each sublayer launches in puzzle.model (counted with torch.profiler): they set the
# fixed per-op overhead that dominates tiny CPU ops. LlamaRMSNorm: to, pow, mean, add, rsqrt, mul, to, mul.
NORM_KERNELS = 8
ROPE_KERNELS = 16  # unsqueeze x2 + (mul, slice, slice, neg, cat, mul, add) for q and for k
# modeling_puzzle.py `MoEFFN.forward`: reshape, zeros_like, unique (+ its host sync), view, and `route`'s
# gate linear, softmax, topk, sum + div (renormalising families), to: 10 eager ops per call (9 without
# renormalising; the difference is below the model's resolution).
ROUTER_KERNELS = 10
# ... and per expert some token chose: `chosen == j`, where, the row gather flat[token], the weight gather
# weights[token, slot, None], the scaling mul, to, index_add_ (7 dispatch ops), plus its SwiGLU's 5 (gate
# and up linears: 2, silu and mul: 2, down linear: 1).
EXPERT_DISPATCH_KERNELS = 7


@dataclass(frozen=True)
class Op:
    name: str
    flops: float
    bytes: float
    kernels: float = 1  # eager ops it launches; an expected count where it depends on routing (MoE experts)
    steps: int = 0  # forward passes of the whole model it stands for (the engine's per-step work)
    link_bytes: float = 0.0  # bytes each GPU sends over the interconnect (expert parallelism's all-reduce)


def op_time(op: Op, device: Device, dtype: str) -> float:
    """Roofline seconds of one op: the slower of compute and memory, plus its launch and per-step overheads,
    plus its interconnect traffic at the device's link bandwidth (added, not overlapped with the rest: pessimistic)."""
    compute = op.flops / device.flops_per_s(dtype)
    memory = op.bytes / device.bytes_per_s
    link = op.link_bytes / device.interconnect_bandwidth if op.link_bytes else 0.0
    return max(compute, memory) + op.kernels * device.kernel_overhead_s + op.steps * device.step_overhead_s + link


def ops_time(ops: Iterable[Op], device: Device, dtype: str) -> float:
    return sum(op_time(op, device, dtype) for op in ops)


# --- building blocks ------------------------------------------------------------------------------

def matmul(name: str, n: int, k: int, m: int, e: int, kernels: int = 1) -> Op:
    """(n, k) @ (k, m): 2nkm FLOPs; reads the weight and the input, writes the output."""
    return Op(name, 2.0 * n * k * m, float(e) * (k * m + n * k + n * m), kernels)


def rms_norm(n: int, D: int, e: int) -> Op:
    """RMSNorm of n tokens: reads x and the weight, writes y; about 4 FLOPs per element."""
    return Op("norm", 4.0 * n * D, float(e) * (2 * n * D + D), NORM_KERNELS)


def residual(n: int, D: int, e: int) -> Op:
    return Op("residual", float(n * D), 3.0 * e * n * D, 1)


def tokens(workload: Workload, phase: Phase) -> int:
    return workload.batch_size * (workload.input_len if phase == "prefill" else 1)


def attention_ops(shape: ModelShape, config: AttentionConfig, workload: Workload, phase: Phase) -> list[Op]:
    """The ops of one attention sublayer (its pre-norm and the residual add included); [] for no-op. With a
    sliding window W (`config.window`) queries see, and the cache holds, at most W keys."""
    if config.no_op:
        return []
    e, D, B = workload.dtype_bytes, shape.hidden_size, workload.batch_size
    n = tokens(workload, phase)
    if config.replace_with_linear:
        return [rms_norm(n, D, e), matmul("linear", n, D, D, e), residual(n, D, e)]
    if config.is_mamba:
        return [rms_norm(n, D, e), *mamba_ops(shape, config, workload, phase), residual(n, D, e)]
    H, d, K = shape.num_attention_heads, shape.head_dim, shape.kv_heads(config)
    qkv = matmul("qkv_proj", n, D, (H + 2 * K) * d, e, kernels=9)  # 3 linears, each + view + transpose
    rope = Op("rope", 6.0 * n * (H + K) * d, 2.0 * e * n * (H + K) * d, ROPE_KERNELS)
    if phase == "prefill":
        T = workload.input_len
        flops = float(B * shape.causal_attention_flops(config, T))  # QK^T and PV over the causal triangle
        io = n * (H + 2 * K) * d + n * H * d  # read q, k, v; write the output
        kv_write = 2 * n * K * d
        core = Op("attention", flops, float(e) * (io + kv_write), 3)  # 2 cache writes + sdpa
    else:
        S = shape.keys(config, workload.decode_context)
        flops = float(B * shape.attention_flops(config, S))  # one query row against S keys, QK^T and PV
        kv_read = 2 * B * K * d * S
        io = 2 * n * H * d + 2 * n * K * d  # read q, write out; write the new k, v
        core = Op("attention", flops, float(e) * (kv_read + io), 3)
    o = matmul("o_proj", n, H * d, D, e, kernels=3)  # transpose + reshape + linear
    return [rms_norm(n, D, e), qkv, rope, core, o, residual(n, D, e)]


def mamba_ops(shape: ModelShape, config: AttentionConfig, workload: Workload, phase: Phase) -> list[Op]:
    """A Mamba2 mixer's ops (puzzle/model/mamba.py `Mamba2Mixer`, transformers `NemotronHMamba2Mixer`): in_proj
    D -> 2I + 2GN + Hm, the depthwise causal conv over C = I + 2GN channels and silu, the scan, the gated norm
    and out_proj I -> D. A prefill runs the chunked scan (SSD: C B^T within each chunk of Q tokens, the chunk
    states and their read-out; FLOPs `ModelShape.mamba_flops_per_token`) over the whole sequence and writes
    the final states; a decode step reads and writes each sequence's conv state (K-1)*C and fp32 SSM state
    Hm*P*N (`ModelShape.recurrent_state_bytes`): the bytes that take the KV cache's place."""
    e, D, B = workload.dtype_bytes, shape.hidden_size, workload.batch_size
    n = tokens(workload, phase)
    Hm, P, N, G, I = shape.mamba_dims(config)
    C = I + 2 * G * N
    prefill = phase == "prefill"
    in_proj = matmul("in_proj", n, D, 2 * I + 2 * G * N + Hm, e)
    conv = Op("conv1d_silu", 2.0 * n * C * shape.conv_kernel + 4.0 * n * C, float(e) * 3 * n * C, 2)
    state = B * shape.recurrent_state_bytes(config, e)  # read (decode) or written (prefill) once per step
    scan_flops = n * (shape.mamba_flops_per_token(config, prefill) - 2 * C * shape.conv_kernel)
    scan = Op("ssd_scan" if prefill else "ssm_step", float(scan_flops),
              float(e) * n * (C + Hm + I) + (1 if prefill else 2) * state, 12 if prefill else 6)
    norm = Op("gated_norm", 8.0 * n * I, float(e) * 3 * n * I, 4)
    out = matmul("out_proj", n, I, D, e)
    return [in_proj, conv, scan, norm, out]


def ffn_ops(shape: ModelShape, config: FFNConfig, workload: Workload, phase: Phase,
            frequencies: Sequence[float] | None = None) -> list[Op]:
    """The ops of one FFN sublayer (pre-norm and residual included); [] for no-op. An MoE FFN's routing
    follows `frequencies` (its experts' measured selection frequencies, `read_expert_frequencies`), uniform
    when None or when their count is not the block's (an expert-pruned child's)."""
    if config.no_op:
        return []
    e, D = workload.dtype_bytes, shape.hidden_size
    n = tokens(workload, phase)
    if config.replace_with_linear:
        return [rms_norm(n, D, e), matmul("linear", n, D, D, e), residual(n, D, e)]
    if config.is_moe:
        return [rms_norm(n, D, e), *moe_ops(shape, config.moe, n, e, workload.expert_parallel, frequencies), residual(n, D, e)]
    I = config.intermediate_size
    if shape.dense_ffn == "relu2":  # NemotronH: down(relu(up(x))^2), no gate
        up = matmul("up_proj", n, D, I, e)
        act = Op("relu2", 2.0 * n * I, 2.0 * e * n * I, 2)
        return [rms_norm(n, D, e), up, act, matmul("down_proj", n, I, D, e), residual(n, D, e)]
    gate_up = matmul("gate_up_proj", n, D, 2 * I, e, kernels=2)
    act = Op("silu_mul", 5.0 * n * I, 5.0 * e * n * I, 2)  # silu: read g, write; mul: read 2, write
    down = matmul("down_proj", n, I, D, e)
    return [rms_norm(n, D, e), gate_up, act, down, residual(n, D, e)]


def moe_ops(shape: ModelShape, moe: MoEConfig, n: int, e: int, expert_parallel: int = 1,
            frequencies: Sequence[float] | None = None) -> list[Op]:
    """An MoE FFN's ops on n tokens (modeling_puzzle.py `MoEFFN`), as one GPU of `expert_parallel` runs them.

    The router: (n, D) @ (D, E) plus softmax and top-k. The experts: n*k rows (each token's k choices) through
    SwiGLUs of width I, so FLOPs follow the active parameters (2 per multiply-add of k experts per token);
    their weights are read once per expert that some token chose: U = `expected_experts` (uniform routing
    unless measured frequencies are given), so a decode step of a small batch reads U << E experts and a
    prefill of many tokens all E. Each chosen expert launches its SwiGLU's 5 ops and EXPERT_DISPATCH_KERNELS
    dispatch ops (gathers, scaling, index_add_), which price the per-expert cost of eager dispatch through
    the profile's kernel_overhead_s. A shared expert runs on all n tokens (its sigmoid gate: one more linear).

    Expert parallelism over G GPUs (`workload.expert_parallel`): every GPU holds E/G experts and the routed
    rows of its experts, so expert FLOPs, weight bytes and dispatch ops are divided by G (the mean GPU: each
    holds U/G of the chosen experts in expectation); the router, the shared expert and the rest of the model
    are replicated. The partial outputs are summed across GPUs by an all-reduce of the (n, D) output, 2(G-1)/G
    x n*D*e bytes per GPU over the link (a ring all-reduce; vLLM's FusedMoE with expert parallelism reduces its
    output with tensor_model_parallel_all_reduce, vllm/model_executor/layers/fused_moe/layer.py)."""
    D, E, k, I, G = shape.hidden_size, moe.num_experts, moe.top_k, moe.expert_size, expert_parallel
    g = shape.ffn_matrices - 1  # the up-side matrices: gate and up (SwiGLU), up only (NemotronH's relu2)
    if frequencies is not None and len(frequencies) != E:
        frequencies = None  # measured on another expert set (an expert-pruned child): uniform
    U = expected_experts(E, k, n, frequencies) / G  # chosen experts on one GPU
    rows = n * k / G  # token-expert pairs one GPU computes
    ops = [matmul("router", n, D, E, e, kernels=ROUTER_KERNELS),
           Op("experts_gate_up", 2.0 * rows * D * g * I, float(e) * (U * D * g * I + rows * D + rows * g * I), g * U),
           Op("experts_silu_mul", (5.0 if g == 2 else 2.0) * rows * I, (5.0 if g == 2 else 2.0) * e * rows * I, 2 * U),
           Op("experts_down", 2.0 * rows * I * D, float(e) * (U * I * D + rows * I + rows * D), U),
           # gather each row's input, scale its output by the top-k weight, add it into the (n, D) output
           Op("expert_dispatch", 2.0 * rows * D, float(e) * (rows * D * 5 + n * D), EXPERT_DISPATCH_KERNELS * U)]
    if moe.shared_expert_size is not None:
        S = moe.shared_expert_size
        gate = shape.shared_expert_gate
        ops += [matmul("shared_gate_up", n, D, g * S + gate, e, kernels=g + gate),
                Op("shared_silu_mul", 5.0 * n * S, 5.0 * e * n * S, 2 + 2 * gate),  # + sigmoid and mul of the gate
                matmul("shared_down", n, S, D, e), Op("shared_add", float(n * D), 3.0 * e * n * D, 1)]
    if G > 1:
        ops.append(Op("experts_all_reduce", float(n * D), 0.0, 1, link_bytes=2.0 * (G - 1) / G * n * D * e))
    return ops


def sublayer_ops(shape: ModelShape, kind: str, config: AttentionConfig | FFNConfig, workload: Workload, phase: Phase,
                 frequencies: Sequence[float] | None = None) -> list[Op]:
    if kind == "attention":
        return attention_ops(shape, config, workload, phase)
    return ffn_ops(shape, config, workload, phase, frequencies)


# --- parameters and memory ------------------------------------------------------------------------

def kv_cache_bytes(shape: ModelShape, config: AttentionConfig | FFNConfig, workload: Workload) -> int:
    """KV cache of one layer at the end of the generation: 2 * K * d * B * min(in + out, W) * e, the context
    bounded by the variant's sliding window W."""
    tokens = workload.batch_size * int(shape.keys(config, workload.max_context))
    state = workload.batch_size * shape.recurrent_state_bytes(config, workload.dtype_bytes)  # a Mamba2 layer's
    return shape.kv_cache_bytes_per_token(config, workload.dtype_bytes) * tokens + state


def gpu_params(shape: ModelShape, config: AttentionConfig | FFNConfig, expert_parallel: int = 1) -> int:
    """Weights of a variant one GPU holds: all of them, but 1/G of an MoE FFN's experts under expert parallelism."""
    params = shape.params(config)
    if expert_parallel > 1 and isinstance(config, FFNConfig) and config.is_moe:
        moe = config.moe
        held = -(-moe.num_experts // expert_parallel)  # the fullest GPU's experts: ceil(E / G)
        params -= (moe.num_experts - held) * shape.ffn_matrices * shape.hidden_size * moe.expert_size
    return params


def sublayer_costs(
    shape: ModelShape, kind: str, config: AttentionConfig | FFNConfig, profile: HardwareProfile,
    frequencies: Sequence[float] | None = None,
) -> dict[str, float]:
    """params, param_bytes, kv_cache_bytes, prefill_s, decode_s of one sublayer variant (roofline; its sliding
    window, if any, bounds the attention's keys and cache); an MoE FFN routed by `frequencies` (uniform when
    None). Under expert parallelism (`workload.expert_parallel` G > 1) param_bytes and the times are one GPU's
    (E/G of the experts); params stays the whole variant's."""
    w, dev = profile.workload, profile.device
    params = shape.params(config)
    return {
        "params": params,
        "param_bytes": gpu_params(shape, config, w.expert_parallel) * w.dtype_bytes,
        "kv_cache_bytes": kv_cache_bytes(shape, config, w),
        "prefill_s": ops_time(sublayer_ops(shape, kind, config, w, "prefill", frequencies), dev, w.dtype),
        "decode_s": ops_time(sublayer_ops(shape, kind, config, w, "decode", frequencies), dev, w.dtype),
    }


# --- fixed costs ----------------------------------------------------------------------------------

def fixed_ops(shape: ModelShape, part: str, workload: Workload, phase: Phase) -> list[Op]:
    e, D, V = workload.dtype_bytes, shape.hidden_size, shape.vocab_size
    n = tokens(workload, phase)
    if part == "embeddings":
        return [Op("embedding", 0.0, 2.0 * e * n * D, 1)]  # gather n rows, write them
    if part == "final_norm":
        return [rms_norm(n, D, e)]
    if part == "lm_head":  # last position of each request; then the engine samples: its per-step work
        return [matmul("lm_head", workload.batch_size, D, V, e), Op("engine_step", 0.0, 0.0, 0, steps=1)]
    raise ValueError(f"unknown fixed part {part!r}")


def fixed_costs(shape: ModelShape, profile: HardwareProfile) -> dict[str, dict[str, float]]:
    """{part: {params, param_bytes, prefill_s, decode_s}} for embeddings, final_norm, lm_head."""
    w, dev = profile.workload, profile.device
    out = {}
    for part in FIXED_PARTS:
        params = shape.fixed_params(part)
        out[part] = {
            "params": params,
            "param_bytes": params * w.dtype_bytes,
            "prefill_s": ops_time(fixed_ops(shape, part, w, "prefill"), dev, w.dtype),
            "decode_s": ops_time(fixed_ops(shape, part, w, "decode"), dev, w.dtype),
        }
    return out


# --- whole model ----------------------------------------------------------------------------------

SUMMED = ("params", "param_bytes", "kv_cache_bytes", "prefill_s", "decode_s")


def combine_costs(fixed: dict[str, dict[str, float]], sublayers: Iterable[dict[str, float]], workload: Workload) -> dict[str, float]:
    """Whole-model figures from fixed parts + sublayer rows (any source: roofline or measured).

    Returns params, param_bytes, kv_cache_bytes, memory_bytes (weights + KV cache), prefill_s (whole
    batch), decode_s (one step of the whole batch), generation_s = prefill_s + output_len * decode_s,
    throughput_tokens_s = batch * output_len / generation_s, and the workload's batch/lengths.
    """
    total = {k: 0.0 for k in SUMMED}
    for row in list(fixed.values()) + list(sublayers):
        for k in SUMMED:
            total[k] += float(row.get(k, 0.0))
    for k in ("params", "param_bytes", "kv_cache_bytes"):
        total[k] = int(total[k])
    generation = total["prefill_s"] + workload.output_len * total["decode_s"]
    return {
        **total,
        "memory_bytes": total["param_bytes"] + total["kv_cache_bytes"],
        "generation_s": generation,
        "throughput_tokens_s": workload.batch_size * workload.output_len / generation,
        "batch_size": workload.batch_size,
        "input_len": workload.input_len,
        "output_len": workload.output_len,
    }


def parent_blocks(config: Any) -> list[BlockConfig]:
    """The blocks of a config: its block_configs for a puzzle child, else the parent's block per layer."""
    if getattr(config, "block_configs", None) is not None and hasattr(config, "blocks"):
        return config.blocks
    return ModelShape.from_config(config).parent_blocks


def predict_model_costs(parent_config: Any, blocks: list[BlockConfig], profile: HardwareProfile,
                        frequencies: Mapping[int, Sequence[float]] | None = None) -> dict[str, float]:
    """Roofline figures of a whole model with these blocks on the profile's device and workload.

    `parent_config` gives the widths shared by every child (hidden size, query heads, head_dim,
    vocabulary, tied embeddings); `blocks` one BlockConfig per layer (any number of layers);
    `frequencies` layer -> its MoE experts' measured selection frequencies (`read_expert_frequencies`;
    a layer without them routes uniformly). Keys as in `combine_costs`.
    """
    shape = ModelShape.from_config(parent_config)
    frequencies = frequencies or {}
    rows = []
    for layer, block in enumerate(blocks):
        rows.append(sublayer_costs(shape, "attention", block.attention, profile))
        rows.append(sublayer_costs(shape, "ffn", block.ffn, profile, frequencies.get(layer)))
    return combine_costs(fixed_costs(shape, profile), rows, profile.workload)


# --- serving memory -------------------------------------------------------------------------------

def serving_fit(shape: ModelShape, profile: HardwareProfile, gpus: int) -> dict[str, float]:
    """Whether the parent serves on `gpus` of the profile's GPU, in the workload's dtype, at its batch and full
    context (input + output tokens: the cache at the generation's end; a windowed layer holds its window).

    Weights are split evenly over the GPUs (tensor-parallel attention, dense layers and embeddings, expert-
    parallel experts, as vLLM's `--tensor-parallel-size G --enable-expert-parallel` shards them); the KV cache
    over min(G, K) of them, K the KV heads: vLLM replicates a KV head once the GPUs outnumber them
    (vllm/model_executor/layers/linear.py `QKVParallelLinear`: num_kv_head_replicas = tp_size // K). One GPU
    gives the profile's `memory_gib` constraint (solve's budget for weights + KV cache) or else its memory;
    activations and the engine's workspace are left out. Returns weight_bytes, kv_cache_bytes (whole model),
    per_gpu_bytes, usable_bytes (one GPU), fits (0/1), max_batch (the largest batch whose cache fits beside
    the weights at this context, 0 when the weights alone do not)."""
    w = profile.workload
    usable = profile.constraints["memory_gib"] * GIB if "memory_gib" in profile.constraints else profile.device.memory_bytes
    weights = shape.model_bytes(None, w.dtype_bytes)
    per_request = shape.kv_cache_bytes(None, w.max_context, w.dtype_bytes, w.max_context)
    kv_split = min(gpus, shape.num_key_value_heads)
    per_gpu = weights / gpus + w.batch_size * per_request / kv_split
    room = usable - weights / gpus
    max_batch = 0 if room <= 0 else int(room // (per_request / kv_split)) if per_request else 10**9
    return {"gpus": gpus, "weight_bytes": weights, "kv_cache_bytes": w.batch_size * per_request,
            "per_gpu_bytes": per_gpu, "usable_bytes": usable, "fits": int(per_gpu <= usable), "max_batch": max_batch}
