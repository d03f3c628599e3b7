"""Router load: which share of an MoE layer's routing each expert receives on the validation tokens.

A token sent to its top-k experts fills k routing slots; an expert's load is the fraction of all slots of its
layer it fills (a balanced router gives each of E experts 1/E; an expert no token chose, 0). Read with forward
hooks on each MoE layer's router during the evaluation's own forward passes (no extra pass), for a puzzle
model (modeling_puzzle.py `MoEFFN.gate`, each layer its own top-k) and for a parent loaded as transformers'
class (`<X>SparseMoeBlock.gate`: Qwen2MoeTopKRouter / Qwen3MoeTopKRouter / MixtralTopKRouter hold the router
as a (E, D) `weight`; the config's `num_experts_per_tok`). Softmax is monotone, so the top-k of the logits is
the top-k of the probabilities every family's router takes (transformers `<X>TopKRouter.forward`).
"""

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


def _routers(model: nn.Module) -> list[tuple[int, nn.Module, int]]:
    """(layer, router module with an (E, D) weight, top-k) for each MoE layer of `model`."""
    config = model.config
    blocks = getattr(config, "blocks", None)  # a PuzzleConfig: per-layer MoE blocks
    layers = model.model.layers
    out = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        gate = getattr(mlp, "gate", None)
        if gate is None or getattr(mlp, "experts", None) is None:
            continue  # a dense, linear or no-op FFN
        top_k = blocks[i].ffn.moe.top_k if blocks is not None else config.num_experts_per_tok
        out.append((i, gate, top_k))
    return out


@contextmanager
def router_load(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Within the block, count each MoE layer's routing (forward hooks on the routers); on exit the yielded
    dict holds {"router_load": {layer: [fraction of the layer's routing slots per expert]}, "router_tokens": N}
    ({} for a model without MoE layers)."""
    counts: dict[int, torch.Tensor] = {}
    tokens: dict[int, int] = {}
    hooks = []
    for layer, gate, top_k in _routers(model):
        def hook(module: nn.Module, args: tuple, _out: Any, layer: int = layer, top_k: int = top_k) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # (N, D) the router's input
            logits = x.float() @ module.weight.float().T  # (N, E)
            chosen = torch.topk(logits, top_k, dim=-1).indices  # (N, k)
            n = torch.bincount(chosen.flatten(), minlength=logits.shape[-1]).cpu()
            counts[layer] = n + counts.get(layer, 0)
            tokens[layer] = tokens.get(layer, 0) + x.shape[0]

        hooks.append(gate.register_forward_hook(hook))
    result: dict[str, Any] = {}
    try:
        yield result
    finally:
        for h in hooks:
            h.remove()
    if counts:
        result["router_load"] = {str(layer): (c / c.sum()).tolist() for layer, c in sorted(counts.items())}
        result["router_tokens"] = max(tokens.values())
