"""NemotronHPuzzle's config: NemotronH's (transformers 5 models/nemotron_h) plus one `block_configs` entry per layer.

Written by puzzle's `export --format nemotron-h-puzzle` next to the weights and named in config.json's `auto_map`.
An entry is {"block_type": "mamba" | "attention" | "mlp" | "moe", **fields}: the NemotronH config fields that
layer overrides (an MLP's `intermediate_size`, an attention's `num_key_value_heads`, an MoE's
`n_routed_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `moe_shared_expert_intermediate_size`).
`get_nemotron_h_config_for_layer(i)` lays entry i over the global config; vLLM's nemotron_h.py builds each MLP,
MoE and attention layer from it (its Mamba2 layers read the global config).
"""

from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig


class NemotronHPuzzleConfig(NemotronHConfig):
    model_type = "nemotron_h_puzzle"
    block_configs: list | None = None

    def get_nemotron_h_config_for_layer(self, layer_idx: int) -> NemotronHConfig:
        """The global config with layer `layer_idx`'s block_configs entry laid over it (a plain NemotronHConfig)."""
        values = self.to_dict()
        for key in ("block_configs", "model_type", "architectures", "auto_map", "transformers_version"):
            values.pop(key, None)
        entry = (self.block_configs or [{}] * (layer_idx + 1))[layer_idx]
        values.update({k: v for k, v in entry.items() if k != "block_type" and v is not None})
        config = NemotronHConfig(**values)
        config._attn_implementation = self._attn_implementation
        return config
