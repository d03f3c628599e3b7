"""Block identity: canonical names parsed in one place, frozen hashable configs, DeciLM's ffn_mult rule,
and a standard-library-only module (it ships inside every child checkpoint)."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import puzzle.model.blocks as blocks_module
from puzzle.model.blocks import (
    AttentionConfig,
    BlockConfig,
    BlockConfigError,
    FFNConfig,
    ffn_mult_to_intermediate_size,
    intermediate_size_to_ffn_mult,
    sublayer_from_name,
)

EVERY_KIND = [
    AttentionConfig(n_heads_in_group=3),
    AttentionConfig(replace_with_linear=True),
    AttentionConfig(no_op=True),
    FFNConfig(intermediate_size=1536),
    FFNConfig(replace_with_linear=True),
    FFNConfig(no_op=True),
]


def test_names_are_todays_strings_and_parse_back():
    assert [c.name for c in EVERY_KIND] == ["attn_g3", "attn_linear", "attn_noop", "ffn_1536", "ffn_linear", "ffn_noop"]
    for config in EVERY_KIND:
        assert type(config).from_name(config.name) == config
        assert sublayer_from_name(config.kind, config.name) == config
    block = BlockConfig(EVERY_KIND[0], EVERY_KIND[3])
    assert block.name == "attn_g3+ffn_1536"
    assert BlockConfig.from_name(block.name) == block


@pytest.mark.parametrize("cls, name", [
    (AttentionConfig, "attn_g0"), (AttentionConfig, "attn_g03"), (AttentionConfig, "attn_gx"),
    (AttentionConfig, "ffn_8"), (AttentionConfig, "attn_g\uff13"), (AttentionConfig, 3),
    (FFNConfig, "ffn_"), (FFNConfig, "ffn_-8"), (FFNConfig, "ffn_+8"), (FFNConfig, "attn_noop"), (FFNConfig, "mlp_8"),
    (BlockConfig, "attn_g3"), (BlockConfig, "attn_g3+ffn_8+ffn_8"), (BlockConfig, "attn_g3+"),
])
def test_bad_names_are_refused_in_one_line(cls, name):
    with pytest.raises(BlockConfigError) as info:
        cls.from_name(name)
    message = str(info.value)
    assert message.startswith("unknown ") and "\n" not in message


def test_configs_are_frozen_and_hashable():
    keys = {config: config.name for config in EVERY_KIND + [BlockConfig(EVERY_KIND[1], EVERY_KIND[5])]}
    assert keys[AttentionConfig.from_name("attn_g3")] == "attn_g3"
    assert len({AttentionConfig(n_heads_in_group=3), AttentionConfig.from_name("attn_g3")}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        EVERY_KIND[0].n_heads_in_group = 1


@pytest.mark.parametrize("hidden", [576, 2048, 4096])
def test_ffn_mult_rule_and_its_inverse(hidden):
    for size in range(256, 4 * hidden, 256):  # widths on DeciLM's 256 grid survive the round trip
        assert ffn_mult_to_intermediate_size(intermediate_size_to_ffn_mult(size, hidden), hidden) == size
    assert FFNConfig(intermediate_size=1536).to_dict(hidden)["ffn_mult"] == intermediate_size_to_ffn_mult(1536, hidden)
    assert FFNConfig(intermediate_size=1536).to_dict(None)["ffn_mult"] is None


def test_blocks_module_imports_only_the_standard_library():
    tree = ast.parse(Path(blocks_module.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported and imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_blocks_shape_and_solver_load_without_torch():
    code = ("import sys, puzzle.model.blocks, puzzle.shape, puzzle.solver.problem, puzzle.solver.synthetic; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
