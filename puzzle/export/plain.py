"""`puzzle export --format plain`: a child as its parent family's own checkpoint, which transformers' class of
that family loads without custom code (`AutoModelForCausalLM.from_pretrained(dir)`, no trust_remote_code).

A family's plain config describes every layer with one set of numbers: one KV-head count, one dense width
and (MoE families) one expert count, top-k and expert width, the dense layers named by the config's own rule
(Qwen-MoE's `mlp_only_layers` / `decoder_sparse_step`: transformers `Qwen2MoeDecoderLayer.__init__`,
`Qwen3MoeDecoderLayer.__init__`; Mixtral: every layer). So only a child whose layers all keep the same expert
count, top-k and width (and the same attention, no linear or no-op sublayer) has one; `plain_config` builds
it and checks that the family reads it back as exactly the child's blocks and windows
(`puzzle_config_from`), else refuses in one line. Heterogeneous children stay in the puzzle format.

Weights are the child's own, under the hub checkpoints' names (Qwen-MoE's are puzzle's; Mixtral's
`block_sparse_moe.experts.{j}.w1/w3/w2`, checkpoint.py `hub_key`), which transformers 4 reads as they are and
transformers 5 fuses on load (its conversion mapping for these families).
"""

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import torch
import transformers

from puzzle.errors import PuzzleError
from puzzle.io import write_safetensors
from puzzle.model.checkpoint import atomic_directory, hub_key, puzzle_config_from, save_tokenizer
from puzzle.outputs import write_marker
from puzzle.pruning.prune import _NOT_PLAIN, _window_fields  # the family config's own window fields


def _uniform(values: list[Any], what: str) -> Any:
    """The one value every layer has, or a one-line refusal naming what differs."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) != 1:
        raise PuzzleError(f"cannot export as plain: the child's layers differ in {what} "
                          f"({', '.join(map(str, distinct[:4]))}); a heterogeneous child stays in the puzzle format "
                          "(--format nemotron-nas --engine transformers)")
    return distinct[0]


def plain_config(config: Any) -> Any:
    """The family's own config (transformers' class) for a PuzzleConfig whose layers it can describe."""
    family = config.family_descriptor
    blocks = config.blocks
    if any(not b.attention.is_gqa for b in blocks) or any(b.ffn.no_op or b.ffn.replace_with_linear for b in blocks):
        raise PuzzleError("cannot export as plain: the family's own class has no linear or no-op sublayers; "
                          "the child stays in the puzzle format (--format nemotron-nas --engine transformers)")
    group = _uniform([b.attention.n_heads_in_group for b in blocks], "KV heads")
    cls = getattr(transformers, family.config_class)
    data = {k: v for k, v in config.to_dict().items() if k not in _NOT_PLAIN}
    if dataclasses.is_dataclass(cls):  # transformers 5: only the class's own fields
        data = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
    layer_windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
    # prune.py's rule; with expert pruning (issue 25, wip/moeimp) it takes the config class and sets Qwen3-MoE's
    # use_sliding_window itself (drop this branch once both are in)
    if len(inspect.signature(_window_fields).parameters) == 3:
        windows = _window_fields(family, layer_windows, cls)
    else:
        windows = _window_fields(family, layer_windows)
    if family.windows == "all" and windows.get("sliding_window") is not None and "use_sliding_window" in cls().to_dict():
        windows["use_sliding_window"] = True  # Qwen3MoeConfig.__post_init__ nulls sliding_window without it
    # head_dim explicit: Qwen3-MoE's attention reads it with getattr, not as a config field (as prune.py writes it)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    data.update(num_key_value_heads=config.num_attention_heads // group, head_dim=head_dim, **windows)
    dense = [b.ffn.intermediate_size for b in blocks if b.ffn.is_swiglu]
    if dense:
        data["intermediate_size"] = _uniform(dense, "dense FFN width")
    moes = [b.ffn.moe for b in blocks if b.ffn.is_moe]
    if moes:
        spec = family.moe
        moe = moes[0]
        _uniform([m.name for m in moes], "MoE experts, top-k or width")
        data.update({spec.experts_field: moe.num_experts, "num_experts_per_tok": moe.top_k,
                     spec.expert_size_field: moe.expert_size})
        if spec.shared_expert_field:
            data[spec.shared_expert_field] = moe.shared_expert_size
        if spec.sparse == "qwen":  # the dense layers by name, every other layer MoE
            data.update(decoder_sparse_step=1, mlp_only_layers=[i for i, b in enumerate(blocks) if not b.ffn.is_moe])
    plain = cls(**data)
    plain.architectures = [family.causal_lm_class]
    back = puzzle_config_from(plain)
    if back.blocks != blocks or back.sliding_windows != config.sliding_windows:
        raise PuzzleError(f"cannot export as plain: a {family.config_class} cannot describe these layers "
                          "(the child stays in the puzzle format: --format nemotron-nas --engine transformers)")
    return plain


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The child's weights under the family's hub names (a tied head stored once, as save_pretrained does)."""
    family = model.config.family
    state = {hub_key(k, family): v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_plain(model: torch.nn.Module, tokenizer: Any, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a PuzzleForCausalLM (+ tokenizer) to the directory `out` as its family's plain checkpoint, atomically."""
    config = plain_config(model.config)
    config.dtype = str(dtype).removeprefix("torch.")
    out = Path(out)
    with atomic_directory(out) as tmp:
        with open(tmp / "model.safetensors", "wb") as f:  # streamed: no second copy of the weights
            write_safetensors(f, plain_state(model), {"format": "pt"}, dtype=dtype)
        config.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        write_marker(tmp, "export")
    return out
