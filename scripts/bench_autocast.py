"""bf16 autocast on the CPU: is a BLD / GKD training step faster than in fp32 here, and how far off is it?

Three matmul-heavy steps at SmolLM2-135M's sizes (hidden 576, FFN 1536, 9 query / 3 KV heads, vocab 49152),
each as the trainers run it: fp32 trainable weights and AdamW state, the forward under
`Runtime.autocast()` (puzzle/device.py), the backward and the step outside it; what is only read (the GKD
teacher, the BLD parent layer) held in the run's dtype, as `--dtype bf16` holds it.
  linear  y = x W^T of (tokens, 576) x (1536, 576): fp32, bf16 tensors, fp32 weights under autocast;
  bld     one decoder layer trained to a frozen copy's output, normalised MSE (library/bld.py's loss);
  gkd     a 4-layer student distilled from a 4-layer teacher, KL on the logits (metrics.kd_terms).
Each repeat times fp32 and then bf16 on the same inputs; the times are this process's CPU seconds (one
thread: the step's compute, not the waits for a core of a shared machine), the table gives medians and the
median of the per-repeat ratios. Exactness: the loss and the gradients of the bf16 step
against fp32's at the same weights, and the loss after `--train-steps` steps from the same start.
Writes benchmarks/autocast.{json,md}.

    nice -n 19 .venv/bin/python scripts/bench_autocast.py [--repeats 9 --tokens 512 --threads 1]
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from puzzle.device import Runtime, place  # noqa: E402
from puzzle.io import atomic_write_json, atomic_write_text  # noqa: E402
from puzzle.metrics import kd_terms  # noqa: E402
from puzzle.model.checkpoint import to_puzzle  # noqa: E402

CPU = torch.device("cpu")
MODES = {"fp32": Runtime(CPU, "fp32"), "bf16": Runtime(CPU, "bf16")}


def cpu_flags() -> list[str]:
    """The native bf16 matmul flags of this CPU (/proc/cpuinfo): avx512_bf16, amx_bf16."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f"))


def smollm_config(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): with one thread the CPU time is the step's compute,
    whatever share of a core the shared machine gave it meanwhile."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


class Linear:
    """y = x W^T; the bf16 side: bf16 tensors (`pure`) or fp32 weights under autocast (what training does)."""

    def __init__(self, tokens: int, autocast: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(tokens, 576, generator=g)
        self.w = torch.randn(1536, 576, generator=g) / 24
        self.autocast = autocast

    def step(self, mode: str) -> torch.Tensor:
        if mode == "fp32":
            return self.x @ self.w.T
        if self.autocast:
            with MODES["bf16"].autocast():
                return self.x @ self.w.T
        return self.x.bfloat16() @ self.w.bfloat16().T  # casts included: a bf16 model holds them cast once

    def loss_and_grads(self, mode: str):
        return self.step(mode).float().square().mean(), []


class Trainer:
    """One training set-up per mode from the same weights: a student (fp32 weights, AdamW) and a frozen
    reference held in the mode's dtype."""

    def __init__(self, kind: str, tokens: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.kind = kind
        model = to_puzzle(LlamaForCausalLM(smollm_config(1 if kind == "bld" else 4)).eval())
        ref = copy.deepcopy(model)
        with torch.no_grad():  # a student that is not already the teacher
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        g = torch.Generator().manual_seed(seed)
        T = 128
        self.ids = torch.randint(0, 49152, (max(1, tokens // T), T), generator=g)
        self.h = torch.randn(max(1, tokens // T), T, 576, generator=g)
        self.students = {m: copy.deepcopy(model).train() for m in MODES}
        self.refs = {m: place(copy.deepcopy(ref), CPU, MODES[m].dtype).requires_grad_(False) for m in MODES}
        self.opts = {m: torch.optim.AdamW(self.students[m].parameters(), lr=1e-4, foreach=True) for m in MODES}

    def loss(self, mode: str) -> torch.Tensor:
        runtime, student, ref = MODES[mode], self.students[mode], self.refs[mode]
        if self.kind == "bld":  # library/bld.py: the layer's output against the parent layer's, normalised MSE
            pos = student.model.rotary_emb(self.h, torch.arange(self.h.shape[1])[None])
            with torch.no_grad():
                target = ref.model.layers[0](self.h.to(MODES[mode].dtype), tuple(p.to(MODES[mode].dtype) for p in pos))
            with runtime.autocast():
                out = student.model.layers[0](self.h, pos)
            return F.mse_loss(out.float(), target.float()) / target.float().var()
        with torch.no_grad(), runtime.autocast():
            t_h = ref.model(input_ids=self.ids, use_cache=False).last_hidden_state
        with runtime.autocast():
            s_h = student.model(input_ids=self.ids, use_cache=False).last_hidden_state
            terms = kd_terms(s_h, t_h, student.lm_head, ref.lm_head, self.ids)
        return terms.kl / self.ids.numel()

    def step(self, mode: str) -> float:
        loss = self.loss(mode)
        loss.backward()
        self.opts[mode].step()
        self.opts[mode].zero_grad(set_to_none=True)
        return loss.item()

    def loss_and_grads(self, mode: str):
        loss = self.loss(mode)
        loss.backward()
        grads = [p.grad.detach().clone() for p in self.students[mode].parameters() if p.grad is not None]
        self.opts[mode].zero_grad(set_to_none=True)
        return loss.detach(), grads


def exactness(make) -> dict:
    """bf16 against fp32 at the same weights: the loss's relative difference, the gradients' (all tensors
    as one vector) relative L2 error and cosine."""
    bench = make()
    (l32, g32), (l16, g16) = bench.loss_and_grads("fp32"), bench.loss_and_grads("bf16")
    out = {"loss_fp32": float(l32), "loss_bf16": float(l16), "loss_rel_diff": abs(float(l16 - l32)) / abs(float(l32))}
    if g32:
        a, b = (torch.cat([g.flatten() for g in gs]).double() for gs in (g32, g16))
        out["grad_rel_l2"] = float((b - a).norm() / a.norm())
        out["grad_cosine"] = float(F.cosine_similarity(a, b, dim=0))
    return out


def speed(bench, repeats: int, warmup: int) -> dict:
    """Medians of CPU and wall time per mode, and the median of the per-repeat CPU-time ratios."""
    for _ in range(warmup):
        bench.step("fp32"), bench.step("bf16")
    wall, cpu = {m: [] for m in MODES}, {m: [] for m in MODES}
    for _ in range(repeats):
        for m in MODES:
            w, c = timed(lambda: bench.step(m))
            wall[m].append(w)
            cpu[m].append(c)
    ratios = [a / b for a, b in zip(cpu["fp32"], cpu["bf16"])]
    return {"fp32_s": statistics.median(cpu["fp32"]), "bf16_s": statistics.median(cpu["bf16"]),
            "fp32_wall_s": statistics.median(wall["fp32"]), "bf16_wall_s": statistics.median(wall["bf16"]),
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "cpu_s": cpu, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step (sequences of 128)")
    ap.add_argument("--train-steps", type=int, default=20, help="steps of the drift check")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks")
    ap.add_argument("--report-only", action="store_true", help="re-render autocast.md from autocast.json")
    args = ap.parse_args()
    if args.report_only:
        report = json.loads((args.out / "autocast.json").read_text())
        atomic_write_text(args.out / "autocast.md", markdown(report))
        print(markdown(report))
        return
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    results = {}
    for name, make in (("linear (bf16 tensors)", lambda: Linear(args.tokens * 4, autocast=False)),
                       ("linear (autocast)", lambda: Linear(args.tokens * 4, autocast=True)),
                       ("bld layer step", lambda: Trainer("bld", args.tokens)),
                       ("gkd step", lambda: Trainer("gkd", args.tokens))):
        print(f"{name} ...", flush=True)
        results[name] = {**speed(make(), args.repeats, args.warmup), **exactness(make)}
    drift = {}
    for kind in ("bld", "gkd"):
        bench = Trainer(kind, args.tokens)
        losses = {m: [bench.step(m) for _ in range(args.train_steps)] for m in MODES}
        drift[kind] = {"fp32": losses["fp32"][-1], "bf16": losses["bf16"][-1],
                       "rel_diff": abs(losses["bf16"][-1] - losses["fp32"][-1]) / abs(losses["fp32"][-1]),
                       "curve_fp32": losses["fp32"], "curve_bf16": losses["bf16"]}
    report = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "cpu_flags": cpu_flags(), "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results, "drift": drift,
    }
    atomic_write_json(args.out / "autocast.json", report)
    atomic_write_text(args.out / "autocast.md", markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    lines = [
        "# bf16 autocast on the CPU: BLD and GKD steps, fp32 vs bf16",
        "",
        f"Generated by `scripts/bench_autocast.py`; torch {m['torch']}, {m['threads']} thread(s), CPU flags "
        f"{', '.join(m['cpu_flags']) or 'none'} (oneDNN bf16: {m['mkldnn_bf16']}); load average "
        f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end (a shared machine: "
        "each repeat times both modes back to back). SmolLM2-135M's sizes, "
        f"{s['tokens']} tokens a step (the linear rows: {4 * s['tokens']}), {s['repeats']} repeats.",
        "",
        "Times are CPU seconds of this process per step (one thread: the step's compute, whatever share of a "
        "core the shared machine gave it); wall-clock medians in brackets.",
        "",
        "| step | fp32 (median) | bf16 (median) | speedup (median of repeats) | range | loss rel. diff | grad rel. L2 error | grad cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, x in r["results"].items():
        grads = (f"{x['grad_rel_l2']:.2e} | {x['grad_cosine']:.5f}" if "grad_rel_l2" in x else "- | -")
        lines.append(f"| {name} | {x['fp32_s'] * 1e3:.1f} ms ({x['fp32_wall_s'] * 1e3:.0f}) | "
                     f"{x['bf16_s'] * 1e3:.1f} ms ({x['bf16_wall_s'] * 1e3:.0f}) | {x['speedup']:.2f}x | "
                     f"{x['speedup_min']:.2f}-{x['speedup_max']:.2f}x | {x['loss_rel_diff']:.2e} | {grads} |")
    lines += ["", f"Drift: the loss after {s['train_steps']} AdamW steps (lr 1e-4) from the same weights on the same batch:", ""]
    for kind, d in r["drift"].items():
        lines.append(f"- {kind}: fp32 {d['fp32']:.5f}, bf16 {d['bf16']:.5f} (relative difference {d['rel_diff']:.2e})")
    res = r["results"]
    bld, gkd = res["bld layer step"], res["gkd step"]
    lines += [
        "",
        "## Reading",
        "",
        f"On this CPU bf16 autocast is faster for every step: {res['linear (autocast)']['speedup']:.2f}x for the bare "
        f"linear, {bld['speedup']:.2f}x for a BLD layer step, {gkd['speedup']:.2f}x for the GKD step (a 4-layer "
        "student, so its fp32 parts, the 49,152-way log-softmax and KL of `kd_terms`, weigh more than in a "
        "30-layer one, whose step should fall between the two). The price: the loss within "
        f"{max(bld['loss_rel_diff'], gkd['loss_rel_diff']):.1e} relative, the gradients within "
        f"{max(bld['grad_rel_l2'], gkd['grad_rel_l2']):.1%} (L2) of fp32's at the same weights, and after "
        f"{r['settings']['train_steps']} steps the losses within "
        f"{max(d['rel_diff'] for d in r['drift'].values()):.1e} of each other; the weights and AdamW state stay fp32.",
        "",
        "`--dtype bf16` gives this today on the CPU (build-library, distill). `--dtype auto` still resolves to fp32 "
        "on the CPU (puzzle/device.py): switching it for BLD and GKD also holds the BLD parent and the GKD teacher in "
        "bf16, puts the dtype in BLD's digest and GKD's checkpoint settings (a GKD run checkpointed in fp32 no longer "
        "matches them: `check_resumable`), and "
        "changes the precision of every CPU training test on such a machine; issue 27 asks each such change to be "
        "measured as a quality ablation at equal wall time (benchmarks/quality.md) first.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
