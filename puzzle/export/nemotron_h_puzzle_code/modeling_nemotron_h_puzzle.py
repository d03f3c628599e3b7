"""NemotronHPuzzle in transformers: NemotronH's own classes (transformers 5 models/nemotron_h), each layer built
from its own config (`NemotronHPuzzleConfig.get_nemotron_h_config_for_layer`), so a layer's MLP width, KV heads
or experts may differ from the others'. The weights are the hub's NemotronH layout (`backbone.*`, one tensor
per expert), read through transformers' own "nemotron_h" conversion (conversion_mapping.py), registered here for
this model_type.
"""

from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock, NemotronHForCausalLM, NemotronHModel

from .configuration_nemotron_h_puzzle import NemotronHPuzzleConfig

register_checkpoint_conversion_mapping(NemotronHPuzzleConfig.model_type, get_checkpoint_conversion_mapping("nemotron_h"),
                                       overwrite=True)


class NemotronHPuzzleModel(NemotronHModel):
    config_class = NemotronHPuzzleConfig

    def __init__(self, config: NemotronHPuzzleConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(NemotronHBlock(config.get_nemotron_h_config_for_layer(i), layer_idx=i)
                                    for i in range(config.num_hidden_layers))
        self.post_init()


class NemotronHPuzzleForCausalLM(NemotronHForCausalLM):
    config_class = NemotronHPuzzleConfig

    def __init__(self, config: NemotronHPuzzleConfig) -> None:
        super().__init__(config)
        self.model = NemotronHPuzzleModel(config)
        self.post_init()
