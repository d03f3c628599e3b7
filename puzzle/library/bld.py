"""Decoupled blockwise local distillation (BLD) of every variant of a group of layers.

For layer l the parent computes, from the hidden state h entering it,
    a = h + attn(ln1(h))        (residual stream after attention)
    o = a + ffn(ln2(a))         (layer output)
An attention variant is trained in place of attn next to the parent's frozen FFN: its output
a' + ffn(ln2(a')), a' = h + attn'(ln1'(h)), is compared with o. An FFN variant is trained in place of ffn
on a: a + ffn'(ln2'(a)) against o. The loss is the normalised MSE
    ||child - o||^2 / ||o - x||^2,     x = h (attention) or a (FFN),
i.e. MSE(child, parent) / MSE(parent, 0) over what the block adds to the residual stream: the
residual passes through both unchanged, so the numerator is the plain MSE of the layer outputs; the
denominator counts only the block's own contribution, so 0 is the parent and 1 is as bad as an FFN no-op.

One parent forward per batch, up to the group's last layer, feeds every variant of every layer the group
owns (they train in lockstep, each with its own AdamW and cosine schedule); the parent is never re-run
per variant. Parent-identical variants and no-ops are measured but not trained. A linear FFN is linear in
its weights, so its BLD loss is least squares: it accumulates the normal equations over the same batches
(and the calibration tokens) and is solved exactly at the end instead of taking AdamW steps.
"""

import functools
import hashlib
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from puzzle import training
from puzzle.data.blocks import iterate_batches
from puzzle.device import CPU_FP32, Runtime, place, resolve
from puzzle.errors import PuzzleError
from puzzle.io import JsonlLog, read_json
from puzzle.library import store
from puzzle.library.cost import group_variants, parent_forward_flops, steps as bld_steps, variant_train_flops
from puzzle.library.init import FFNCalibration, init_attention, init_ffn, init_moe_ffn, ridge_solve
from puzzle.model.blocks import AttentionConfig, FFNConfig
from puzzle.model.modeling_puzzle import (PuzzleForCausalLM, attention_residual, build_attention, build_ffn, build_norm,
                                          ffn_residual)
from puzzle.model.surgery import sublayer_state
from puzzle.run_dir import RunDir
from puzzle.search_space import SearchSpace, Variant
from puzzle.shape import ModelShape

FFNInit = Literal["auto", "channel_contribution", "minitron"]
_PARTS = {"attention": ("input_layernorm", "self_attn"), "ffn": ("post_attention_layernorm", "mlp")}


@dataclass(frozen=True)
class BLDSettings:
    tokens_per_block: int = 32768  # training tokens each variant sees
    batch_size: int = 4  # blocks per step
    seq_len: int | None = None  # crop the data's blocks to this length (None: as prepared)
    # SmolLM2 at 16k tokens: 3e-3 beat 1e-3 and 3e-4 on 15 of 16 AdamW-trained variants of layers 2 and 20;
    # a 30% warm-up (vs 5%) keeps near-lossless inits (ffn_1336, layers 11, 14, 29) from getting worse
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    calibration_tokens: int = 4096  # Channel Contribution and the linear FFN's least squares
    eval_tokens: int = 2048  # held-out tokens for the loss at init and at the end
    ffn_init: FFNInit = "auto"  # auto: Minitron neuron importance when the run has it, else Channel Contribution
    seed: int = 0
    log_every: int = 25
    # Resolved by build_library (puzzle.device): the parent's forward in `dtype`, the variants trained under
    # autocast in it with fp32 weights and AdamW state (fp32: plain fp32 training, as before the flag)
    device: str = "cpu"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("tokens_per_block", "batch_size", "calibration_tokens", "eval_tokens", "log_every"):
            if getattr(self, name) < 1:
                raise PuzzleError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise PuzzleError(f"seq-len must be at least 2, got {self.seq_len}")
        if not self.lr > 0:
            raise PuzzleError(f"lr must be positive, got {self.lr}")

    @property
    def runtime(self) -> Runtime:
        return resolve(self.device, self.dtype)

    def steps(self, seq_len: int) -> int:
        return bld_steps(self, seq_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self, run_dir: str | Path) -> str:
        """sha256 of what a trained variant's weights depend on besides the variant itself: the parent's
        content fingerprint (parent.json's), every setting but `log_every` (it changes the log, not the weights) and `device` (rounding only,
        like workers and threads), the dtype only when it is not fp32 (`Runtime.settings`: libraries trained
        before the flag keep their digest), the prepared data, and the Minitron importance's settings when
        FFNs may be initialised from it. A library entry trained under another digest is retrained
        (store.is_done)."""
        from puzzle.data.blocks import META_NAME, data_dir
        from puzzle.pruning.importance import has_importance, load_importance_settings

        settings = {k: v for k, v in self.to_dict().items() if k not in ("log_every", "device", "dtype")}
        settings.update({} if self.dtype == "fp32" else {"dtype": self.dtype})
        meta = data_dir(run_dir) / META_NAME  # absent when a caller hands build_layer_group its blocks directly
        settings["data"] = read_json(meta).get("fingerprint") if meta.exists() else None
        # the parent's content: a parent overwritten in place retrains every variant (puzzle/model/fingerprint.py)
        settings["parent"] = RunDir(run_dir).info().get("parent_fingerprint")
        if self.ffn_init != "channel_contribution" and has_importance(run_dir):
            settings["importance"] = load_importance_settings(run_dir)
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


# ----- modules ---------------------------------------------------------------------------------------


class Sublayer(nn.Module):
    """One layer's attention or FFN with its pre-norm, named as in PuzzleDecoderLayer, so `state_dict()` is
    the `sublayer_state` form the library stores. `forward` is the decoder layer's own residual step."""

    def __init__(self, config: Any, kind: str, variant: AttentionConfig | FFNConfig, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.kind = kind
        # a windowed attention variant masks with its own window (the parent's layer keeps its own)
        module = build_attention(config, variant) if kind == "attention" else build_ffn(config, variant)
        norm = build_norm(config) if module is not None else None
        norm_name, module_name = _PARTS[kind]
        setattr(self, norm_name, norm)
        setattr(self, module_name, module)
        self.load_state_dict(state, strict=True)

    @property
    def norm(self) -> nn.Module | None:
        return getattr(self, _PARTS[self.kind][0])

    @property
    def module(self) -> nn.Module | None:
        return getattr(self, _PARTS[self.kind][1])

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, T, D) -> x + sublayer(norm(x)), x itself for a no-op (as PuzzleDecoderLayer computes it)."""
        if self.kind == "attention":
            return attention_residual(self.norm, self.module, x, position_embeddings)
        return ffn_residual(self.norm, self.module, x)

    @classmethod
    def of(cls, block: nn.Module, kind: str) -> "Sublayer":
        """A decoder layer's own norm and module as a Sublayer: shared with the layer, not copied."""
        sub = cls.__new__(cls)
        nn.Module.__init__(sub)
        sub.kind = kind
        for name in _PARTS[kind]:
            setattr(sub, name, getattr(block, name))
        return sub


def _parent_sublayer(parent: PuzzleForCausalLM, layer: int, kind: str) -> Sublayer:
    """The parent's frozen sublayer (the target an attention variant trains next to): the parent's own
    modules, shared by every variant of the layer; nothing is cloned."""
    return Sublayer.of(parent.model.layers[layer], kind).requires_grad_(False).eval()


# ----- parent activations ----------------------------------------------------------------------------


@dataclass
class LayerActivations:
    h: torch.Tensor  # (B, T, D) entering the layer
    a: torch.Tensor  # (B, T, D) after attention
    o: torch.Tensor  # (B, T, D) layer output


@dataclass
class Batch:
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    layers: dict[int, LayerActivations]

    @property
    def tokens(self) -> int:
        return next(iter(self.layers.values())).h.shape[:2].numel()


@torch.no_grad()
def parent_activations(parent: PuzzleForCausalLM, ids: torch.Tensor, layers: Sequence[int]) -> Batch:
    """One parent forward up to the last of `layers`, keeping h, a, o of each of them."""
    model = parent.model
    ids = ids.to(model.embed_tokens.weight.device)
    B, T = ids.shape
    h = model.embed_tokens(ids)
    position_ids = torch.arange(T, device=ids.device)[None].expand(B, T)
    pe = model.rotary_emb(h, position_ids)
    wanted = set(layers)
    out: dict[int, LayerActivations] = {}
    for i in range(max(wanted) + 1):
        block = model.layers[i]
        a = block.attention_residual(h, pe)
        o = block.ffn_residual(a)
        if i in wanted:
            out[i] = LayerActivations(h, a, o)
        h = o
    return Batch(pe, out)


def _ffn_scores_for(layer: int, settings: "BLDSettings", neuron_scores: dict[int, torch.Tensor] | None) -> torch.Tensor | None:
    if settings.ffn_init == "channel_contribution" or neuron_scores is None:
        return None
    return neuron_scores.get(layer)


def _needs_calibration(v: Variant, scores: torch.Tensor | None, parent_ffn: FFNConfig | None = None) -> bool:
    """Pruned FFNs ranked by Channel Contribution, linear FFNs and MoE FFNs of narrower experts (than the
    layer's `parent_ffn`) are initialised from calibration data."""
    if v.kind != "ffn" or v.is_parent or v.config.no_op:
        return False
    if v.config.is_moe:
        return parent_ffn is not None and parent_ffn.is_moe and v.config.moe.expert_size < parent_ffn.moe.expert_size
    return v.config.replace_with_linear or scores is None


@torch.no_grad()
def calibrate_ffns(parent: PuzzleForCausalLM, ids_batches: Sequence[torch.Tensor], layers: Sequence[int]) -> dict[int, FFNCalibration]:
    """For each of `layers`, the parent FFN's |activations| summed over the calibration tokens (Channel
    Contribution) and its (normed input, output) pairs (the linear FFN's least squares); one parent
    forward per batch serves every layer."""
    sums: dict[int, torch.Tensor] = {}
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    ys: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    tokens = 0
    for ids in ids_batches:
        batch = parent_activations(parent, ids, layers)
        for i in layers:
            block, acts = parent.model.layers[i], batch.layers[i]
            x = block.post_attention_layernorm(acts.a).flatten(0, 1)  # (N, D)
            sums[i] = _abs_activation_sum(block.mlp, x) + sums.get(i, 0)
            xs[i].append(x)
            ys[i].append((acts.o - acts.a).flatten(0, 1))
        tokens += ids.numel()
    return {i: FFNCalibration(sums[i], tokens, torch.cat(xs[i]), torch.cat(ys[i])) for i in layers}


def _abs_activation_sum(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum over tokens x (N, D) of |silu(x W_gate^T) * (x W_up^T)|, the input of down_proj (I,), in fp32 under a
    bf16 parent; for an MoE FFN each expert's on every token (E, I)."""
    experts = getattr(mlp, "experts", None)
    if experts is not None:
        return torch.stack([_abs_activation_sum(e, x) for e in experts])
    if not hasattr(mlp, "gate_proj"):  # NemotronH's relu2 MLP: relu(x W_up^T)^2
        return torch.square(F.relu(mlp.up_proj(x))).float().sum(0)
    return (F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().float().sum(0)


# ----- losses ----------------------------------------------------------------------------------------


def block_error(variant: Variant, child: Sublayer, frozen_ffn: Sublayer | None, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared error vs the parent's layer output, sum of squares of what the parent block adds)."""
    acts = batch.layers[variant.layer]
    pe = batch.position_embeddings
    if variant.kind == "attention":
        out, base = frozen_ffn(child(acts.h, pe), pe), acts.h  # the variant's attention, the parent's FFN
    else:
        out, base = child(acts.a, pe), acts.a
    o = acts.o.float()  # the sums in fp32 whatever the forward's dtype (a no-op under fp32)
    return (out.float() - o).pow(2).sum(), (o - base.float()).pow(2).sum()


@torch.no_grad()
def normalised_mse(variant: Variant, child: Sublayer, frozen_ffn: Sublayer | None, batches: Sequence[Batch],
                   runtime: Runtime = CPU_FP32) -> float:
    err = ref = 0.0
    for batch in batches:
        with runtime.autocast():
            e, r = block_error(variant, child, frozen_ffn, batch)
        err, ref = err + e.item(), ref + r.item()
    return err / max(ref, 1e-30)


# ----- one variant under training --------------------------------------------------------------------


class NormalEquations:
    """X^T X and X^T Y over a linear block's (normed input, target) pairs, in float64, on the inputs' device.

    A linear FFN is linear in its weights, so its BLD loss is a least-squares problem: accumulating the
    normal equations over the batches and solving them once gives its exact minimiser over every token
    seen, which AdamW on an ill-conditioned input (cond ~ 1e3-1e4 on SmolLM2) only approaches slowly.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        self.xty = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
        self.add(x, y)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.double()
        self.xtx += x.T @ x
        self.xty += x.T @ y.double()

    def solve(self) -> torch.Tensor:
        """(D_out, D_in) weight W minimising ||x W^T - y||^2 over everything added (+ init.RIDGE's ridge)."""
        return ridge_solve(self.xtx, self.xty).T.float().contiguous()


@dataclass
class VariantRun:
    variant: Variant
    child: Sublayer
    frozen_ffn: Sublayer | None
    init: str
    loss_init: float
    trainer: Literal["adamw", "lstsq"] = "adamw"
    normal: NormalEquations | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: Any = None  # torch.amp.GradScaler: scales fp16-on-CUDA losses, a pass-through otherwise
    experts: list[int] | None = None  # an MoE variant's kept experts (the parent's indices)
    steps: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    flops: int = 0
    flops_per_token: int = 0
    last_loss: float = float("nan")


def _make_optimizer(run: VariantRun, settings: BLDSettings, steps: int, runtime: Runtime = CPU_FP32) -> None:
    """fp32 AdamW state over the fp32 (master) weights of the variant: fused on CUDA, foreach on the CPU;
    its LambdaLR's factor is the shared schedule from 1 down to `min_lr_ratio` (warm-up: a fraction of
    `steps`, in steps here)."""
    params = [p for p in run.child.parameters() if p.requires_grad]
    run.optimizer = training.adamw(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                   implementation=runtime.adamw_kwargs())
    run.scaler = runtime.grad_scaler()
    warmup = training.warmup_steps(steps, settings.warmup_fraction)
    schedule = functools.partial(training.cosine_lr, steps=steps, warmup=warmup, peak=1.0, floor=settings.min_lr_ratio)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, schedule)


def train_step(run: VariantRun, batch: Batch, runtime: Runtime = CPU_FP32) -> float:
    """One step on `batch`; returns the batch's normalised MSE before the step. The forward runs under
    `runtime.autocast()` (fp32 weights, bf16 / fp16 matmuls; nothing under fp32), the backward and the
    AdamW step outside it, as torch's AMP recipe does."""
    if run.trainer == "lstsq":
        with torch.no_grad():
            acts = batch.layers[run.variant.layer]
            x = run.child.norm(acts.a).flatten(0, 1)  # (N, D) the linear FFN's input (fp32: the norm's gain is)
            y = (acts.o - acts.a).flatten(0, 1).float()  # (N, D) what the parent FFN adds
            run.normal.add(x, y)
            return ((run.child.module(x) - y).pow(2).sum() / y.pow(2).sum()).item()
    with runtime.autocast():
        err, ref = block_error(run.variant, run.child, run.frozen_ffn, batch)
    loss = err / ref
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)  # no gradient kept between steps: lockstep holds many variants
    run.scheduler.step()
    return loss.item()


def finish(run: VariantRun) -> None:
    """Put the trained weights in place (the least-squares solution of a linear FFN) and free the state."""
    if run.trainer == "lstsq":
        with torch.no_grad():
            run.child.module.linear_mlp.weight.copy_(run.normal.solve())
    run.optimizer = run.scheduler = run.normal = run.scaler = None
    run.child.eval()


# ----- the data --------------------------------------------------------------------------------------


def _crop(blocks: np.ndarray, seq_len: int | None) -> np.ndarray:
    if seq_len is None:
        return blocks
    if seq_len > blocks.shape[1]:
        raise PuzzleError(f"seq-len {seq_len} is longer than the prepared blocks ({blocks.shape[1]} tokens)")
    return blocks[:, :seq_len]


def _take(blocks: np.ndarray, n_tokens: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Batches covering at least `n_tokens` tokens, drawn in a seeded order (fewer when the data is short)."""
    n_blocks = min(len(blocks), math.ceil(n_tokens / blocks.shape[1]))
    return list(iterate_batches(blocks, batch_size, shuffle=True, seed=seed, limit=n_blocks))


# ----- a layer group ---------------------------------------------------------------------------------


def _base_record(v: Variant) -> dict[str, Any]:
    return {"layer": v.layer, "kind": v.kind, "variant": v.name}


def _experts_field(run: "VariantRun") -> dict[str, Any]:
    """{"experts": the parent experts an MoE variant keeps, in the child's order}; {} for other variants."""
    return {} if run.experts is None else {"experts": run.experts}


def collect_inputs(
    parent: PuzzleForCausalLM,
    todo: Sequence[Variant],
    train_blocks: np.ndarray,
    eval_blocks: np.ndarray,
    settings: BLDSettings,
    neuron_scores: dict[int, torch.Tensor] | None,
) -> tuple[list[Batch], dict[int, FFNCalibration]]:
    """The parent's activations on held-out batches (the losses at init and at the end), and the
    calibration of the layers whose FFN variants are initialised from data."""
    owned = sorted({v.layer for v in todo})
    eval_ids = _take(eval_blocks, settings.eval_tokens, settings.batch_size, settings.seed + 1)
    eval_batches = [parent_activations(parent, ids, owned) for ids in eval_ids]
    parent_ffns = parent.config.blocks
    calib_layers = sorted({v.layer for v in todo
                           if _needs_calibration(v, _ffn_scores_for(v.layer, settings, neuron_scores), parent_ffns[v.layer].ffn)})
    calibration: dict[int, FFNCalibration] = {}
    if calib_layers:
        calib_ids = _take(train_blocks, settings.calibration_tokens, settings.batch_size, settings.seed + 2)
        calibration = calibrate_ffns(parent, calib_ids, calib_layers)
    return eval_batches, calibration


def init_variant(
    parent: PuzzleForCausalLM,
    space: SearchSpace,
    v: Variant,
    frozen: dict[int, Sublayer],
    calibration: dict[int, FFNCalibration],
    settings: BLDSettings,
    neuron_scores: dict[int, torch.Tensor] | None,
    expert_scores: dict[int, torch.Tensor] | None = None,
) -> tuple[Sublayer, Sublayer | None, str, list[int] | None]:
    """A variant's initial sublayer from the parent's (pruned, pooled or fitted), the parent FFN it trains
    next to (attention variants; one per layer, shared through `frozen`), the init method's name and, for an
    MoE variant, the parent experts it keeps (`init_moe_ffn`; `expert_scores` per layer choose them)."""
    config = parent.config
    # fp32 master weights: the init works on an fp32 copy of the parent's sublayer (no copy when it is fp32)
    parent_state = {k: t.float() for k, t in sublayer_state(parent, v.layer, v.kind).items()}
    frozen_ffn, experts = None, None
    if v.kind == "attention":
        kv_heads = space.parent_attention.num_key_value_heads(config.num_attention_heads)
        state, method = init_attention(parent_state, v.config, config.num_attention_heads, kv_heads)
        if v.layer not in frozen:
            frozen[v.layer] = _parent_sublayer(parent, v.layer, "ffn")
        frozen_ffn = frozen[v.layer]
    else:
        scores = _ffn_scores_for(v.layer, settings, neuron_scores)
        if settings.ffn_init == "minitron" and scores is None and v.config.is_swiglu and not v.is_parent:
            raise PuzzleError(
                f"no Minitron neuron importance for layer {v.layer}; run puzzle importance first or use --ffn-init auto"
            )
        if v.config.is_moe:
            state, method, experts = init_moe_ffn(parent_state, space.parent_ffns[v.layer].moe, v.config.moe, None,
                                                  (expert_scores or {}).get(v.layer), calibration.get(v.layer))
        else:
            state, method = init_ffn(parent_state, v.config, calibration.get(v.layer), scores)
    child = Sublayer(config, v.kind, v.config, state).to(parent.model.embed_tokens.weight.device)
    return child, frozen_ffn, method, experts


def init_variants(
    parent: PuzzleForCausalLM,
    space: SearchSpace,
    todo: Sequence[Variant],
    eval_batches: Sequence[Batch],
    calibration: dict[int, FFNCalibration],
    settings: BLDSettings,
    neuron_scores: dict[int, torch.Tensor] | None,
    log: JsonlLog,
    runtime: Runtime = CPU_FP32,
    expert_scores: dict[int, torch.Tensor] | None = None,
) -> tuple[list[VariantRun], list[dict[str, Any]]]:
    """Initialise and measure every variant: the runs to train, and the records of the parent-identical
    and no-op variants, which are not trained."""
    runs: list[VariantRun] = []
    untrained: list[dict[str, Any]] = []
    frozen: dict[int, Sublayer] = {}
    for v in todo:
        t0 = time.perf_counter()
        child, frozen_ffn, method, experts = init_variant(parent, space, v, frozen, calibration, settings, neuron_scores,
                                                          expert_scores)
        loss = normalised_mse(v, child, frozen_ffn, eval_batches, runtime)
        run = VariantRun(v, child, frozen_ffn, "parent" if v.is_parent else method, loss, experts=experts)
        if v.kind == "ffn" and v.config.replace_with_linear:
            # the calibration tokens are training data too: the solution at the end covers them
            run.trainer, run.normal = "lstsq", NormalEquations(calibration[v.layer].x, calibration[v.layer].y)
        run.wall_s = time.perf_counter() - t0
        log.write(event="init", **_base_record(v), init=run.init, loss=loss)
        if v.is_parent or v.config.no_op:
            source = "parent" if v.is_parent else "noop"
            untrained.append({**_base_record(v), "source": source, "init": run.init, "tokens": 0, "steps": 0,
                              "loss_init": loss, "loss_final": loss, "params": 0, "flops": 0, "wall_s": run.wall_s,
                              **_experts_field(run)})
        else:
            runs.append(run)
    return runs, untrained


def train_lockstep(
    parent: PuzzleForCausalLM,
    runs: Sequence[VariantRun],
    owned: Sequence[int],
    train_blocks: np.ndarray,
    settings: BLDSettings,
    log: JsonlLog,
    runtime: Runtime = CPU_FP32,
) -> dict[str, Any]:
    """Lockstep BLD: one parent forward per batch (up to the last of `owned`) feeds one step of every run.
    Returns the loop's steps, seconds and the parent forward's share of them."""
    seq_len = train_blocks.shape[1]
    steps, shape = settings.steps(seq_len), ModelShape.from_config(parent.config)
    for run in runs:
        if run.trainer == "adamw":
            _make_optimizer(run, settings, steps, runtime)
        run.flops_per_token = int(variant_train_flops(shape, run.variant, seq_len))
        run.child.train()
    parent_flops_per_token = parent_forward_flops(shape, max(owned), seq_len)
    parent_s = parent_flops = 0.0
    t_loop, loop_start = time.perf_counter(), time.time()
    # full batches of each epoch, BLD's order (training.sum_seed)
    batches = training.BatchStream(train_blocks, settings.batch_size, settings.seed, straddle=False,
                                   epoch_seed=training.sum_seed)
    for step in range(steps if runs else 0):
        t0 = time.perf_counter()
        batch = parent_activations(parent, batches[step], owned)
        parent_s += time.perf_counter() - t0
        parent_flops += parent_flops_per_token * batch.tokens
        for run in runs:
            t0 = time.perf_counter()
            run.last_loss = train_step(run, batch, runtime)
            run.wall_s += time.perf_counter() - t0
            run.steps += 1
            run.tokens += batch.tokens
            run.flops += run.flops_per_token * batch.tokens
            if training.due(step, settings.log_every, steps - 1):
                lr = run.scheduler.get_last_lr()[0] if run.scheduler else None
                log.write(event="step", **_base_record(run.variant), step=step, tokens=run.tokens, loss=run.last_loss, lr=lr)
    loop_s = time.perf_counter() - t_loop
    return {
        "steps": steps if runs else 0,
        "loop_s": loop_s,
        "loop_start": loop_start,  # wall clock, to line up groups that ran side by side
        "loop_end": loop_start + loop_s,
        "parent_forward_s": parent_s,
        "parent_forward_flops": parent_flops,
    }


def save_variants(
    run_dir: str | Path,
    runs: Sequence[VariantRun],
    eval_batches: Sequence[Batch],
    log: JsonlLog,
    progress: Callable[[int], None] | None,
    settings_sha256: str,
    runtime: Runtime = CPU_FP32,
    store_dtype: torch.dtype | None = None,
) -> None:
    """Finish, measure and store each trained variant (file, then manifest record, with the digest of the
    settings that trained it) as soon as it is done, in `store_dtype` (the parent's; None: as trained)."""
    for run in runs:
        t0 = time.perf_counter()
        finish(run)
        loss_final = normalised_mse(run.variant, run.child, run.frozen_ffn, eval_batches, runtime)
        params = sum(p.numel() for p in run.child.parameters())
        record = {**_base_record(run.variant), "init": run.init, "trainer": run.trainer, "tokens": run.tokens, "steps": run.steps,
                  "loss_init": run.loss_init, "loss_final": loss_final, "params": params, "flops": run.flops,
                  "settings_sha256": settings_sha256, **_experts_field(run)}
        run.wall_s += time.perf_counter() - t0
        record["wall_s"] = run.wall_s
        state = {k: v if store_dtype is None else v.to(store_dtype) for k, v in run.child.state_dict().items()}
        record = store.write_variant(run_dir, record, state)
        log.write(event="variant_done", **{k: record[k] for k in ("layer", "kind", "variant", "init", "tokens", "loss_init", "loss_final", "wall_s")})
        if progress:
            progress(1)


def build_layer_group(
    run_dir: str | Path,
    parent: PuzzleForCausalLM,
    space: SearchSpace,
    layers: Sequence[int],
    train_blocks: np.ndarray,
    eval_blocks: np.ndarray,
    settings: BLDSettings = BLDSettings(),
    neuron_scores: dict[int, torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
    only: Collection[str] | None = None,
    store_dtype: torch.dtype | None = None,
    expert_scores: dict[int, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Initialise, train and store every variant of `layers` (or only those whose `store.key_of` is in
    `only`: a job of a memory-budgeted build) the library does not hold yet (or holds trained under other
    settings: see `BLDSettings.digest`), stored in `store_dtype` (the parent's dtype; None: as trained).
    `parent` may be truncated after the last of `layers` (`load_puzzle(last_layer=...)`): nothing here
    reaches later layers or the head.

    Steps: `collect_inputs` (held-out parent activations, FFN calibration), `init_variants` (record the
    untrained ones), `train_lockstep`, `save_variants`. Writes each finished variant (file, then manifest
    record) as soon as it is done; parent and no-op variants get a record with their measured loss and no
    file. `parent` is put in eval mode with its gradients off, on `settings.device` with its parameters in
    `settings.dtype` (a no-op when it was loaded so). Returns a summary of the work done (steps,
    tokens, FLOPs and seconds).
    """
    t_start = time.perf_counter()
    log = store.library_log(run_dir)
    manifest = store.read_manifest(run_dir)
    variants = group_variants(space, layers)
    if only is not None:
        variants = [v for v in variants if store.key_of(v) in set(only)]
    digest = settings.digest(run_dir)
    todo = [v for v in variants if not store.is_done(run_dir, manifest, v.layer, v.kind, v.name, settings_sha256=digest)]
    summary: dict[str, Any] = {"layers": list(layers), "skipped": len(variants) - len(todo), "trained": 0, "recorded": 0}
    if not todo:
        return summary
    train_blocks, eval_blocks = _crop(train_blocks, settings.seq_len), _crop(eval_blocks, settings.seq_len)
    owned = sorted({v.layer for v in todo})
    runtime = settings.runtime
    place(parent, runtime.device, runtime.dtype).requires_grad_(False).eval()
    log.write(event="group_start", layers=owned, todo=len(todo), seq_len=train_blocks.shape[1], host=socket.gethostname(),
              pid=os.getpid(), device=str(runtime.device), dtype=runtime.dtype_name)

    t0 = time.perf_counter()
    eval_batches, calibration = collect_inputs(parent, todo, train_blocks, eval_blocks, settings, neuron_scores)
    summary["calibration_s"] = time.perf_counter() - t0

    runs, untrained = init_variants(parent, space, todo, eval_batches, calibration, settings, neuron_scores, log, runtime,
                                    expert_scores)
    calibration.clear()
    if untrained:
        store.record_untrained(run_dir, untrained)
        summary["recorded"] = len(untrained)
        if progress:
            progress(len(untrained))

    loop = train_lockstep(parent, runs, owned, train_blocks, settings, log, runtime)
    save_variants(run_dir, runs, eval_batches, log, progress, digest, runtime, store_dtype)
    summary.update(
        trained=len(runs),
        steps=loop["steps"],
        tokens_per_variant=runs[0].tokens if runs else 0,
        loop_s=loop["loop_s"],
        loop_start=loop["loop_start"],
        loop_end=loop["loop_end"],
        parent_forward_s=loop["parent_forward_s"],
        parent_forward_flops=loop["parent_forward_flops"],
        variant_flops=sum(r.flops for r in runs),
        variant_s=sum(r.wall_s for r in runs),
        wall_s=time.perf_counter() - t_start,
    )
    log.write(event="group_done", **summary)
    return summary
