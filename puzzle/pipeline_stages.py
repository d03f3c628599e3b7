"""The pipeline's plan: which stage functions run, in which order, with which arguments.

Sections are planned in the registry's order (`puzzle/stages.py`). A plain section becomes one step per
mapping, its arguments exactly the config's; the stages that fan out over models have a planner here:
`realize` (one child per solution), `gkd` (distill each child into CHILD/gkd), `baselines` (prune, then
distill like the children) and `evaluate` (every model, plus the MC task file). No planner sets a stage
default: a default lives in the function's signature, a pipeline's own choice in its config.

Pipeline choices made here, not by defaults:
- a baseline's GKD is distill on logits only: the `gkd` section's `hidden_loss` applies to the children
  (same widths as the teacher), not to pruned baselines (other widths);
- a model that is distilled is timed once, after GKD (`measure: false` before; GKD changes no shape);
- `evaluate: {mc_items: N}` builds the cloze task (`build_mc`) and evaluates every model on it;
- `teacher_correction:` (puzzle correct-teacher, right after prepare-data) makes the corrected parent
  (R/teacher/model) the parent of every later step: importance, the library, scoring, the baselines' pruning,
  GKD's teacher and evaluate's reference. The original parent is evaluated too, as `parent_original`
  (against the corrected one, not timed: it has the corrected parent's shapes), so the report shows both.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from puzzle.errors import PuzzleError
from puzzle.run_dir import PARENT_ORIGINAL as ORIGINAL, RunDir
from puzzle.stages import STAGES, Stage, accepted


@dataclass(frozen=True)
class Step:
    name: str  # unique, e.g. "solve[speedup_1.5]" or "evaluate[speedup_1.5+gkd]"; the ledger's key
    fn: str  # a stage name in the registry (puzzle/stages.py)
    args: dict[str, Any]  # from the config (hashed into the ledger)
    common: dict[str, Any] = field(default_factory=dict)  # run_dir / parent / models ..., those the function takes


@dataclass
class _Plan:
    cfg: Any
    run: RunDir
    parent: Path  # the parent every stage loads (the converted one when converting; the corrected one after teacher correction)
    fns: dict[str, Callable[..., Any]]
    original: Path | None = None  # the parent before teacher correction (None: no correction)
    steps: list[Step] = field(default_factory=list)
    models: list[tuple[str, Path]] = field(default_factory=list)  # realised children, then baselines
    distilled: dict[str, Path] = field(default_factory=dict)  # model name -> its model after GKD

    @property
    def common(self) -> dict[str, Any]:
        return {"run_dir": self.cfg.run_dir, "parent": self.parent, "search_space": self.cfg.search_space,
                "corpus": self.cfg.corpus}

    def add(self, name: str, fn: str, args: dict[str, Any], common: dict[str, Any]) -> None:
        """A step, passing only the common values its function takes (so the ledger hashes only those)."""
        self.steps.append(Step(name, fn, args, accepted(self.fns[fn], common)))


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


def _label(args: dict[str, Any], index: int, used: set[str]) -> str:
    """A list entry's name in its step: its `name`, "sweep", its `budget`, else its index."""
    label = str(args.get("name") or ("sweep" if "sweep" in args else args.get("budget", index)))
    return label if label not in used else str(index)


def _plan_section(p: _Plan, stage: Stage) -> None:
    """A plain section: one step per mapping, with the config's arguments."""
    if not stage.many:
        args = _one(p.cfg, stage.section)
        if args is not None or stage.always:
            p.add(stage.section, stage.name, args or {}, p.common)
        return
    used: set[str] = set()
    for i, args in enumerate(p.cfg.sections.get(stage.section, [{}] if stage.always else [])):
        label = _label(args, i, used)
        used.add(label)
        p.add(f"{stage.section}[{label}]", stage.name, args, p.common)


def _plan_teacher_correction(p: _Plan, stage: Stage) -> None:
    """correct-teacher on the parent; from here on the corrected parent is every step's parent."""
    args = _one(p.cfg, "teacher_correction")
    if args is None:
        return
    p.add("teacher_correction", stage.name, args, p.common)
    p.original, p.parent = p.parent, p.run.teacher_model


def _plan_realize(p: _Plan, stage: Stage) -> None:
    for args in p.cfg.sections.get("realize", []):
        if "solution" not in args:
            raise PuzzleError("each 'realize' entry needs a 'solution' (a solve entry's name)")
        name = args["solution"]
        p.add(f"realize[{name}]", stage.name, args, p.common)
        p.models.append((name, p.run.child(name)))


def _distill(p: _Plan, name: str, student: Path, args: dict[str, Any]) -> None:
    out = RunDir.gkd_dir(student)
    p.add(f"gkd[{name}]", "distill", {**args, "out": str(out)}, {**p.common, "teacher": p.parent, "student": student})
    p.distilled[name] = RunDir.distilled_model(out)


def _plan_gkd(p: _Plan, stage: Stage) -> None:
    gkd = _one(p.cfg, "gkd")
    if gkd is not None:
        for name, child in list(p.models):
            _distill(p, name, child, gkd)


def _plan_baselines(p: _Plan, stage: Stage) -> None:
    gkd = _one(p.cfg, "gkd")
    for args in p.cfg.sections.get("baselines", []):
        args = dict(args)
        name = args.pop("name", None)
        if not name:
            raise PuzzleError("each 'baselines' entry needs a 'name'")
        out = p.run.baseline(name)
        p.add(f"prune[{name}]", stage.name, {**args, "out": str(out)}, p.common)
        p.models.append((name, out))
        if gkd is not None:  # on logits only: see the module docstring
            _distill(p, name, out, {k: v for k, v in gkd.items() if k != "hidden_loss"})


def _plan_evaluate(p: _Plan, stage: Stage) -> None:
    ev = _one(p.cfg, "evaluate")
    if ev is None:
        return
    mc_items = ev.pop("mc_items", 0)
    if mc_items:
        p.add("mc_tasks", "build_mc", {"items": mc_items}, p.common)
        ev.setdefault("mc_tasks", [str(p.run.mc_tasks)])
    # (name, model, evaluate overrides): a student's speed is measured once, after GKD, which changes no shape
    evaluated: list[tuple[str, Path, dict]] = [("parent", p.parent, {})]
    if p.original is not None:  # the parent before teacher correction, against the corrected one
        evaluated.append((ORIGINAL, p.original, {"measure": False}))
    for name, model in p.models:
        evaluated.append((name, model, {"measure": False} if name in p.distilled else {}))
        if name in p.distilled:
            evaluated.append((RunDir.gkd_name(name), p.distilled[name], {}))
    for name, model, overrides in evaluated:
        p.add(f"evaluate[{name}]", stage.name, {**overrides, **ev, "name": name}, {**p.common, "model": model})


PLANNERS = {"teacher_correction": _plan_teacher_correction, "realize": _plan_realize, "gkd": _plan_gkd, "baselines": _plan_baselines, "evaluate": _plan_evaluate}


def plan(cfg: Any, fns: dict[str, Callable[..., Any]] | None = None) -> list[Step]:
    """Every step of a config, in order (`fns`: the registry's functions, loaded when not given)."""
    if fns is None:
        from puzzle.stages import stage_functions

        fns = stage_functions()
    run = RunDir(cfg.run_dir)
    p = _Plan(cfg, run, run.converted_parent if converts_parent(cfg) else cfg.parent, fns)
    if converts_parent(cfg):
        # once, into the run: an all-parent child in safetensors, the parent's exact logits (a test holds
        # that), which every later stage loads instead of the original file
        p.add("convert_parent", "convert", {}, {"parent": cfg.parent, "out": p.parent})
    for stage in STAGES:
        if stage.section:
            PLANNERS.get(stage.section, _plan_section)(p, stage)
    return p.steps
