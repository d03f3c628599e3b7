"""lm-evaluation-harness, when installed, on an in-memory model.

Tasks are lm-eval task names, local lm-eval task YAMLs, or this project's multiple-choice JSONL files
({"context", "choices", "label"}), for which a task YAML is written on the fly: the same items then get
scored by lm-eval's own loglikelihood code, an independent check of `puzzle.evaluate.mc`.

lm_eval is optional: nothing else in puzzle needs it, and this module is imported only on request.
Hub access is off unless the user turns it on (HF_DATASETS_OFFLINE=0): local tasks need none, and
nothing here may download a data set behind the user's back.
"""

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError

# `target_delimiter: ""`: our choices carry their own leading space; lm-eval would add another.
_JSONL_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""


def jsonl_task_yaml(jsonl: Path, out_dir: Path) -> str:
    """Write an lm-eval task YAML for one of our MC JSONL files; returns its task name."""
    from puzzle.evaluate.mc import load_mc_tasks

    load_mc_tasks(jsonl)  # one clear error for a bad file, before lm-eval's own
    name = "puzzle_" + re.sub(r"\W", "_", jsonl.stem)
    (out_dir / f"{name}.yaml").write_text(_JSONL_TASK.format(name=name, path=jsonl.resolve()))
    return name


def yaml_task_name(path: Path) -> str:
    """The `task:` of a local task YAML (read as text: lm-eval YAMLs may hold `!function` tags that a
    safe YAML loader refuses)."""
    if not path.exists():
        raise PuzzleError(f"lm-eval task file not found: {path}")
    for line in path.read_text().splitlines():
        if m := re.match(r"task:\s*['\"]?([^'\"#\s]+)", line):
            return m.group(1)
    raise PuzzleError(f"{path}: no 'task:' name in this lm-eval task file")


def _metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's {"acc,none": x, "acc_stderr,none": s, "alias": ...} -> {"acc": x, "acc_stderr": s}."""
    out = {}
    for task, values in results.items():
        out[task] = {key.split(",")[0]: v for key, v in values.items() if isinstance(v, (int, float)) and "," in key}
    return out


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], batch_size: int = 4, limit: int | None = None) -> dict:
    """Run lm-eval tasks on `model`; returns {task: {metric: value}}."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PuzzleError("lm-evaluation-harness is not installed (pip install lm_eval)") from None
    with tempfile.TemporaryDirectory(prefix="puzzle_lm_eval_") as generated:
        names, include = [], {generated}
        for task in tasks:
            path = Path(task)
            if task.endswith(".jsonl"):
                names.append(jsonl_task_yaml(path, Path(generated)))
            elif task.endswith((".yaml", ".yml")):
                names.append(yaml_task_name(path))
                include.add(str(path.resolve().parent))
            else:
                names.append(task)
        manager = TaskManager(include_path=sorted(include))
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise PuzzleError(f"unknown lm-eval task(s) {unknown}: give an installed task name, a task YAML or a .jsonl file")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit)
    return _metrics(out["results"])
