"""`puzzle realize`: build the child checkpoint of a solution from the block library."""

import hashlib
import json
from pathlib import Path

from puzzle.errors import PuzzleError
from puzzle.io import read_json
from puzzle.model import parse_block_configs
from puzzle.model.checkpoint import load_model, load_tokenizer, save_model, to_puzzle
from puzzle.run_dir import RunDir, writes_run_dir

from .assemble import architecture_table, assemble_child, table_markdown


@writes_run_dir("realize")
def realize(run_dir: Path = Path("runs/default"), solution: str | None = None, out: Path | None = None,
            parent: Path | None = None) -> Path:
    """Assemble the child of a solution from the block library and save it as a checkpoint.

    Args:
        run_dir: the run directory (holds the library and the solutions)
        solution: a solution name under run_dir/solutions/ or a path to a solution .json (default: the best
            one the last `puzzle solve` wrote, else the run's only solution)
        out: where to write the child (default: run_dir/children/SOLUTION)
        parent: the parent model (default: the one recorded in the run directory)
    """
    from puzzle.library.store import variant_state

    run = RunDir(run_dir)
    src = run.find_solution(solution)
    payload = read_json(src)
    if "block_configs" not in payload:
        raise PuzzleError(f"{src}: not a solution file (no 'block_configs')")
    out = Path(out) if out is not None else run.child(src.stem)
    digest = hashlib.sha256(json.dumps(payload["block_configs"], sort_keys=True).encode()).hexdigest()
    done = out / "realized.json"
    if done.exists() and read_json(done).get("block_configs_sha256") == digest:
        print(f"{out} already holds this solution; nothing to do")
        return out

    info = run.resolve_info(parent)
    parent_model = to_puzzle(load_model(info["parent"]))
    cfg = parent_model.config
    blocks = parse_block_configs(payload["block_configs"], cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers)
    child = assemble_child(parent_model, blocks, lambda v: variant_state(run_dir, parent_model, v))
    rows = architecture_table(child)
    params = sum(p.numel() for p in child.parameters())
    parent_params = sum(p.numel() for p in parent_model.parameters())
    extra = {
        "architecture.json": rows,
        "predicted_costs.json": {"solution": src.stem, **payload.get("predicted", {})},
        "realized.json": {"solution": str(src), "block_configs_sha256": digest, "parent": info["parent"],
                          "params": params, "parent_params": parent_params},
    }
    save_model(child, out, load_tokenizer(info["parent"]), extra_json=extra,
               extra_text={"architecture.md": table_markdown(rows)})
    print(table_markdown(rows))
    print(f"wrote {out}: {params / 1e6:.1f}M parameters ({params / parent_params:.0%} of the parent)")
    return out
