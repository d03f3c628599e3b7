"""lm-evaluation-harness, when installed, on an in-memory model (local task YAMLs or installed tasks).

lm_eval is optional: nothing else in puzzle needs it, and this module is imported only on request.
"""

from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], batch_size: int = 4, limit: int | None = None) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PuzzleError("lm-evaluation-harness is not installed (pip install lm_eval)") from None
    yaml_dirs = sorted({str(Path(t).parent) for t in tasks if t.endswith((".yaml", ".yml"))})
    names = [Path(t).stem if t.endswith((".yaml", ".yml")) else t for t in tasks]
    manager = TaskManager(include_path=yaml_dirs or None)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                  tasks=names, task_manager=manager, limit=limit)
    return out["results"]
