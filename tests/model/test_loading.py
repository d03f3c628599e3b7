"""Loading once: models built on the meta device and filled from safetensors give exactly the logits of the
old path (random init, then load_state_dict), allocate the weights once, and a truncated load reads only
the layers it keeps."""

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from conftest import make_llama, make_tokenizer
from puzzle.errors import PuzzleError
from puzzle.model import PuzzleForCausalLM
from puzzle.model.checkpoint import load_config, load_model, load_puzzle, puzzle_config_from, save_model, to_puzzle, weights_dtype
from puzzle.model.loading import SafetensorsCheckpoint

aten = torch.ops.aten
# aten ops that allocate a new tensor's storage (a random init is empty + normal_ on it)
_ALLOCATING = {aten.empty.memory_format, aten.empty_strided.default, aten.zeros.default, aten.ones.default,
               aten.full.default, aten.clone.default, aten._to_copy.default, aten.empty_like.default}


class CpuAllocations(TorchDispatchMode):
    """Bytes of CPU storage the torch ops run inside it allocate (meta tensors cost nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ALLOCATING and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            self.bytes += out.untyped_storage().nbytes()
        return out


def _save(tmp_path, tied=False, dtype=torch.float32, layers=4):
    out = tmp_path / "parent"
    make_llama(num_hidden_layers=layers, tie_word_embeddings=tied).to(dtype).save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def _old_load(path, dtype=torch.float32):
    """What load_model did before meta loading: a randomly initialised model, then the weights copied in."""
    model = AutoModelForCausalLM.from_config(load_config(path), dtype=dtype)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _old_to_puzzle(model):
    child = PuzzleForCausalLM(puzzle_config_from(model.config)).to(next(model.parameters()).dtype)
    child.load_state_dict(model.state_dict(), strict=False)
    if child.config.tie_word_embeddings:
        child.tie_weights()
    return child.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_meta_loading_gives_the_old_paths_logits_exactly(tmp_path, tied):
    path = _save(tmp_path, tied=tied)
    x = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        want = _old_load(path)(x).logits
        want_puzzle = _old_to_puzzle(_old_load(path))(x).logits
        assert torch.equal(load_model(path)(x).logits, want)
        assert torch.equal(to_puzzle(load_model(path))(x).logits, want_puzzle)
        assert torch.equal(load_puzzle(path)(x).logits, want_puzzle)
        assert torch.equal(load_model(path / "model.safetensors")(x).logits, want)
    # RoPE's non-persistent inv_freq is computed again, not left on the meta device or zero
    rotary = load_puzzle(path).model.rotary_emb
    assert torch.equal(rotary.inv_freq, _old_to_puzzle(_old_load(path)).model.rotary_emb.inv_freq)
    if tied:
        model = load_puzzle(path)
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_child_checkpoint_loads_through_the_same_path(tmp_path):
    parent = _save(tmp_path)
    save_model(load_puzzle(parent), tmp_path / "child")
    x = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_puzzle(tmp_path / "child")(x).logits, load_puzzle(parent)(x).logits)
        assert torch.equal(load_model(tmp_path / "child")(x).logits, load_puzzle(parent)(x).logits)


def test_loading_allocates_the_weights_once(tmp_path):
    path = _save(tmp_path, layers=4)
    weights = sum(t.numel() * t.element_size() for t in load_file(str(path / "model.safetensors")).values())
    for load in (lambda: load_puzzle(path), lambda: to_puzzle(load_model(path)), lambda: load_model(path)):
        with CpuAllocations() as counter:
            model = load()
        assert counter.bytes <= 1.05 * weights, counter.bytes / weights
        del model
    # the counter sees a random init: the old path allocates the weights at least twice
    with CpuAllocations() as counter:
        _old_to_puzzle(_old_load(path))
    assert counter.bytes >= 2 * weights


def test_to_puzzle_takes_the_parents_tensors_without_copying(tmp_path):
    llama = make_llama()
    child = to_puzzle(llama)
    assert child.model.layers[1].mlp.up_proj.weight.data_ptr() == llama.model.layers[1].mlp.up_proj.weight.data_ptr()


def test_a_truncated_load_reads_only_the_embeddings_and_the_layers_it_keeps(tmp_path):
    path = _save(tmp_path, layers=4)
    with SafetensorsCheckpoint(path) as ckpt:
        model = load_puzzle(path, last_layer=1, checkpoint=ckpt)
        read = set(ckpt.names_read)
    want = {"model.embed_tokens.weight"} | {k for k in ckpt.keys() if k.startswith(("model.layers.0.", "model.layers.1."))}
    assert read == want
    assert model.lm_head is None and model.model.norm is None and len(model.model.layers) == 2
    full = load_puzzle(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name]), name
    with pytest.raises(PuzzleError, match="outside"):
        load_puzzle(path, last_layer=4)


def test_bf16_weights_keep_their_dtype_when_asked(tmp_path):
    path = _save(tmp_path, dtype=torch.bfloat16)
    assert weights_dtype(path) == torch.bfloat16
    assert load_puzzle(path, dtype=None).model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_puzzle(path).model.embed_tokens.weight.dtype == torch.float32  # the default stays fp32


def test_a_checkpoint_missing_a_weight_is_one_line(tmp_path):
    path = _save(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.2.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    for load in (load_model, load_puzzle):
        with pytest.raises(PuzzleError, match="up_proj"):
            load(path)


def test_a_checkpoint_with_a_weight_the_model_lacks_is_one_line(tmp_path):
    path = _save(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PuzzleError, match="extra"):
        load_puzzle(path)
    with pytest.raises(PuzzleError, match="extra"):
        load_puzzle(path, last_layer=2)
    assert len(load_puzzle(path, last_layer=0).model.layers) == 1  # a later layer's tensors are never looked at
