"""Expert importance and uniform expert pruning of MoE parents (issue 25): the router statistics agree with
transformers' own router, the output-aware score sees what an expert adds, and a pruned checkpoint (the
family's own class) computes the parent's logits routed over the kept experts only (the reference:
transformers' parent with the dropped experts' router logits masked to -inf)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from puzzle.errors import PuzzleError
from puzzle.model.checkpoint import to_puzzle
from puzzle.model.family import FAMILIES
from puzzle.pruning.experts import keep_experts, layer_expert_scores, load_expert_scores, moe_layers
from puzzle.pruning.importance import compute_importance
from puzzle.pruning.prune import PrunePlan, prune_model, save_pruned

from conftest import MOE_PARENTS, make_family_parent, make_tokenizer, reload_elsewhere

IDS = torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(0))
ATOL = 1e-5


def family_name(parent: str) -> str:
    return parent.removesuffix("_norm")


def hf_router(mlp):
    """transformers' router of an MoE FFN (`mlp.gate`; gpt-oss's `mlp.router`), None for a dense FFN."""
    router = getattr(mlp, "gate", None) or getattr(mlp, "router", None)
    return router if hasattr(router, "top_k") else None


def hf_moe_layers(model) -> list[int]:
    """The layers whose transformers FFN has a router (a weight of E rows)."""
    return [i for i, layer in enumerate(model.model.layers) if hf_router(layer.mlp) is not None]


class MaskedRouters(TorchFunctionMode):
    """transformers' routers (`<X>TopKRouter.forward`: `router_logits = F.linear(hidden_states, self.weight)`)
    with the dropped experts' logits at -inf: softmax and top-k then see the kept experts only."""

    def __init__(self, keep: dict[int, torch.Tensor]):  # {id(router weight): (E,) bool}
        super().__init__()
        self.keep = keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and id(args[1]) in self.keep:
            out = out.masked_fill(~self.keep[id(args[1])], float("-inf"))
        return out


@torch.no_grad()
def routed_over(parent, experts: dict[int, list[int]], top_k: int | None, ids: torch.Tensor) -> torch.Tensor:
    """transformers' parent's logits with layer i's router restricted to `experts[i]` (and top-k `top_k`)."""
    keep = {}
    for i in hf_moe_layers(parent):
        router = hf_router(parent.model.layers[i].mlp)
        mask = torch.zeros(router.weight.shape[0], dtype=torch.bool)
        mask[experts[i]] = True
        keep[id(router.weight)] = mask
        if top_k is not None:
            router.top_k = top_k
    with MaskedRouters(keep):
        return parent(ids).logits


@pytest.mark.parametrize("family", MOE_PARENTS)
@torch.no_grad()
def test_router_statistics_agree_with_transformers_router(family):
    parent = make_family_parent(family)
    scores = compute_importance(to_puzzle(parent), [IDS[:4], IDS[4:]], progress=False, block_sizes=())
    layers = hf_moe_layers(parent)
    assert moe_layers(scores) == layers
    seen = {}  # transformers' router outputs per layer: (logits, weights, indices)
    hooks = [hf_router(parent.model.layers[i].mlp).register_forward_hook(
        lambda m, a, out, i=i: seen.setdefault(i, []).append(out)) for i in layers]
    parent(IDS)
    for h in hooks:
        h.remove()
    for i in layers:
        logits = torch.cat([o[0] for o in seen[i]])  # (N, E)
        chosen = torch.cat([o[2] for o in seen[i]])  # (N, k)
        E, N, k = logits.shape[1], logits.shape[0], chosen.shape[1]
        freq = torch.bincount(chosen.reshape(-1), minlength=E) / N
        torch.testing.assert_close(scores[f"layers.{i}.experts.frequency"], freq.float())
        torch.testing.assert_close(scores[f"layers.{i}.experts.gate"], logits.float().softmax(-1).mean(0))
        assert scores[f"layers.{i}.experts.frequency"].sum().item() == pytest.approx(k)
        assert scores[f"layers.{i}.experts.output"].shape == (E,) and bool((scores[f"layers.{i}.experts.output"] > 0).all())
        assert scores[f"layers.{i}.experts.neurons"].shape[0] == E
    dense = [i for i in range(len(parent.model.layers)) if i not in layers]
    assert all(f"layers.{i}.neurons" in scores and f"layers.{i}.experts.gate" not in scores for i in dense)
    assert ("layers.0.shared_expert.neurons" in scores) == (family == "qwen2_moe")


@torch.no_grad()
def test_output_score_sees_what_an_expert_adds():
    """An expert whose output is zero scores zero however often it is chosen; doubling another's output
    doubles its score; the router statistics do not move."""
    parent = make_family_parent("mixtral")
    base = compute_importance(to_puzzle(parent), [IDS], progress=False, block_sizes=())
    experts = parent.model.layers[0].mlp.experts  # fused: down_proj (E, D, I)
    experts.down_proj[1] = 0
    experts.down_proj[2] *= 2
    scores = compute_importance(to_puzzle(parent), [IDS], progress=False, block_sizes=())
    out, before = scores["layers.0.experts.output"], base["layers.0.experts.output"]
    assert out[1] == 0 and scores["layers.0.experts.frequency"][1] > 0
    torch.testing.assert_close(out[2], 2 * before[2])
    torch.testing.assert_close(out[[0, 3]], before[[0, 3]])
    for key in ("frequency", "gate"):  # layer 0's routing is upstream of its experts
        torch.testing.assert_close(scores[f"layers.0.experts.{key}"], base[f"layers.0.experts.{key}"])
    assert keep_experts(out, 3).tolist() == [0, 2, 3]


def test_keep_experts_takes_the_best_in_the_parents_order():
    scores = torch.tensor([0.5, 2.0, 0.1, 2.0, 1.0])
    assert keep_experts(scores, 3).tolist() == [1, 3, 4]
    assert keep_experts(scores, 1).tolist() == [1]  # a tie: the lower index
    for n in (0, 6):
        with pytest.raises(PuzzleError, match="between 1 and 5"):
            keep_experts(scores, n)
    with pytest.raises(PuzzleError, match="no router statistics for layer 2"):
        layer_expert_scores({"layers.0.experts.output": scores}, 2)


@pytest.mark.parametrize("family", MOE_PARENTS)
@torch.no_grad()
def test_expert_pruning_computes_the_parent_routed_over_the_kept_experts(family):
    parent = make_family_parent(family)
    child = to_puzzle(parent)
    scores = compute_importance(child, [IDS[:4], IDS[4:]], progress=False, block_sizes=())
    E = parent.config.num_experts if hasattr(parent.config, "num_experts") else parent.config.num_local_experts
    for n, top_k in ((E // 2 + 1, None), (3, 1)):
        pruned, record = prune_model(child, scores, PrunePlan(experts=n, top_k=top_k))
        assert type(pruned).__name__ == FAMILIES[family_name(family)].causal_lm_class
        assert pruned.config.num_experts_per_tok == (top_k or 2)
        kept = {int(i): e for i, e in record["experts"].items()}
        assert sorted(kept) == hf_moe_layers(parent)
        for i, e in kept.items():  # the highest output-aware scores, ascending
            assert e == keep_experts(scores[f"layers.{i}.experts.output"], n).tolist()
        got = pruned(IDS).logits
        ref = routed_over(make_family_parent(family), kept, top_k, IDS)
        assert (got - ref).abs().max() <= ATOL
        assert (got - parent(IDS).logits).abs().max() > 1e-3  # experts did go


@torch.no_grad()
def test_expert_pruning_with_depth_and_heads_and_another_criterion():
    parent = make_family_parent("qwen3_moe")  # layer 1 dense
    child = to_puzzle(parent)
    scores = compute_importance(child, [IDS], progress=False, block_sizes=())
    plan = PrunePlan(experts=4, heads_per_group=1, drop_layers=(2,), expert_criterion="frequency")
    pruned, record = prune_model(child, scores, plan)
    c = pruned.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_experts, c.mlp_only_layers) == (3, 2, 4, [1])
    assert record["kept_layers"] == [0, 1, 3] and record["expert_criterion"] == "frequency"
    assert record["experts"]["3"] == keep_experts(scores["layers.3.experts.frequency"], 4).tolist()
    assert list(record["shape"]["parent_ffns"]) == ["moe_e4k2_i32", "ffn_128", "moe_e4k2_i32"]
    assert pruned(IDS).logits.isfinite().all()


@pytest.mark.parametrize("plan, match", [
    (PrunePlan(experts=9), "between 1 and the parent's 8 experts"),
    (PrunePlan(experts=3, top_k=4), "--top-k must be between 1 and the 3 experts kept"),
    (PrunePlan(top_k=9), "--top-k must be between 1 and the 8"),
    (PrunePlan(experts=4, intermediate_size=64), "pruned by whole experts"),
    (PrunePlan(hidden_size=32), "pruned by whole experts"),
])
def test_bad_expert_plans_fail_in_one_line(plan, match):
    child = to_puzzle(make_family_parent("qwen3_moe"))
    with pytest.raises(PuzzleError, match=match) as info:
        prune_model(child, {}, plan)
    assert "\n" not in str(info.value)


def test_prune_refuses_a_heterogeneous_moe_child():
    from puzzle.model import FFNConfig, MoEConfig
    from puzzle.model.surgery import replace_sublayer

    for layer, ffn in ((0, FFNConfig(moe=MoEConfig(4, 2, 32))), (1, FFNConfig(intermediate_size=64))):
        child = to_puzzle(make_family_parent("qwen3_moe"))  # layer 0 MoE of 8 experts, layer 1 dense of 128
        replace_sublayer(child, layer, "ffn", ffn)
        with pytest.raises(PuzzleError, match="uniform parent .* one MoE block"):
            prune_model(child, {}, PrunePlan(experts=2))


def test_experts_on_a_dense_parent_fail_in_one_line():
    child = to_puzzle(make_family_parent("qwen3"))
    with pytest.raises(PuzzleError, match="this parent is dense"):
        prune_model(child, {}, PrunePlan(experts=2))


@pytest.mark.slow
@torch.no_grad()
def test_expert_pruned_checkpoints_load_in_plain_transformers(tmp_path):
    dirs, expected = {}, {}
    for family in MOE_PARENTS:
        child = to_puzzle(make_family_parent(family))
        scores = compute_importance(child, [IDS], progress=False, block_sizes=())
        pruned, record = prune_model(child, scores, PrunePlan(experts=3, drop_layers=(2,)))
        dirs[family] = save_pruned(pruned, tmp_path / family, make_tokenizer(), record)
        expected[family] = pruned(IDS).logits
        assert not list(dirs[family].glob("*.py"))
    got, stdout = reload_elsewhere(dirs, IDS, tmp_path, remote_code=False)
    for family in MOE_PARENTS:
        assert f"{family} {FAMILIES[family_name(family)].causal_lm_class} transformers.models." in stdout
        assert (got[family] - expected[family]).abs().max() <= ATOL
    # written in the hub layout (one tensor per expert; Mixtral's block_sparse_moe names) as save_pretrained writes
    # it, and config.json with 4.x's names too (Qwen3-MoE's num_experts): transformers 4.56 loads them as they are.
    # Not qwen2_moe here: its parent windows layers 0 and 2 (`layer_types`), which 4.56's Qwen2MoeConfig cannot say.
    from model.test_transformers_versions import OLDEST, oldest_transformers  # tests/ is on sys.path (conftest)

    old = {f: d for f, d in dirs.items() if f != "qwen2_moe"}
    got, stdout = reload_elsewhere(old, IDS, tmp_path, remote_code=False, pythonpath=str(oldest_transformers()))
    assert f"transformers {OLDEST}." in stdout
    for family in old:
        assert (got[family] - expected[family]).abs().max() <= ATOL


@pytest.mark.parametrize("family", MOE_PARENTS + ("qwen3",))
@torch.no_grad()
def test_cost_models_count_the_scores_and_the_pruned_experts(family):
    """importance's disk is the scores it writes; prune's is the pruned checkpoint's weights (--experts 3)."""
    from puzzle.footprint import FP32, Context, Machine, stage_settings
    from puzzle.pruning.commands import importance, prune
    from puzzle.pruning.cost import importance_cost, prune_cost
    from puzzle.shape import ModelShape

    parent = make_family_parent(family)
    ctx = Context(parent.config, ModelShape.from_config(parent.config), None, 16, 0, Machine.one_worker("cpu"))
    child = to_puzzle(parent)
    scores = compute_importance(child, [IDS], progress=False)
    est = importance_cost(ctx, stage_settings(importance, {"parent": "p"}))
    assert est.disk_bytes == sum(v.numel() for v in scores.values()) * FP32
    if family == "qwen3":
        return
    est = prune_cost(ctx, stage_settings(prune, {"parent": "p", "out": "o", "experts": 3}))
    pruned, _ = prune_model(child, scores, PrunePlan(experts=3))
    assert est.disk_bytes == sum(p.numel() for p in pruned.parameters()) * FP32


def _write_run_dir(run_dir, n=16, seq_len=16):
    data = run_dir / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(3, 320, (n, seq_len)).astype(np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"dtype": "uint16", "seq_len": seq_len, "n_train_blocks": n,
                                                "n_val_blocks": n}))


def test_importance_and_prune_commands_on_an_moe_parent(tmp_path, capsys):
    from puzzle.cli import main

    parent = make_family_parent("mixtral")
    parent.save_pretrained(tmp_path / "parent", safe_serialization=True)
    make_tokenizer().save_pretrained(tmp_path / "parent")
    run = tmp_path / "run"
    _write_run_dir(run)
    argv = ["importance", str(tmp_path / "parent"), "--run-dir", str(run), "--n-samples", "8", "--batch-size", "4",
            "--drop-samples", "4"]
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(load_expert_scores(run)) == [0, 1, 2, 3]
    assert main(["prune", str(tmp_path / "parent"), str(tmp_path / "pruned"), "--run-dir", str(run),
                 "--experts", "2", "--top-k", "1", "--drop-layers", "1"]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"],
            config["num_hidden_layers"]) == ("mixtral", 2, 1, 3)
    record = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    assert record["experts"] == {str(i): keep_experts(load_expert_scores(run)[i], 2).tolist()
                                 for i in record["kept_layers"]}
    capsys.readouterr()
    for flags, match in ((["--experts", "5"], "between 1 and the parent's 4 experts"),
                         (["--experts", "2", "--top-k", "3"], "--top-k must be between 1 and the 2"),
                         (["--ffn-size", "64"], "pruned by whole experts"),
                         (["--target-params", "100K"], "pruned by whole experts")):
        assert main(["prune", str(tmp_path / "parent"), str(tmp_path / "bad"), "--run-dir", str(run), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and match in err
        assert not (tmp_path / "bad").exists()
