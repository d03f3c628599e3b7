"""Tiny NemotronH parents built by transformers' own classes (models/nemotron_h), for the hybrid family's tests.

The default layout has every kind of layer: Mamba2, MoE, attention, MLP, Mamba2, MoE ("ME*-ME"). Mamba2
layers of 8 heads of 16 channels, state 16, 2 groups, conv width 4 and chunks of 8 tokens (so a prompt of
21 tokens spans three chunks, the last one padded); MoE layers of 8 relu2 experts of 32, top-2 among the
best 2 of 4 groups (n_group 4, topk_group 2), renormalised, scaled by 2.5, a shared expert of 48.
"""

import torch

PATTERN = ["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"]


def make_nemotron_h_config(**overrides):
    from transformers import NemotronHConfig

    fields = dict(vocab_size=320, hidden_size=64, layers_block_type=list(PATTERN), num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16,
                  ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8, n_routed_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
                  n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    fields.update(overrides)
    return NemotronHConfig(**fields)


def make_nemotron_h_parent(seed: int = 0, **overrides):
    """transformers' NemotronHForCausalLM with weights where every part matters: matrices N(0, 0.08), norm
    weights N(1, 0.2), dt_bias N(0, 0.5), D N(1, 0.3), the routers' score-correction biases N(0, 0.05)
    (transformers initialises the last four constant)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_nemotron_h_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("dt_bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith(".D"):
                p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model


def cache_of(output):
    """The cache a forward returned (`cache` from transformers 5.2x on, `past_key_values` before)."""
    return getattr(output, "cache", None) if getattr(output, "cache", None) is not None else output.past_key_values
