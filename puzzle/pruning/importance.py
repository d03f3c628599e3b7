"""Minitron activation importance (arXiv 2407.14679), forward passes only.

Width units are scored from the activations they produce on calibration sequences:
  heads      the L2 norm over head_dim of each head's output entering `o_proj`;
  kv_groups  the sum of the scores of the query heads sharing that KV head;
  neurons    |activation| entering `down_proj` (silu(gate) * up);
  channels   |RMSNorm output| per hidden channel, summed over every norm of the model.
Each per-token value is aggregated over the sequence (`seq_agg`) and then over the calibration
sequences (`batch_agg`): mean, L2 norm or variance; the paper found batch=L2, seq=mean best.

An MoE FFN (modeling_puzzle.py `MoEFFN`, E experts of I neurons, top-k) is scored from its router on the
same tokens (N of them in all), as expert pruning reads it (experts.py picks the kept ones):
  experts.frequency  the fraction of tokens that chose each expert among their top-k (sums to k);
  experts.gate       the router's softmax probability of each expert, averaged over all tokens (sums to 1);
  experts.output     output-aware: sum over the tokens routed to the expert of its top-k weight (as the
                     family routes: renormalised or not) x the L2 norm of the expert's output, divided by N;
  experts.neurons    (E, I) each expert's |activation| entering its down_proj, aggregated with `batch_agg`
                     over the tokens routed to it (an expert sees tokens, not sequences; zero if none came);
  shared_expert.neurons  a shared expert's (Qwen2-MoE) neurons, as a dense FFN's.
A dense layer of an MoE parent (Qwen-MoE's `mlp_only_layers`) keeps its `neurons`.

Layers are scored two ways:
  block_importance  BI_i = 1 - mean over tokens of cos(input of layer i, output of layer i);
  drop_loss / kl    the LM loss and KL(full || pruned) per token of the model with layer i (or a
                    contiguous run of k layers starting at i) removed; `lm_loss` is the intact model's.

Keys of the result (and of run_dir/importance/importance.safetensors):
  layers.{i}.heads (H,), layers.{i}.kv_groups (K,), layers.{i}.neurons (F,)   where the layer has them
  layers.{i}.experts.{frequency,gate,output} (E,), layers.{i}.experts.neurons (E, I),
  layers.{i}.shared_expert.neurons (S,)                                        where the layer is MoE
  channels (D,), layers.block_importance (L,);
  with block sizes: lm_loss () and layers.drop_loss.k{k} / layers.drop_kl.k{k} (L-k+1,) for each k
  (and layers.drop_loss / layers.drop_kl, the k=1 scores, when 1 is among the block sizes).
The drop losses and KL are absolute; the rise is drop_loss - lm_loss (the KL is one already).
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from puzzle.errors import PuzzleError
from puzzle.io import atomic_save_safetensors, atomic_write_json, read_json
from puzzle.metrics import kd_terms
from puzzle.model import GQAttention, MoEFFN, PuzzleForCausalLM, SwiGLU
from puzzle.model.modeling_puzzle import Relu2MLP
from puzzle.run_dir import RunDir

Aggregation = Literal["mean", "l2", "var"]
AGGREGATIONS = ("mean", "l2", "var")
SCORES_FILE = "importance.safetensors"
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class ImportanceSettings:
    batch_agg: Aggregation = "l2"
    seq_agg: Aggregation = "mean"
    block_sizes: tuple[int, ...] = (1,)  # contiguous runs of k layers whose removal is scored; () for none
    drop_batches: int | None = None  # batches used for the drop-layer losses (None: all; each costs
                                     # about (L - k + 1) / 2 extra forward passes per block size k)

    def __post_init__(self) -> None:
        for name in ("batch_agg", "seq_agg"):
            if getattr(self, name) not in AGGREGATIONS:
                raise PuzzleError(f"{name} must be one of {', '.join(AGGREGATIONS)}, got {getattr(self, name)!r}")
        if any(k < 1 for k in self.block_sizes):
            raise PuzzleError(f"block sizes must be at least 1, got {list(self.block_sizes)}")


def aggregate_seq(x: torch.Tensor, how: Aggregation) -> torch.Tensor:
    """(B, T, U) per-token values -> (B, U) per sequence."""
    if how == "mean":
        return x.mean(1)
    if how == "l2":
        return x.norm(dim=1)
    return x.var(1, unbiased=False)


@dataclass
class BatchAccumulator:
    """Streams (B, U) per-sequence values into one score per unit: mean, L2 or variance over all B seen."""

    how: Aggregation
    n: int = 0
    total: torch.Tensor | None = None
    total_sq: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        s, sq = x.sum(0), x.square().sum(0)
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.n += x.shape[0]

    def result(self) -> torch.Tensor:
        if self.n == 0:
            raise PuzzleError("no calibration sequences were seen")
        if self.how == "l2":
            return self.total_sq.sqrt().float()
        mean = self.total / self.n
        if self.how == "mean":
            return mean.float()
        return (self.total_sq / self.n - mean.square()).clamp_min(0).float()


@dataclass
class _RouterStats:
    """One MoE layer's router statistics, summed in fp64 over the calibration tokens (module docstring)."""

    num_experts: int
    tokens: int = 0
    chosen: torch.Tensor | None = None  # (E,) tokens that had the expert in their top-k
    prob: torch.Tensor | None = None  # (E,) sum of the router's softmax probabilities
    output: torch.Tensor | None = None  # (E,) sum of top-k weight x ||expert output||
    routing: tuple[torch.Tensor, torch.Tensor] | None = None  # (weights, chosen), each (N, k): the forward in flight
    seq_shape: tuple[int, int] = (0, 0)  # (B, T) of the forward in flight

    def add_routing(self, moe: MoEFFN, x: torch.Tensor) -> None:
        """x (B, T, D) entering the MoE FFN: the same routing its forward computes next (`MoEFFN.route`)."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, chosen = moe.route(flat)  # (N, k) each
        probs = F.softmax(moe.gate(flat), dim=-1, dtype=torch.float)  # (N, E): MoEFFN.route's first step
        if self.chosen is None:
            zeros = torch.zeros(self.num_experts, dtype=torch.float64, device=x.device)
            self.chosen, self.prob, self.output = zeros, zeros.clone(), zeros.clone()
        self.chosen += torch.bincount(chosen.reshape(-1), minlength=self.num_experts).double()
        self.prob += probs.sum(0).double()
        self.tokens += B * T
        self.routing, self.seq_shape = (weights, chosen), (B, T)

    def add_output(self, j: int, y: torch.Tensor) -> None:
        """y (n_j, D): expert j's output on the tokens routed to it, in MoEFFN.forward's order."""
        weights, chosen = self.routing
        token, slot = torch.where(chosen == j)
        self.output[j] += (weights[token, slot].double() * y.double().norm(dim=-1)).sum()

    def result(self, prefix: str) -> dict[str, torch.Tensor]:
        if not self.tokens:
            raise PuzzleError("no calibration tokens reached an MoE layer")
        n = self.tokens
        return {f"{prefix}.frequency": (self.chosen / n).float(), f"{prefix}.gate": (self.prob / n).float(),
                f"{prefix}.output": (self.output / n).float()}


@dataclass
class _Collector:
    """Forward hooks that feed the accumulators; removed by `close`."""

    seq_agg: Aggregation
    batch_agg: Aggregation
    acc: dict[str, BatchAccumulator] = field(default_factory=dict)
    routers: dict[int, _RouterStats] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def _add(self, key: str, per_token: torch.Tensor) -> None:
        self.acc.setdefault(key, BatchAccumulator(self.batch_agg)).add(aggregate_seq(per_token.float(), self.seq_agg))

    def _add_tokens(self, key: str, per_token: torch.Tensor) -> None:
        """(n, U) values of tokens without their sequences (those routed to an expert): `batch_agg` over them."""
        self.acc.setdefault(key, BatchAccumulator(self.batch_agg)).add(per_token.float())

    def _attach_moe(self, i: int, moe: MoEFFN) -> None:
        stats = self.routers.setdefault(i, _RouterStats(len(moe.experts)))

        def route_hook(module, args):
            stats.add_routing(module, args[0])

        self.handles.append(moe.register_forward_pre_hook(route_hook))
        for j, expert in enumerate(moe.experts):

            def output_hook(module, args, output, j=j):
                stats.add_output(j, output)

            def expert_neurons_hook(module, args, key=f"layers.{i}.experts.{j}.neurons"):
                self._add_tokens(key, args[0].abs())  # (n_j, I)

            self.handles.append(expert.register_forward_hook(output_hook))
            self.handles.append(expert.down_proj.register_forward_pre_hook(expert_neurons_hook))
        if moe.shared_expert is not None:

            def shared_hook(module, args, key=f"layers.{i}.shared_expert.neurons"):
                self._add(key, args[0].abs().reshape(*stats.seq_shape, -1))  # (N, S) -> (B, T, S)

            self.handles.append(moe.shared_expert.down_proj.register_forward_pre_hook(shared_hook))

    def attach(self, model: PuzzleForCausalLM) -> None:
        for i, layer in enumerate(model.model.layers):
            if isinstance(layer.self_attn, GQAttention):
                attn = layer.self_attn

                def heads_hook(module, args, key=f"layers.{i}.heads", attn=attn):
                    x = args[0]  # (B, T, H*d)
                    B, T, _ = x.shape
                    self._add(key, x.reshape(B, T, attn.num_heads, attn.head_dim).norm(dim=-1))

                self.handles.append(attn.o_proj.register_forward_pre_hook(heads_hook))
            if isinstance(layer.mlp, (SwiGLU, Relu2MLP)):  # down_proj's input: the neurons' activations

                def neurons_hook(module, args, key=f"layers.{i}.neurons"):
                    self._add(key, args[0].abs())  # (B, T, F)

                self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(neurons_hook))
            if isinstance(layer.mlp, MoEFFN):
                self._attach_moe(i, layer.mlp)
        for name, module in model.named_modules():
            if isinstance(module, LlamaRMSNorm) and not name.endswith(("q_norm", "k_norm")):  # not per-head ones

                def norm_hook(module, args, output, key=f"norms.{name}"):
                    self._add(key, output.abs())  # (B, T, D)

                self.handles.append(module.register_forward_hook(norm_hook))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _run_layers(model: PuzzleForCausalLM, h: torch.Tensor, layers: range, position_embeddings) -> torch.Tensor:
    for j in layers:
        h = model.model.layers[j](h, position_embeddings)
    return model.model.norm(h)


@torch.no_grad()
def compute_importance(
    model: PuzzleForCausalLM,
    batches: Iterable[torch.Tensor],
    *,
    batch_agg: Aggregation = "l2",
    seq_agg: Aggregation = "mean",
    block_sizes: tuple[int, ...] | list[int] = (1,),
    drop_batches: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Importance of every head, KV group, neuron, channel and layer of `model` on `batches` of token
    ids (LongTensor (B, T), unpadded); see the module docstring for the keys."""
    settings = ImportanceSettings(batch_agg, seq_agg, tuple(block_sizes), drop_batches)
    L = model.config.num_hidden_layers
    sizes = sorted({k for k in settings.block_sizes if k < L})
    if len(sizes) != len(set(settings.block_sizes)):
        raise PuzzleError(f"block sizes must be smaller than the {L} layers, got {list(settings.block_sizes)}")
    model.eval()
    collector = _Collector(seq_agg, batch_agg)
    collector.attach(model)
    device = next(model.parameters()).device  # the sums live where the forward runs (CPU or CUDA)
    cos_sum = torch.zeros(L, dtype=torch.float64, device=device)
    n_tokens = 0
    base_lm = torch.zeros((), dtype=torch.float64, device=device)
    lm_tokens = 0
    drop_lm = {k: torch.zeros(L - k + 1, dtype=torch.float64, device=device) for k in sizes}
    drop_kl = {k: torch.zeros(L - k + 1, dtype=torch.float64, device=device) for k in sizes}
    drop_tokens = 0
    seen = 0
    try:
        for b, ids in enumerate(tqdm(batches, desc="importance", unit="batch", disable=not progress)):
            ids = ids.to(device)
            B, T = ids.shape
            out = model.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            hs = out.hidden_states  # L + 1 of (B, T, D)
            for i in range(L):
                cos_sum[i] += F.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1).sum().double()
            n_tokens += B * T
            seen += B
            if not sizes or (drop_batches is not None and b >= drop_batches):
                continue
            logits = model.lm_head(out.last_hidden_state)  # (B, T, V): the reference of every drop below
            full = kd_terms(out.last_hidden_state, logits, model.lm_head, None, ids)
            base_lm += full.lm.double()
            lm_tokens += full.lm_tokens
            drop_tokens += B * T
            position_ids = torch.arange(T, device=ids.device)[None].expand(B, T)
            pos = model.model.rotary_emb(hs[0], position_ids)
            collector.close()  # the pruned forwards below must not count as calibration activations
            for k in sizes:
                for s in range(L - k + 1):
                    # layers before s are untouched: start from the cached input of layer s
                    h = _run_layers(model, hs[s], range(s + k, L), pos)
                    terms = kd_terms(h, logits, model.lm_head, None, ids)
                    drop_lm[k][s] += terms.lm.double()
                    drop_kl[k][s] += terms.kl.double()
            collector.attach(model)
    finally:
        collector.close()
    if seen == 0:
        raise PuzzleError("no calibration batches: the calibration set is empty")

    scores: dict[str, torch.Tensor] = {}
    channels = None
    for key, acc in collector.acc.items():
        if key.startswith("norms."):
            r = acc.result()
            channels = r if channels is None else channels + r
        elif ".experts." not in key:  # an expert's neurons go into its layer's (E, I) below
            scores[key] = acc.result()
    for i, stats in collector.routers.items():
        scores.update(stats.result(f"layers.{i}.experts"))
        scores[f"layers.{i}.experts.neurons"] = _expert_neurons(collector.acc, i, model.model.layers[i].mlp)
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.self_attn, GQAttention):
            heads = scores[f"layers.{i}.heads"]
            group = layer.self_attn.num_heads // layer.self_attn.num_kv_heads
            scores[f"layers.{i}.kv_groups"] = heads.reshape(-1, group).sum(-1)
    scores["channels"] = channels
    scores["layers.block_importance"] = (1.0 - cos_sum / n_tokens).float()
    if lm_tokens:
        scores["lm_loss"] = (base_lm / lm_tokens).float()
        for k in sizes:
            scores[f"layers.drop_loss.k{k}"] = (drop_lm[k] / lm_tokens).float()
            scores[f"layers.drop_kl.k{k}"] = (drop_kl[k] / drop_tokens).float()
        if 1 in sizes:
            scores["layers.drop_loss"] = scores["layers.drop_loss.k1"].clone()
            scores["layers.drop_kl"] = scores["layers.drop_kl.k1"].clone()
    return {key: value.cpu() for key, value in scores.items()}  # no copy on the CPU


def _expert_neurons(acc: dict[str, BatchAccumulator], layer: int, moe: MoEFFN) -> torch.Tensor:
    """(E, I): each expert's neuron scores, a row of zeros for an expert no calibration token chose."""
    rows = []
    for j, expert in enumerate(moe.experts):
        a = acc.get(f"layers.{layer}.experts.{j}.neurons")
        rows.append(a.result().cpu() if a is not None else torch.zeros(expert.down_proj.in_features))
    return torch.stack(rows)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Unit indices from most to least important (ties keep the lower index first)."""
    return torch.sort(scores, descending=True, stable=True).indices


def importance_dir(run_dir: str | Path) -> Path:
    return RunDir(run_dir).importance


def save_importance(run_dir: str | Path, scores: dict[str, torch.Tensor], settings: dict) -> Path:
    """Write the scores (safetensors) and then the settings JSON, which marks them complete."""
    out = importance_dir(run_dir)
    path = atomic_save_safetensors(out / SCORES_FILE, scores)
    atomic_write_json(out / SETTINGS_FILE, settings)
    return path


def has_importance(run_dir: str | Path) -> bool:
    out = importance_dir(run_dir)
    return (out / SCORES_FILE).exists() and (out / SETTINGS_FILE).exists()


def load_importance(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The scores saved by `puzzle importance` for this run directory."""
    out = importance_dir(run_dir)
    if not has_importance(run_dir):
        raise PuzzleError(f"{run_dir} has no importance scores; run `puzzle importance PARENT --run-dir {run_dir}` first")
    try:
        return load_file(str(out / SCORES_FILE))
    except (SafetensorError, OSError) as err:
        raise PuzzleError(f"{out / SCORES_FILE}: unreadable ({err}); rerun `puzzle importance`") from None


def load_importance_settings(run_dir: str | Path) -> dict:
    return read_json(importance_dir(run_dir) / SETTINGS_FILE)


def check_importance_parent(run_dir: str | Path, parent: str | Path) -> None:
    """One line when the run's importance scores were computed from other weights than `parent` holds now
    (overwritten in place since): a stage that reads them (prune, build-library's FFN init) does not
    recompute them. Scores written before they recorded the parent's fingerprint pass."""
    from puzzle.model.fingerprint import fingerprint

    if not has_importance(run_dir):
        return
    recorded = load_importance_settings(run_dir).get("parent_fingerprint")
    if recorded and recorded != fingerprint(parent):
        raise PuzzleError(f"the importance scores in {importance_dir(run_dir)} were computed from other weights than "
                          f"{parent} holds now; rerun puzzle importance (puzzle run does) first")


def calibration_sequences(blocks, n_samples: int, seq_len: int | None = None) -> torch.Tensor:
    """`n_samples` sequences of `seq_len` tokens cut from consecutive packed blocks (n, L), as (n, seq_len).

    Blocks are contiguous token streams, so several short sequences may come from one block.
    """
    n_blocks, block_len = blocks.shape
    seq_len = seq_len or block_len
    if seq_len < 2:
        raise PuzzleError(f"calibration sequences need at least 2 tokens, got seq_len={seq_len}")
    if seq_len > block_len:
        raise PuzzleError(f"seq_len {seq_len} is longer than the prepared blocks ({block_len}); rerun prepare-data")
    per_block = block_len // seq_len
    need = min(n_blocks, -(-n_samples // per_block))
    rows = torch.as_tensor(np.asarray(blocks[:need], dtype=np.int64))
    seqs = rows[:, : per_block * seq_len].reshape(-1, seq_len)[:n_samples]
    if len(seqs) < n_samples:
        raise PuzzleError(f"only {len(seqs)} calibration sequences of {seq_len} tokens available, {n_samples} asked")
    return seqs


def batched(seqs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]


def settings_json(settings: ImportanceSettings, **extra) -> dict:
    data = asdict(settings)
    data["block_sizes"] = list(settings.block_sizes)
    data.update(extra)
    return data


__all__ = [
    "AGGREGATIONS",
    "BatchAccumulator",
    "ImportanceSettings",
    "aggregate_seq",
    "batched",
    "calibration_sequences",
    "compute_importance",
    "has_importance",
    "importance_dir",
    "load_importance",
    "load_importance_settings",
    "ranking",
    "save_importance",
    "settings_json",
]
