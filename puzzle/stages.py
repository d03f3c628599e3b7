"""The stage registry: every command of the CLI and every stage `puzzle run` plans, in one table.

An entry names its function lazily ("module:function"), so `puzzle --help` answers without importing
torch. The function's signature is the interface: its parameters are the CLI flags and the keys of its
pipeline config section, its defaults are both's defaults.

Adding a stage: write the function, add one `Stage` here. It becomes the command `name` (underscores as
dashes); with a `section`, a pipeline config section of that name runs it (once, or once per mapping when
`many`) in registry order, passing the run's common arguments (run_dir, parent, search_space, corpus) it
accepts. Stages that fan out over models (realize, gkd, baselines, evaluate) are planned in
`pipeline_stages.py`. Its `cost` names its estimate beside it (puzzle/<package>/cost.py, on the
vocabulary of puzzle/footprint.py): `puzzle plan` prices each step with it (`Stage.estimate`).
"""

import importlib
import inspect
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, TypeVar

from puzzle.errors import PuzzleError
from puzzle.footprint import Context, Estimate, stage_settings


@dataclass(frozen=True)
class Stage:
    name: str  # the function's name; also the ledger's and the planner's key
    target: str  # "module:function", imported on first use
    summary: str  # one line for `puzzle --help`
    section: str | None = None  # the pipeline config section that runs it (None: not planned from a section)
    always: bool = False  # planned with its defaults when the config has no section for it
    many: bool = False  # the section may be a list of mappings, one step each
    command: bool = True  # a CLI command
    cost: str | None = None  # "module:function" of its estimate, f(Context, settings) -> Estimate; None: not modelled

    @property
    def command_name(self) -> str:
        return self.name.replace("_", "-")

    def load(self) -> Callable[..., Any]:
        return _load(self.target)

    def estimator(self) -> Callable[[Context, Any], Estimate] | None:
        """The stage's cost model (None when it does no model-sized work)."""
        return _load(self.cost) if self.cost else None

    def estimate(self, ctx: Context, args: dict[str, Any]) -> Estimate | None:
        """The stage's estimate for these arguments over its function's defaults (`stage_settings`)."""
        fn = self.estimator()
        return fn(ctx, stage_settings(self.load(), args)) if fn else None


def _load(target: str) -> Any:
    module_name, fn_name = target.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


# Pipeline order (DESIGN.md); the CLI lists commands in this order.
STAGES: tuple[Stage, ...] = (
    Stage("convert", "puzzle.model.convert:convert",
          "load a parent (HF dir, safetensors or GGUF) and write it as an all-parent heterogeneous child",
          cost="puzzle.model.cost:convert_cost"),
    Stage("prepare_data", "puzzle.data.prepare:prepare_data",
          "tokenise a corpus into packed train/validation blocks in the run directory",
          section="prepare_data", always=True, cost="puzzle.data.cost:prepare_data_cost"),
    Stage("correct_teacher", "puzzle.distill.correct:correct_teacher",
          "teacher correction: fine-tune the parent on the run's data (LM loss); later stages use it",
          section="teacher_correction", cost="puzzle.distill.cost:correct_teacher_cost"),
    Stage("importance", "puzzle.pruning.commands:importance",
          "Minitron activation importance of heads, neurons, channels, layers and MoE experts (forward only)",
          section="importance", cost="puzzle.pruning.cost:importance_cost"),
    Stage("build_library", "puzzle.library.commands:build_library",
          "block library: pruned initialisation + blockwise local distillation on Ray",
          section="build_library", always=True, cost="puzzle.library.cost:build_library_cost"),
    Stage("score", "puzzle.scoring.commands:score",
          "replace-1-block quality of every library variant (KL, LM loss, agreement)", section="score", always=True,
          cost="puzzle.scoring.cost:score_cost"),
    Stage("profile", "puzzle.profiling.commands:profile",
          "latency and memory of every variant on a hardware profile", section="profile", always=True, many=True,
          cost="puzzle.profiling.cost:profile_cost"),
    Stage("solve", "puzzle.solver.commands:solve",
          "MIP: one attention and one FFN variant per layer under a hardware budget", section="solve", many=True,
          cost="puzzle.solver.cost:solve_cost"),
    Stage("realize", "puzzle.realize.commands:realize",
          "assemble a child checkpoint from a solution and the library", section="realize", many=True,
          cost="puzzle.realize.cost:realize_cost"),
    Stage("distill", "puzzle.distill.commands:distill",
          "knowledge distillation of a student from a teacher (Minitron retraining, Puzzle GKD)", section="gkd",
          cost="puzzle.distill.cost:distill_cost"),
    Stage("prune", "puzzle.pruning.commands:prune",
          "Minitron width/depth/expert pruning to a plain checkpoint of the parent's family", section="baselines", many=True,
          cost="puzzle.pruning.cost:prune_cost"),
    Stage("build_mc", "puzzle.evaluate.mc:build_mc",
          "a 4-way cloze task from the run's held-out documents", command=False),
    Stage("evaluate", "puzzle.evaluate.commands:evaluate",
          "perplexity, KL, agreement, multiple choice and throughput of a model", section="evaluate",
          cost="puzzle.evaluate.cost:evaluate_cost"),
    Stage("report", "puzzle.report.commands:report",
          "report.md and pareto.png for a run directory", section="report", always=True),
    Stage("export", "puzzle.export.commands:export",
          "write a child (or a parent) for an inference engine: GGUF (llama.cpp), nemotron-nas or anymodel"),
    Stage("serve_check", "puzzle.serve.commands:serve_check",
          "serve a child in vLLM, llama.cpp or transformers here: loads, greedy agreement with transformers, tokens/s"),
    Stage("plan", "puzzle.plan:plan",
          "dry run: per-stage peak memory, disk, FLOPs and time of a pipeline config, from the parent's config alone"),
    Stage("run", "puzzle.pipeline:run", "every stage in order from a YAML config, each resumable"),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
COMMANDS: dict[str, Stage] = {s.command_name: s for s in STAGES if s.command}
SECTIONS: tuple[str, ...] = tuple(s.section for s in STAGES if s.section)


# Argument names with one meaning in every stage that takes them, and the values that meaning allows:
# `check_values` holds a config to them before any stage runs (`puzzle run --check`). Each stage function
# checks its own arguments again when called directly. A value of another type is left to the type check.
POSITIVE = frozenset({
    "batch_size", "blocks", "calibration_tokens", "checkpoint_every", "chunk_tokens", "eval_tokens", "ffn_size",
    "grad_accum", "heads_per_group", "hidden_size", "items", "keep_checkpoints", "kv_groups", "latency_ms", "lr", "max_tokens",
    "memory_gib", "n_samples", "nproc", "num_solutions", "repeats", "seq_len", "speedup", "steps", "temperature",
    "throughput", "time_limit_s", "tokens_per_block", "val_blocks", "val_every",
    "batch_sizes", "block_sizes",  # lists: every element
})
NON_NEGATIVE = frozenset({
    "diversity", "drop_layers", "drop_samples", "hidden_weight", "kl_weight", "lm_weight", "max_retries", "min_lr",
    "seed", "threads", "warmup_steps", "weight_decay", "workers",
    "layers",  # a list of layer indices
})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def value_problem(name: str, value: Any) -> str | None:
    """What is wrong with argument `name`'s value ("must be a positive number, got 0"), or None. Every
    number must be finite (an `inf` budget or bandwidth turns every estimate into nonsense, silently); the
    names in POSITIVE / NON_NEGATIVE must also be > 0 / >= 0, element-wise for lists."""
    values = value if isinstance(value, list) else [value]
    if not all(_number(v) for v in values):
        return None
    if not all(math.isfinite(v) for v in values):
        return f"must be {'finite numbers' if isinstance(value, list) else 'a finite number'}, got {value}"
    if name not in POSITIVE and name not in NON_NEGATIVE:
        return None
    positive = name in POSITIVE
    if all(v > 0 if positive else v >= 0 for v in values):
        return None
    what = "must be a positive number" if positive else "must not be negative"
    if isinstance(value, list):
        what = "must be positive numbers" if positive else "must not be negative"
    return f"{what}, got {value}"


def check_values(args: dict[str, Any], where: str) -> None:
    """One line for the first argument in `args` of a config section whose value is wrong (`value_problem`)."""
    for name, value in args.items():
        problem = value_problem(name, value)
        if problem is not None:
            raise PuzzleError(f"config section '{where}': {name} {problem}")


def stage_functions() -> dict[str, Callable[..., Any]]:
    """Every pipeline-usable stage function by name (imports them all: torch)."""
    return {s.name: s.load() for s in STAGES if s.name not in ("run", "plan")}  # commands that run stages


def accepted(fn: Callable[..., Any], values: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` that `fn` takes as arguments."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in values.items() if k in params}


S = TypeVar("S")


def settings_of(cls: type[S], arguments: dict[str, Any], **resolved: Any) -> S:
    """A stage's settings dataclass (`DistillConfig`, `BLDSettings`) from the stage function's arguments:
    each field the function takes comes from its argument, `resolved` ones (a parsed layer map, a resolved
    device) are given, the rest keep the dataclass's defaults. The function's defaults for those arguments
    are the dataclass's own (`steps: int = DistillConfig.steps`), so a default is stated once;
    tests/test_stages.py holds every such pair to it."""
    given = {f.name: arguments[f.name] for f in fields(cls) if f.name in arguments}
    return cls(**{**given, **resolved})
