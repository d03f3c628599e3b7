"""Helpers for the scoring tests: deterministic random weights for any variant, and a naive reference scorer."""

import copy
import hashlib

import torch
import torch.nn.functional as F

from puzzle.model import build_attention, build_ffn
from puzzle.model.surgery import replace_sublayer, sublayer_state
from puzzle.search_space import Variant


def random_state(config, variant: Variant) -> dict[str, torch.Tensor]:
    """A library entry as BLD could leave it: the variant's sublayer weights (norm included), random."""
    seed = int(hashlib.sha256(f"{variant.layer}/{variant.kind}/{variant.name}".encode()).hexdigest()[:8], 16)
    gen = torch.Generator().manual_seed(seed)
    if variant.kind == "attention":
        module, prefix, norm = build_attention(config, variant.config), "self_attn", "input_layernorm"
    else:
        module, prefix, norm = build_ffn(config, variant.config), "mlp", "post_attention_layernorm"
    if module is None:
        return {}
    state = {f"{prefix}.{k}": torch.randn(v.shape, generator=gen) * 0.08 for k, v in module.state_dict().items()}
    state[f"{norm}.weight"] = 1 + 0.1 * torch.randn(config.hidden_size, generator=gen)
    return state


def make_state_fn(model):
    """Parent weights for the parent's variant, {} for no-ops, seeded random weights otherwise."""
    def state_fn(variant: Variant) -> dict[str, torch.Tensor]:
        if variant.is_parent:
            return sublayer_state(model, variant.layer, variant.kind)
        return random_state(model.config, variant)

    return state_fn


@torch.no_grad()
def naive_metrics(model, ids: torch.Tensor, variant: Variant, state) -> dict[str, float]:
    """A deep copy with the block swapped, a full forward through the model's own `forward`, full-vocab
    metrics in float64: an independent check of the cached-prefix scorer."""
    child = copy.deepcopy(model)
    replace_sublayer(child, variant.layer, variant.kind, variant.config, state)
    p_logits = model(ids).logits.double()
    q_logits = child(ids).logits.double()
    log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    lm = F.cross_entropy(q_logits[:, :-1].reshape(-1, q_logits.shape[-1]), ids[:, 1:].reshape(-1))
    cos = F.cosine_similarity(child.model(ids).last_hidden_state.double(), model.model(ids).last_hidden_state.double(), dim=-1)
    return {
        "kl": kl.mean().item(),
        "lm_loss": lm.item(),
        "top1_agreement": (q_logits.argmax(-1) == p_logits.argmax(-1)).double().mean().item(),
        "cosine": cos.mean().item(),
    }
