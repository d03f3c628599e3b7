"""The pipeline's plan: which stage functions run, in which order, with which arguments."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError


@dataclass(frozen=True)
class Step:
    name: str  # unique, e.g. "solve[1]" or "evaluate:speedup_1.5/gkd"
    fn: str  # key into pipeline._stage_functions()
    args: dict[str, Any]  # from the config (hashed into the ledger)
    common: dict[str, Any] = field(default_factory=dict)  # run_dir / parent / search space, passed if accepted


def _one(cfg: Any, stage: str) -> dict[str, Any] | None:
    items = cfg.sections.get(stage)
    if items is None:
        return None
    if len(items) != 1:
        raise PuzzleError(f"config section '{stage}' takes one mapping of arguments, got {len(items)}")
    return dict(items[0])


def converts_parent(cfg: Any) -> bool:
    """`convert_parent: auto` converts GGUF parents only: dequantising a GGUF takes tens of seconds on a CPU
    and nearly every stage loads the parent, while safetensors load in a moment."""
    return cfg.convert_parent is True or (cfg.convert_parent == "auto" and cfg.parent.suffix == ".gguf")


def plan(cfg: Any) -> list[Step]:
    run = cfg.run_dir
    steps: list[Step] = []
    parent = cfg.parent
    if converts_parent(cfg):
        # once, into the run: an all-parent child in safetensors, the parent's exact logits (a test holds
        # that), which every later stage loads instead of the original file
        parent = run / "parent"
        steps.append(Step("convert_parent", "convert", {}, {"parent": cfg.parent, "out": parent}))
    common = {"run_dir": run, "parent": parent, "search_space": cfg.search_space}
    prep = _one(cfg, "prepare_data") or {}
    steps.append(Step("prepare_data", "prepare_data", prep, {**common, "corpus": cfg.corpus}))
    if (args := _one(cfg, "importance")) is not None:
        steps.append(Step("importance", "importance", args, common))
    steps.append(Step("build_library", "build_library", _one(cfg, "build_library") or {}, common))
    steps.append(Step("score", "score", _one(cfg, "score") or {}, common))
    for i, args in enumerate(cfg.sections.get("profile", [{}])):
        steps.append(Step(f"profile[{args.get('budget', i)}]", "profile", args, common))
    solves = cfg.sections.get("solve", [])
    for i, args in enumerate(solves):
        label = args.get("name") or ("sweep" if "sweep" in args else i)
        steps.append(Step(f"solve[{label}]", "solve", args, {"run_dir": run}))
    children = []
    for args in cfg.sections.get("realize", []):
        if "solution" not in args:
            raise PuzzleError("each 'realize' entry needs a 'solution' (a solve entry's name)")
        children.append(args["solution"])
        steps.append(Step(f"realize[{args['solution']}]", "realize", args, {"run_dir": run, "parent": parent}))
    gkd = _one(cfg, "gkd")
    # (name, model, evaluate overrides): a student's speed is measured once, after GKD, which changes no shape
    evaluated: list[tuple[str, Path, dict]] = [("parent", parent, {})]
    unmeasured = {"measure": False} if gkd is not None else {}
    for name in children:
        child = run / "children" / name
        evaluated.append((name, child, unmeasured))
        if gkd is not None:
            out = child / "gkd"
            args = {"hidden_loss": "cosine", **gkd, "out": str(out)}
            steps.append(Step(f"gkd[{name}]", "distill", args, {"run_dir": run, "teacher": parent, "student": child}))
            evaluated.append((f"{name}+gkd", out / "model", {}))
    for args in cfg.sections.get("baselines", []):
        args = dict(args)
        name = args.pop("name", None)
        if not name:
            raise PuzzleError("each 'baselines' entry needs a 'name'")
        out = run / "baselines" / name
        steps.append(Step(f"prune[{name}]", "prune", {**args, "out": str(out)}, {"run_dir": run, "parent": parent}))
        evaluated.append((name, out, unmeasured))
        if gkd is not None:
            dist = {"hidden_loss": "none", **{k: v for k, v in gkd.items() if k != "hidden_loss"}, "out": str(out / "gkd")}
            steps.append(Step(f"gkd[{name}]", "distill", dist, {"run_dir": run, "teacher": parent, "student": out}))
            evaluated.append((f"{name}+gkd", out / "gkd" / "model", {}))
    ev = _one(cfg, "evaluate")
    if ev is not None:
        mc_items = ev.pop("mc_items", 0)
        if mc_items:
            steps.append(Step("mc_tasks", "build_mc", {"items": mc_items}, {"run_dir": run}))
            ev.setdefault("mc_tasks", [str(run / "eval" / "cloze.jsonl")])
        for name, path, overrides in evaluated:
            steps.append(Step(f"evaluate[{name}]", "evaluate", {**overrides, **ev, "name": name},
                              {"run_dir": run, "model": path, "parent": parent}))
    steps.append(Step("report", "report", _one(cfg, "report") or {}, {"run_dir": run}))
    return steps
