"""Puzzle's heterogeneous expert removal vs uniform expert pruning on a small MoE parent built here:
writes benchmarks/moe.json and benchmarks/moe.md.

No MoE checkpoint can be downloaded here, so the MoE parent is upcycled from the reference parent
(SmolLM2-135M-Instruct, a Llama) into a Mixtral-family checkpoint (Mixtral's attention is Llama's: no biases,
no q/k norm; no sliding window), then trained briefly with the dense original as teacher:

  1. each layer's FFN (1536 neurons) is split into E=8 experts of 192 neurons by balanced k-means on the
     neurons' activation patterns (|SwiGLU activation| over calibration tokens, cosine), so an expert's
     neurons tend to fire together (MoEfication's idea);
  2. with all 8 experts chosen, equal router logits and Mixtral's renormalised top-k, every expert's weight
     is 1/8: scaling each expert's down_proj by 8 reproduces the dense FFN exactly (checked, logits max diff);
  3. the parent is then routed top-k (k=4): the down_proj scale is k (the k chosen experts reproduce their
     share of the dense FFN; the others' share is dropped), and the router is fitted per layer by ridge
     regression of log ||expert output|| on the FFN input (so it picks the experts that would add the most),
     its logits scaled by the temperature (of 0.25 / 0.5 / 1) with the least layer-local reconstruction error;
  4. every weight but the (tied) embedding is trained a few steps by logit KL to the dense original.

Then the comparison, in one `puzzle run` (prepare-data, importance, build-library, score, profile, solve,
realize, GKD, baselines, evaluate), on the upcycled parent:
  (a) Puzzle: a search space whose only knobs are the MoE layers' experts kept and top-k (attention as the
      parent's), solved on `h100_80gb` at the predicted speedup of (b);
  (b) uniform: `puzzle prune --experts N` (Minitron-style: the same N highest-scoring experts' count in every
      layer, by the output-aware router statistic), as a pipeline baseline.
Both get the same GKD (logit KL only: the pipeline gives baselines no hidden-state loss, so the children get
none either) and are evaluated before and after it (KL to the MoE parent, perplexity, cloze accuracy).

    nice -n 19 env PYTHONPATH=$PWD .venv/bin/python scripts/bench_moe.py [--kd-steps 12 --gkd-steps 8]
    ... --render-only     re-render benchmarks/moe.md from benchmarks/moe.json
"""

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_quality import BUDGET, throughput, timed  # noqa: E402
from puzzle.data.blocks import load_blocks  # noqa: E402
from puzzle.data.prepare import prepare_data  # noqa: E402
from puzzle.evaluate.commands import evaluate  # noqa: E402
from puzzle.evaluate.mc import build_mc  # noqa: E402
from puzzle.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from puzzle.model import PuzzleConfig  # noqa: E402
from puzzle.model.blocks import BlockConfig  # noqa: E402
from puzzle.model.checkpoint import load_config, load_model, load_tokenizer, puzzle_config_from, save_checkpoint  # noqa: E402
from puzzle.pipeline import run as run_pipeline  # noqa: E402
from puzzle.profiling.hardware import load_profile  # noqa: E402

PARENT = REPO / "assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = REPO / "assets" / "corpus" / "python-docs"
OUT = REPO / "benchmarks"
SEED = 0


# ---------------------------------------------------------------- upcycling (steps 1-4 of the docstring)

def capture_ffn_inputs(dense, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's FFN input (post-attention-norm hidden states) on `batches`: a list of (N, D) per layer."""
    layers = dense.model.layers
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_hook(lambda m, inp, out, i=i: seen[i].append(inp[0].reshape(-1, inp[0].shape[-1])))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        for b in batches:
            dense(input_ids=b)
    for h in hooks:
        h.remove()
    return [torch.cat(s) for s in seen]


def balanced_kmeans(features: torch.Tensor, k: int, iters: int = 4) -> list[torch.Tensor]:
    """Split the F rows of `features` (F, N) into k clusters of exactly F/k by cosine k-means, each assignment
    greedy by similarity under the equal-size cap. Returns k ascending index tensors."""
    f = F.normalize(features, dim=1)
    n, cap = f.shape[0], f.shape[0] // k
    g = torch.Generator().manual_seed(SEED)
    centroids = f[torch.randperm(n, generator=g)[:k]]
    for _ in range(iters):
        sim = f @ centroids.T  # (F, k)
        order = torch.argsort(sim.reshape(-1), descending=True).tolist()
        assign, size = [-1] * n, [0] * k
        for flat in order:
            row, c = divmod(flat, k)
            if assign[row] < 0 and size[c] < cap:
                assign[row], size[c] = c, size[c] + 1
        labels = torch.tensor(assign)
        centroids = F.normalize(torch.stack([f[labels == c].mean(0) for c in range(k)]), dim=1)
    return [torch.nonzero(labels == c).flatten() for c in range(k)]


def mixtral_config(dense_cfg, experts: int, top_k: int):
    from transformers import MixtralConfig

    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
              "pad_token_id", "hidden_act", "rope_parameters")
    kw = {f: getattr(dense_cfg, f) for f in fields if getattr(dense_cfg, f, None) is not None}
    return MixtralConfig(**kw, intermediate_size=dense_cfg.intermediate_size // experts, num_local_experts=experts,
                         num_experts_per_tok=top_k, sliding_window=None, head_dim=dense_cfg.hidden_size // dense_cfg.num_attention_heads,
                         router_jitter_noise=0.0, output_router_logits=False)


def build_mixtral(dense, clusters: list[list[torch.Tensor]], top_k: int, scale: float,
                  routers: list[torch.Tensor] | None):
    """transformers' MixtralForCausalLM with the dense model's attention, norms and embedding, and layer i's
    expert j = the dense FFN's neurons clusters[i][j] (down_proj times `scale`); routers[i] (E, D) or zeros."""
    from transformers import MixtralForCausalLM

    experts = len(clusters[0])
    cfg = mixtral_config(dense.config, experts, top_k)
    moe = MixtralForCausalLM(cfg).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(dense.model.layers):
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        p = f"model.layers.{i}.mlp."
        state[p + "experts.gate_up_proj"] = torch.stack([torch.cat([gate[idx], up[idx]]) for idx in clusters[i]])  # (E, 2I, D)
        state[p + "experts.down_proj"] = torch.stack([down[:, idx] * scale for idx in clusters[i]])  # (E, D, I)
        state[p + "gate.weight"] = routers[i] if routers is not None else torch.zeros(experts, cfg.hidden_size)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"upcycle state mismatch: missing {missing}, unexpected {unexpected}")
    moe.tie_weights()
    return moe


def fit_router(x: torch.Tensor, parts: torch.Tensor, dense_out: torch.Tensor, top_k: int) -> tuple[torch.Tensor, dict]:
    """Layer router (E, D): ridge regression of log ||expert output|| (parts (N, E, D), each expert's share of the
    dense FFN output) on the FFN input x (N, D), centred per token (softmax ignores a shift); the fitted logits
    scaled by the temperature whose top-k mix (k x sum of renormalised weights x share) reconstructs the dense
    output (N, D) best."""
    y = torch.log(parts.norm(dim=-1) + 1e-6)
    y = y - y.mean(1, keepdim=True)
    gram = x.T @ x
    lam = 1e-2 * gram.trace() / gram.shape[0]
    r = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0]), x.T @ y).T  # (E, D)
    logits = x @ r.T
    top, idx = logits.topk(top_k, dim=-1)
    chosen = torch.gather(parts, 1, idx[..., None].expand(-1, -1, parts.shape[-1]))  # (N, k, D)
    denom = dense_out.pow(2).sum()
    errors = {}
    for t in (0.25, 0.5, 1.0):
        w = torch.softmax(t * top, dim=-1)
        recon = top_k * (w[..., None] * chosen).sum(1)
        errors[t] = float((recon - dense_out).pow(2).sum() / denom)
    t = min(errors, key=errors.get)
    hit = float((idx[:, :, None] == parts.norm(dim=-1).topk(top_k, dim=-1).indices[:, None, :]).any(-1).float().mean())
    return t * r, {"temperature": t, "rel_error": errors, "oracle_overlap": hit}


def kd_train(teacher, student, blocks: np.ndarray, steps: int, batch: int, lr: float, log: list) -> None:
    """Logit KL(teacher || student) per token, AdamW, linear warm-up then cosine; the tied embedding frozen."""
    student.train()
    student.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, steps - warm))))
    order = np.random.default_rng(SEED).permutation(len(blocks))
    start = time.perf_counter()
    for step in range(steps):
        ids = torch.as_tensor(np.asarray(blocks[np.sort(order[step * batch:(step + 1) * batch])], dtype=np.int64))
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        s_logp = F.log_softmax(student(input_ids=ids).logits.float(), -1)
        loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.append({"step": step + 1, "kl": round(loss.item(), 4), "elapsed_s": round(time.perf_counter() - start, 1)})
        print(f"upcycle KD step {step + 1}/{steps}: KL {loss.item():.4f}", flush=True)
    student.eval()


@torch.no_grad()
def mean_kl(teacher, student, batches: list[torch.Tensor]) -> float:
    total, n = 0.0, 0
    for b in batches:
        t = F.log_softmax(teacher(input_ids=b).logits.float(), -1)
        s = F.log_softmax(student(input_ids=b).logits.float(), -1)
        total += float((t.exp() * (t - s)).sum(-1).sum())
        n += b.numel()
    return total / n


def upcycle(args, dense_dir: Path, out: Path) -> dict:
    """The MoE parent at `out` (a Mixtral checkpoint + tokenizer) and the record of how it was made."""
    record_path = out.parent / "upcycle.json"
    if (out / "config.json").exists() and record_path.exists():
        print(f"upcycle: reusing {out}")
        return read_json(record_path)
    torch.manual_seed(SEED)
    dense = load_model(PARENT)
    train = load_blocks(dense_dir, "train")
    val = torch.as_tensor(np.asarray(load_blocks(dense_dir, "val")[:args.kd_val_blocks], dtype=np.int64))
    val_batches = list(val.split(4))
    # calibration: the last train blocks (KD below draws from the same pool; these are a few of 3,000)
    calib = torch.as_tensor(np.asarray(train[-args.fit_blocks:], dtype=np.int64))
    xs = capture_ffn_inputs(dense, list(calib.split(4)))
    clusters, routers, fits = [], [], []
    for i, layer in enumerate(dense.model.layers):
        x = xs[i]
        with torch.no_grad():
            act = F.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)  # (N, 1536)
            idx = balanced_kmeans(act.abs().T, args.experts)
            down = layer.mlp.down_proj.weight  # (D, 1536)
            parts = torch.stack([act[:, j] @ down[:, j].T for j in idx], 1)  # (N, E, D): each expert's share
            router, fit = fit_router(x, parts, parts.sum(1), args.top_k)
        clusters.append(idx)
        routers.append(router)
        fits.append(fit)
    del xs
    # exactness: all experts chosen, equal (zero) logits, renormalised: each weight 1/E, down_proj x E
    exact = build_mixtral(dense, clusters, top_k=args.experts, scale=args.experts, routers=None)
    with torch.no_grad():
        b = val[:2]
        exact_diff = float((exact(input_ids=b).logits - dense(input_ids=b).logits).abs().max())
    del exact
    print(f"upcycle: top-{args.experts} of {args.experts} vs dense, max |logit diff| {exact_diff:.2e}")
    moe = build_mixtral(dense, clusters, top_k=args.top_k, scale=args.top_k, routers=routers)
    kl_init = mean_kl(dense, moe, val_batches)
    zero = build_mixtral(dense, clusters, top_k=args.top_k, scale=args.top_k, routers=None)
    kl_zero_router = mean_kl(dense, zero, val_batches)  # the same experts, router left at zero (ties -> lowest index)
    del zero
    print(f"upcycle: KL to dense before KD {kl_init:.4f} (fitted router), {kl_zero_router:.4f} (zero router)")
    log: list[dict] = []
    t0 = time.perf_counter()
    kd_train(dense, moe, train, args.kd_steps, args.kd_batch, args.kd_lr, log)
    kd_s = time.perf_counter() - t0
    kl_after = mean_kl(dense, moe, val_batches)
    save_checkpoint(moe, out, tokenizer=load_tokenizer(PARENT))
    reloaded = load_model(out)
    with torch.no_grad():
        roundtrip = float((reloaded(input_ids=val[:1]).logits - moe(input_ids=val[:1]).logits).abs().max())
    record = {
        "family": "mixtral", "experts": args.experts, "top_k": args.top_k,
        "expert_size": dense.config.intermediate_size // args.experts, "seed": SEED,
        "clustering": "balanced cosine k-means of |SwiGLU activation| over calibration tokens, 4 iterations",
        "fit_tokens": int(calib.numel()), "exact_top_all_max_logit_diff": exact_diff,
        "router_fit": [{"layer": i, **f} for i, f in enumerate(fits)],
        "kl_before_kd": {"fitted_router": kl_init, "zero_router": kl_zero_router},
        "kd": {"steps": args.kd_steps, "batch_size": args.kd_batch, "lr": args.kd_lr,
               "tokens": args.kd_steps * args.kd_batch * train.shape[1], "wall_s": round(kd_s, 1), "log": log},
        "kl_after_kd_quick": kl_after, "kd_val_tokens": int(val.numel()), "saved_roundtrip_max_logit_diff": roundtrip,
    }
    atomic_write_json(record_path, record)
    return record


# ---------------------------------------------------------------- the comparison

def uniform_speedup(parent: Path, keep: int, profile) -> tuple[float, int]:
    """The predicted h100 speedup of the parent with `keep` experts in every MoE layer (top-k capped at it, as
    `puzzle prune --experts` caps it), from the roofline (bench_quality's `throughput`), and that top-k."""
    cfg = puzzle_config_from(load_config(parent))
    blocks = cfg.blocks
    k = None
    pruned = []
    for b in blocks:
        if b.ffn.is_moe:
            k = min(b.ffn.moe.top_k, keep)
            b = replace(b, ffn=replace(b.ffn, moe=replace(b.ffn.moe, num_experts=keep, top_k=k)))
        pruned.append(b)
    child = PuzzleConfig(**{**cfg.to_dict(), "block_configs": [b.to_dict(cfg.hidden_size) for b in pruned]})
    return throughput(child, profile) / throughput(cfg, profile), k


def search_space(args) -> dict:
    return {"name": "moe_bench", "attention": {"kv_heads": "all", "linear": False, "no_op": False},
            "ffn": {"ratios": [1.0], "linear": False, "no_op": False,
                    "moe": {"expert_ratios": args.expert_ratios, "top_k": args.space_top_k, "expert_width_ratios": [1.0]}}}


def pipeline_config(args, root: Path, parent: Path, speedup: float) -> dict:
    gkd = {"hidden_loss": "none", "steps": args.gkd_steps, "batch_size": args.gkd_batch, "lr": 1.0e-4,
           "warmup_steps": 3, "val_every": args.gkd_steps, "val_blocks": 8, "checkpoint_every": args.gkd_steps}
    return {
        "run_dir": str(root / "run"), "parent": str(parent), "corpus": str(CORPUS),
        "search_space": str(root / "moe_bench_space.yaml"),
        "prepare_data": {"seq_len": args.seq_len, "max_tokens": args.max_tokens, "val_fraction": 0.05},
        "importance": {"n_samples": 32, "batch_size": 8, "drop_samples": 4},
        "build_library": {"tokens_per_block": args.tokens_per_block, "batch_size": 4, "calibration_tokens": 1024,
                          "eval_tokens": 512, "workers": 1, "ray": False},
        "score": {"blocks": 2, "batch_size": 2},
        "profile": [{"budget": BUDGET}],
        "solve": [{"budget": BUDGET, "speedup": round(speedup, 4), "name": "puzzle"}],
        "realize": [{"solution": "puzzle"}],
        "gkd": gkd,
        "baselines": [{"name": "uniform", "experts": args.uniform_experts}],
        "evaluate": {"val_blocks": args.eval_blocks, "batch_size": 4, "mc_items": args.mc_items, "budget": BUDGET,
                     "measure": False},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "bench_moe")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=400_000)
    ap.add_argument("--fit-blocks", type=int, default=16, help="train blocks the clustering and router fit read")
    ap.add_argument("--kd-steps", type=int, default=12)
    ap.add_argument("--kd-batch", type=int, default=4)
    ap.add_argument("--kd-lr", type=float, default=3e-4)
    ap.add_argument("--kd-val-blocks", type=int, default=8)
    ap.add_argument("--uniform-experts", type=int, default=4)
    ap.add_argument("--expert-ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    ap.add_argument("--space-top-k", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--tokens-per-block", type=int, default=1024)
    ap.add_argument("--gkd-steps", type=int, default=8)
    ap.add_argument("--gkd-batch", type=int, default=4)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--mc-items", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--collect-only", action="store_true", help="write moe.{json,md} from an earlier run's files")
    args = ap.parse_args()
    if args.render_only:
        atomic_write_text(OUT / "moe.md", render(read_json(OUT / "moe.json")))
        return
    if args.collect_only:
        collect_only(args)
        return
    if not PARENT.exists():
        sys.exit(f"reference parent missing: {PARENT} (scripts/fetch_reference_assets.sh)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    root, walls, load_start = args.root, {}, os.getloadavg()
    start = time.perf_counter()
    dense_dir, moe_parent = root / "dense", root / "moe_parent"
    timed(walls, "prepare-data (dense)", prepare_data, CORPUS, PARENT, run_dir=dense_dir, seq_len=args.seq_len,
          max_tokens=args.max_tokens)
    up = timed(walls, "upcycle (fit + KD)", upcycle, args, dense_dir, moe_parent)
    # the upcycled parent against the dense original, on the dense run's validation blocks and cloze task
    mc = build_mc(dense_dir, items=args.mc_items)
    ev = dict(run_dir=dense_dir, parent=PARENT, val_blocks=args.eval_blocks, batch_size=4, mc_tasks=[str(mc)],
              budget=None, measure=False)
    dense_eval = timed(walls, "evaluate dense", evaluate, PARENT, name="dense", **ev)
    moe_eval = timed(walls, "evaluate upcycled", evaluate, moe_parent, name="moe_parent", **ev)

    profile = load_profile(BUDGET)
    speedup, uniform_k = uniform_speedup(moe_parent, args.uniform_experts, profile)
    print(f"uniform {args.uniform_experts} experts (top-{uniform_k}): predicted {speedup:.4f}x on {BUDGET}")
    (root / "moe_bench_space.yaml").write_text(yaml.safe_dump(search_space(args)))
    config = root / "moe_bench.yaml"
    config.write_text(yaml.safe_dump(pipeline_config(args, root, moe_parent, speedup)))
    run_dir = timed(walls, "puzzle run", run_pipeline, config)
    payload = collect(args, root, up, dense_eval, moe_eval, speedup, uniform_k, load_start,
                      {**walls, "total": round(time.perf_counter() - start, 1)}, Path(run_dir))
    atomic_write_json(OUT / "moe.json", payload)
    atomic_write_text(OUT / "moe.md", render(payload))
    print(render(payload))


def _read(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def collect(args, root: Path, up: dict, dense_eval: dict, moe_eval: dict, speedup: float, uniform_k: int,
            load_start, walls: dict, run_dir: Path) -> dict:
    """moe.json's payload from what the run directory holds (a run cut short: whatever stages finished,
    `partial` naming what is missing)."""
    evals = {p.stem: read_json(p) for p in (run_dir / "eval").glob("*.json")}
    child_cfg = _read(run_dir / "children" / "puzzle" / "config.json")
    pruning = _read(run_dir / "baselines" / "uniform" / "pruning.json")
    missing = [n for n in ("parent", "puzzle", "puzzle+gkd", "uniform", "uniform+gkd") if n not in evals]
    return {
        "parent_dense": str(PARENT.relative_to(REPO)), "corpus": str(CORPUS.relative_to(REPO)), "seed": SEED,
        "partial": missing,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpu_threads": args.threads, "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "upcycle": up, "dense_eval": dense_eval, "moe_parent_eval": moe_eval,
        "uniform": {"experts": args.uniform_experts, "top_k": uniform_k, "predicted_speedup": speedup,
                    "record": {k: pruning.get(k) for k in ("params", "experts", "kept_experts") if k in pruning}},
        "search_space": search_space(args), "pipeline": pipeline_config(args, root, root / "moe_parent", speedup),
        "solution": _read(run_dir / "solutions" / "puzzle.json"),
        "puzzle_child": {"layout": [_layout(BlockConfig.from_dict(b, child_cfg["hidden_size"]))
                                    for b in child_cfg.get("block_configs", [])],
                         "experts": _read(run_dir / "children" / "puzzle" / "realized.json").get("experts")},
        "evals": evals, "stages": {k: v.get("wall_s") for k, v in _read(run_dir / "pipeline.json").items()},
        "wall_s": walls,
    }


def collect_only(args) -> None:
    """moe.{json,md} from an earlier (possibly unfinished) run of this script, nothing run."""
    root = args.root
    earlier = _read(OUT / "moe.json")  # the full run's record, if it got that far: its start load and step times
    speedup, uniform_k = uniform_speedup(root / "moe_parent", args.uniform_experts, load_profile(BUDGET))
    payload = collect(args, root, read_json(root / "upcycle.json"), read_json(root / "dense" / "eval" / "dense.json"),
                      read_json(root / "dense" / "eval" / "moe_parent.json"), speedup, uniform_k,
                      earlier.get("machine", {}).get("loadavg_start", os.getloadavg()), earlier.get("wall_s", {}),
                      root / "run")
    atomic_write_json(OUT / "moe.json", payload)
    atomic_write_text(OUT / "moe.md", render(payload))
    print(render(payload))


def _mc(ev: dict) -> tuple[float, float]:
    m = next(iter(ev["multiple_choice"].values()))
    return m["acc"], m["acc_norm"]


def _row(name: str, ev: dict, before: dict | None = None) -> str:
    v = ev["validation"]
    acc, norm = _mc(ev)
    kl = f"{before['validation']['kl']:.3f} -> {v['kl']:.3f}" if before else f"{v['kl']:.3f}"
    sp = ev.get("predicted", {}).get("speedup")
    return (f"| {name} | {ev['params'] / 1e6:.1f}M | {kl} | {v['perplexity']:.2f} | {v['top1_agreement']:.3f} "
            f"| {acc:.3f} ({norm:.3f}) | {f'{sp:.3f}x' if sp else '–'} |")


def _layout(block: BlockConfig) -> str:
    """A child's layer as 'experts/top-k' (or its dense FFN's kind)."""
    moe = block.ffn.moe
    return f"{moe.num_experts}/{moe.top_k}" if moe else ("noop" if block.ffn.no_op else "dense")


def verdict(ev: dict, p: dict) -> list[str]:
    """Who is ahead on each metric after GKD, with the evaluation's size (so the reader can judge the noise)."""
    a, b = ev["puzzle+gkd"], ev["uniform+gkd"]
    rows = [("KL to the parent", a["validation"]["kl"], b["validation"]["kl"], True),
            ("perplexity", a["validation"]["perplexity"], b["validation"]["perplexity"], True),
            ("cloze acc", _mc(a)[0], _mc(b)[0], False), ("cloze acc_norm", _mc(a)[1], _mc(b)[1], False)]
    out = ["After the same GKD (Puzzle vs uniform):", ""]
    winners = set()
    for name, x, y, lower in rows:
        who = "tie" if x == y else ("Puzzle" if (x < y) == lower else "uniform")
        winners |= {who} - {"tie"}
        out.append(f"- {name}: {x:.3f} vs {y:.3f} -> **{who}**")
    pa, ua = ev["puzzle"]["params"], ev["uniform"]["params"]
    n_items = next(iter(a["multiple_choice"].values())).get("items", p["settings"]["mc_items"])
    kl_before = "ahead" if ev["puzzle"]["validation"]["kl"] < ev["uniform"]["validation"]["kl"] else "behind"
    out += ["", f"At the same predicted speed Puzzle's child has {pa / 1e6:.1f}M parameters, uniform's {ua / 1e6:.1f}M "
            f"(layouts above). Before GKD Puzzle is {kl_before} on KL (the metric its block scores and the solver use: "
            f"`{p['solution'].get('metric')}`). The margins are small against the evaluation's size "
            f"({a['validation']['tokens']:,} tokens, {n_items} cloze items: one item is {1 / n_items:.3f}), so this is "
            f"{'mixed evidence, not a win for either' if len(winners) > 1 else 'one run, not a settled ranking'}. The predicted speedup is small (the profile's workload is "
            "KV-cache bound; the experts are a small part of each decode step), the GKD budget is tiny, and the parent is "
            "an upcycled dense model whose experts are not specialised the way a pretrained MoE's are: this says how the "
            "two start and recover, not where they end up."]
    return out


def render(p: dict) -> str:
    up, s = p["upcycle"], p["settings"]
    de, me = p["dense_eval"], p["moe_parent_eval"]
    ev = p["evals"]
    kd = up["kd"]
    temps = [f["temperature"] for f in up["router_fit"]]
    overlap = np.mean([f["oracle_overlap"] for f in up["router_fit"]])
    lines = [
        "# MoE: Puzzle's heterogeneous expert removal vs uniform expert pruning (upcycled SmolLM2-135M)", "",
        f"Command: `nice -n 19 env PYTHONPATH=$PWD .venv/bin/python scripts/bench_moe.py` (seed {p['seed']}); "
        f"{p['machine']['cpu_threads']} CPU thread(s) of a shared 2-core machine (load {p['machine']['loadavg_start'][0]:.1f} "
        f"at the start, {p['machine']['loadavg_end'][0]:.1f} at the end), torch {p['machine']['torch']}.", "",
    ]
    if p.get("partial"):
        lines += [f"**Partial results**: the run was stopped (time) before these evaluations existed: "
                  f"{', '.join(p['partial'])}. Rerun the command to finish it (every finished stage is reused).", ""]
    lines += [
        "## The MoE parent: upcycled here, not a real MoE checkpoint", "",
        "No MoE checkpoint is obtainable here (no model hub; the package index's name list, searched for Mixtral / OLMoE / "
        "Qwen-MoE / MoE-GGUF names, shows no package shipping MoE weights), "
        "so the parent is **SmolLM2-135M-Instruct upcycled into a Mixtral-family checkpoint** (Mixtral's attention "
        "is Llama's: no biases, no q/k norm; no sliding window) and trained briefly. Exactly what was done:", "",
        f"1. Each layer's FFN (1536 neurons) split into {up['experts']} experts of {up['expert_size']} by "
        f"{up['clustering']} ({up['fit_tokens']:,} tokens from the train split).",
        f"2. Check: with all {up['experts']} experts chosen, zero router logits (Mixtral renormalises the top-k, "
        f"so each weight is 1/{up['experts']}) and each down_proj scaled by {up['experts']}, the MoE reproduces "
        f"the dense model: max |logit diff| **{up['exact_top_all_max_logit_diff']:.1e}**.",
        f"3. Routed top-{up['top_k']}: down_proj scaled by {up['top_k']} (the chosen experts reproduce their share "
        "of the dense FFN, the others' share is dropped); each layer's router fitted by ridge regression of "
        "log ||expert share|| on the FFN input, its logits scaled by the temperature (0.25 / 0.5 / 1) with the "
        f"least layer-local reconstruction error (chosen: {', '.join(f'{t:g} x{temps.count(t)}' for t in sorted(set(temps)))}); "
        f"the fitted router's top-{up['top_k']} overlaps the {up['top_k']} largest shares on {overlap:.0%} of "
        f"(token, slot) pairs on average. KL to the dense model before training: {up['kl_before_kd']['fitted_router']:.3f} "
        f"(a zero router, ties to the lowest indices: {up['kl_before_kd']['zero_router']:.3f}).",
        f"4. Trained {kd['steps']} steps x {kd['batch_size']} x {s['seq_len']} tokens = {kd['tokens']:,} tokens "
        f"by logit KL to the dense model (all weights but the tied embedding; AdamW lr {kd['lr']:g}, "
        f"warm-up then cosine; {kd['wall_s']:.0f} s). Train KL {kd['log'][0]['kl']:.3f} -> {kd['log'][-1]['kl']:.3f}.", "",
        f"Upcycled parent vs the dense original ({de['validation']['tokens']:,} held-out tokens, "
        f"{next(iter(de['multiple_choice'].values())).get('items', s['mc_items'])}-item 4-way cloze):", "",
        "| model | params | KL to dense | ppl | top-1 agree | cloze acc (norm) |", "|---|---|---|---|---|---|",
    ]
    for name, e in (("dense SmolLM2-135M-Instruct", de), (f"upcycled Mixtral {up['experts']}x{up['expert_size']} top-{up['top_k']}", me)):
        acc, norm = _mc(e)
        lines.append(f"| {name} | {e['params'] / 1e6:.1f}M | {e['validation']['kl']:.3f} | "
                     f"{e['validation']['perplexity']:.2f} | {e['validation']['top1_agreement']:.3f} | {acc:.3f} ({norm:.3f}) |")
    u = p["uniform"]
    sol = p["solution"]
    lines += [
        "", "## Puzzle vs uniform expert pruning at equal predicted speedup", "",
        f"Uniform (Minitron-style): `puzzle prune --experts {u['experts']}` keeps the {u['experts']} "
        f"highest-scoring experts (output-aware router statistic of `puzzle importance`) in every layer, top-{u['top_k']}: "
        f"predicted **{u['predicted_speedup']:.3f}x** on `{BUDGET}` (roofline). Puzzle: solved on `{BUDGET}` at "
        f"that speedup over a space whose only knobs are each MoE layer's experts kept "
        f"(ratios {p['search_space']['ffn']['moe']['expert_ratios']}) and top-k ({p['search_space']['ffn']['moe']['top_k']}); "
        "attention stays the parent's. Both via one `puzzle run` (config in moe.json `pipeline`). Same GKD for both: "
        f"{p['pipeline']['gkd']['steps']} steps x {p['pipeline']['gkd']['batch_size']} x {s['seq_len']} tokens, logit KL "
        "only (the pipeline gives baselines no hidden-state loss, so the Puzzle child gets none either). KL is to the "
        "MoE parent; the cloze task is the run's (built from the run's held-out documents).", "",
        "| model | params | KL before -> after GKD | ppl after | top-1 agree after | cloze acc (norm) after | predicted speedup |",
        "|---|---|---|---|---|---|---|",
        _row("MoE parent", ev["parent"]) if "parent" in ev else "| MoE parent | missing | | | | | |",
    ]
    for name in ("puzzle", "uniform"):
        if name in ev and f"{name}+gkd" in ev:
            lines.append(_row(name, ev[f"{name}+gkd"], ev[name]))
        else:
            lines.append(f"| {name} | missing | | | | | |")
    lines += ["", "Before GKD:", "", "| model | KL | ppl | top-1 agree | cloze acc (norm) |", "|---|---|---|---|---|"]
    for name in ("puzzle", "uniform"):
        if name in ev:
            e = ev[name]
            acc, norm = _mc(e) if e.get("multiple_choice") else (float("nan"), float("nan"))
            lines.append(f"| {name} | {e['validation']['kl']:.3f} | {e['validation']['perplexity']:.2f} | "
                         f"{e['validation']['top1_agreement']:.3f} | {acc:.3f} ({norm:.3f}) |")
    lines += ["", f"Puzzle's child, per layer experts kept/top-k: {', '.join(p['puzzle_child']['layout'])} "
              f"(uniform: {u['experts']}/{u['top_k']} in every layer).",
              f"Solver's predicted speedup {sol.get('predicted', {}).get('speedup', float('nan')):.3f}x.", ""]
    if "puzzle+gkd" in ev and "uniform+gkd" in ev:
        lines += verdict(ev, p)
    if p.get("notes"):
        lines += ["", "## Notes: what was tried and did not work", ""] + [f"- {n}" for n in p["notes"]]
    lines += ["", "## Wall time (s)", "", "| step | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in p["wall_s"].items()]
    lines += ["", "Pipeline stages (ledger):", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in p["stages"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
