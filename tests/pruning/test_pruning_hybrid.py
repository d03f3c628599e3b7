"""Minitron pruning of a hybrid parent (issue 26; puzzle/pruning/hybrid.py): a tiny NemotronH (tests/hybrid.py:
Mamba2, MoE, attention, MLP, Mamba2, MoE) loses whole layers, heads, relu2 neurons, experts and expert width
into a plain checkpoint that transformers' own NemotronHForCausalLM loads and that computes what puzzle's model
of it computes; what is exact is checked against transformers' parent (layers removed, units zeroed)."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, NemotronHForCausalLM

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.model.checkpoint import load_puzzle, to_puzzle
from puzzle.pruning.commands import importance, prune
from puzzle.pruning.hybrid import HybridPlan, kept_experts, prune_hybrid
from puzzle.pruning.importance import compute_importance, load_importance
from puzzle.pruning.prune import save_pruned

from conftest import make_tokenizer
from hybrid import make_nemotron_h_parent
from test_pruning_prune import _write_run_dir

IDS = torch.randint(3, 320, (2, 19), generator=torch.Generator().manual_seed(0))  # three Mamba2 chunks of 8


@pytest.fixture(scope="module")
def parent_and_scores():
    parent = make_nemotron_h_parent()
    batches = [torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    scores = compute_importance(to_puzzle(copy.deepcopy(parent)), batches, block_sizes=(1,), progress=False)
    return parent, scores


def _pruned(parent, scores, plan, tmp_path):
    """prune_hybrid's checkpoint, loaded by transformers' own class and by puzzle; both logits agree."""
    pruned, record = prune_hybrid(to_puzzle(copy.deepcopy(parent)), scores, plan)
    out = save_pruned(pruned, tmp_path / "out", make_tokenizer(), record)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is NemotronHForCausalLM
    with torch.no_grad():
        logits = loaded(IDS, use_cache=False).logits
        assert (logits - load_puzzle(out)(IDS).logits).abs().max() <= 1e-5
    return loaded, logits, json.loads((out / "pruning.json").read_text())


def test_dropping_layers_is_transformers_parent_without_them(parent_and_scores, tmp_path):
    parent, scores = parent_and_scores
    loaded, logits, record = _pruned(parent, scores, HybridPlan(drop_layers=(0, 3)), tmp_path)  # a Mamba2, the MLP
    assert record["layer_kinds"] == ["moe", "attention", "mamba", "moe"] and record["kept_layers"] == [1, 2, 4, 5]
    assert loaded.config.layers_block_type == ["moe", "full_attention", "linear_attention", "moe"]
    reference = copy.deepcopy(parent)
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in (1, 2, 4, 5)])
    with torch.no_grad():
        assert (reference(IDS, use_cache=False).logits - logits).abs().max() <= 1e-5


def test_task_depth_windows_on_a_hybrid_are_the_model_without_them(parent_and_scores):
    """`--depth-method task` replays each window's prefix (task_depth.py `_Prefix`) through Mamba2, MoE,
    attention and MLP layers alike: each window scores as the model with those layers removed."""
    from torch import nn

    from puzzle.pruning.task_depth import _task_scores, score_windows, tokenize_items

    parent, _ = parent_and_scores
    model, tokenizer = to_puzzle(copy.deepcopy(parent)), make_tokenizer()
    items = [{"context": "The quick brown", "choices": [" fox jumps", " dog"], "label": 0},
             {"context": "A list is", "choices": [" mutable", " a tuple here"], "label": 1}] * 2
    windows = score_windows(model, tokenizer, items, 2, progress=False)["windows"]
    full, tokens = model.model.layers, tokenize_items(tokenizer, items)
    for start in range(5):
        model.model.layers = nn.ModuleList([layer for i, layer in enumerate(full) if not start <= i < start + 2])
        naive = _task_scores(model, tokens, items, tokenizer.pad_token_id or 0)["correct_logp_per_byte"]
        assert naive == pytest.approx(windows[start]["correct_logp_per_byte"], abs=1e-6)
    model.model.layers = full


def _zero_units(model, keep_heads, keep_neurons, keep_expert_neurons):
    """transformers' parent with the units a prune drops zeroed where that is exact: query heads (o_proj
    columns), relu2 neurons (up_proj rows: relu(0)^2 = 0) and each expert's neurons (its up_proj rows)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        o = model.model.layers[2].mixer.o_proj.weight  # (D, H*d)
        drop = torch.ones(o.shape[1], dtype=torch.bool)
        for h in keep_heads:
            drop[h * 16:(h + 1) * 16] = False
        o[:, drop] = 0
        up = model.model.layers[3].mixer.up_proj.weight
        up[[i for i in range(up.shape[0]) if i not in keep_neurons]] = 0
        for layer in (1, 5):
            experts = model.model.layers[layer].mixer.experts.up_proj  # (E, I, D)
            for j in range(experts.shape[0]):
                experts[j, [i for i in range(experts.shape[1]) if i not in keep_expert_neurons[str(layer)][j]]] = 0
    return model


def test_width_pruning_is_the_parent_with_the_dropped_units_zeroed(parent_and_scores, tmp_path):
    parent, scores = parent_and_scores
    plan = HybridPlan(ffn_size=48, heads_per_group=1, expert_size=16)  # 2 of 4 query heads, half the neurons
    loaded, logits, record = _pruned(parent, scores, plan, tmp_path)
    c = loaded.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.moe_intermediate_size) == (2, 2, 48, 16)
    heads = [int(h) for h in torch.cat([g * 2 + torch.argmax(scores["layers.2.heads"][g * 2:g * 2 + 2]).view(1)
                                        for g in range(2)])]
    neurons = torch.sort(scores["layers.3.neurons"], descending=True, stable=True).indices[:48].tolist()
    reference = _zero_units(parent, heads, set(neurons), {k: [set(n) for n in v]
                                                                for k, v in record["expert_neurons"].items()})
    with torch.no_grad():
        assert (reference(IDS, use_cache=False).logits - logits).abs().max() <= 1e-5
    per_expert = scores["layers.1.experts.neurons"]
    assert record["expert_neurons"]["1"][3] == sorted(torch.topk(per_expert[3], 16).indices.tolist())


def test_experts_keep_their_router_rows_and_routing_groups(tmp_path):
    parent = make_nemotron_h_parent(n_group=2, topk_group=1)  # two routing groups of four: 4 experts = 2 + 2
    batches = [torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(1))]
    scores = compute_importance(to_puzzle(copy.deepcopy(parent)), batches, progress=False)
    loaded, _, record = _pruned(parent, scores, HybridPlan(experts=4, top_k=1), tmp_path)
    assert loaded.config.n_routed_experts == 4 and loaded.config.num_experts_per_tok == 1
    for layer in ("1", "5"):
        kept = record["experts"][layer]
        output = scores[f"layers.{layer}.experts.output"]
        assert kept == kept_experts(output, 4, 2).tolist()
        assert [j // 4 for j in kept] == [0, 0, 1, 1]  # two of each group of four, its best two
        assert kept[:2] == sorted(torch.topk(output[:4], 2).indices.tolist())
        ours, theirs = loaded.model.layers[int(layer)].mixer, parent.model.layers[int(layer)].mixer
        assert torch.equal(ours.gate.weight, theirs.gate.weight[kept])
        assert torch.equal(ours.gate.e_score_correction_bias, theirs.gate.e_score_correction_bias[kept])
        assert torch.equal(ours.experts.up_proj, theirs.experts.up_proj[kept])
        assert torch.equal(ours.shared_experts.down_proj.weight, theirs.shared_experts.down_proj.weight)


def test_plans_a_hybrid_cannot_take_are_one_line(parent_and_scores):
    parent, scores = parent_and_scores
    model = to_puzzle(copy.deepcopy(parent))
    for plan, message in [(HybridPlan(experts=6), "groups of two or more"), (HybridPlan(experts=2), "groups of two"),
                          (HybridPlan(ffn_size=200), "between 1 and the parent's 96"),
                          (HybridPlan(drop_layers=tuple(range(6))), "at least one must stay"),
                          (HybridPlan(expert_size=0), "between 1")]:
        with pytest.raises(PuzzleError, match=message):
            prune_hybrid(model, scores, plan)


@pytest.mark.slow
def test_importance_and_prune_commands_on_a_hybrid_parent(tmp_path, capsys):
    parent_dir = tmp_path / "parent"
    make_nemotron_h_parent(n_group=2, topk_group=1).save_pretrained(parent_dir, safe_serialization=True)
    make_tokenizer().save_pretrained(parent_dir)
    run_dir = tmp_path / "run"
    _write_run_dir(run_dir)
    importance(parent_dir, run_dir=run_dir, n_samples=8, seq_len=16, batch_size=4, block_sizes=[1, 2], drop_samples=4)
    scores = load_importance(run_dir)
    for method in ("block", "bi", "loss"):
        out = prune(parent_dir, tmp_path / method, run_dir=run_dir, drop_layers=2, depth_method=method, experts=4,
                    kv_groups=1, ffn_size=64, expert_size=24)
        record = json.loads((out / "pruning.json").read_text())
        if method == "block":
            start = int(torch.argmin(scores["layers.drop_loss.k2"]))
            assert record["dropped_layers"] == [start, start + 1]
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(loaded) is NemotronHForCausalLM and len(loaded.config.layers_block_type) == 4
        with torch.no_grad():
            assert (loaded(IDS, use_cache=False).logits - load_puzzle(out)(IDS).logits).abs().max() <= 1e-5
    # what a hybrid cannot take: one line, exit 2
    for flags, message in [(["--hidden-size", "32"], "--hidden-size on a hybrid"),
                           (["--target-params", "100K"], "--target-params picks a uniform shape"),
                           (["--experts", "3"], "groups of two or more"),
                           (["--experts", "4", "--top-k", "5"], "--top-k must be between 1 and the 4")]:
        capsys.readouterr()
        code = main(["prune", str(parent_dir), str(tmp_path / "bad"), "--run-dir", str(run_dir),
                     *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_a_converted_parent_prunes_as_the_parent_and_a_heterogeneous_child_is_refused(tmp_path):
    """The pipeline's converted parent (R/parent, an all-parent puzzle child) gives the same checkpoint as the
    NemotronH it came from; a child whose layers of a kind differ has no NemotronH config: one line."""
    from puzzle.model import PuzzleForCausalLM
    from puzzle.model.configuration_puzzle import PuzzleConfig
    from puzzle.model.convert import convert

    parent = make_nemotron_h_parent(n_group=2, topk_group=1)
    parent.save_pretrained(tmp_path / "parent", safe_serialization=True)
    make_tokenizer().save_pretrained(tmp_path / "parent")
    converted = load_puzzle(convert(tmp_path / "parent", tmp_path / "converted"))
    scores = compute_importance(to_puzzle(copy.deepcopy(parent)), [IDS[:, :16]], progress=False)
    plan = HybridPlan(drop_layers=(3,), ffn_size=48, experts=4, expert_size=16, heads_per_group=1)
    a, _ = prune_hybrid(to_puzzle(copy.deepcopy(parent)), scores, plan)
    b, _ = prune_hybrid(converted, scores, plan)
    assert a.config.to_dict() == b.config.to_dict()
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)

    blocks = [dict(b) for b in converted.config.to_dict()["block_configs"]]
    blocks[3] = {**blocks[3], "ffn": {**blocks[3]["ffn"], "intermediate_size": 48}}  # the MLP layer narrower
    child = PuzzleForCausalLM(PuzzleConfig(**{**converted.config.to_dict(), "block_configs": blocks}))
    with pytest.raises(PuzzleError, match="uniform hybrid parent"):
        prune_hybrid(child, scores, HybridPlan(drop_layers=(0,)))
