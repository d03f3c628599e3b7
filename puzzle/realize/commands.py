"""`puzzle realize`: build the child checkpoint of a solution from the block library."""

import hashlib
import json
from pathlib import Path

from puzzle.device import DTYPES, resolve_dtype
from puzzle.engines import check_child, check_family, get_engine
from puzzle.errors import PuzzleError
from puzzle.io import clean_stale_temps, read_json
from puzzle.library.store import check_library_parent, read_manifest, variant_key, variant_state
from puzzle.model import BlockConfigError, PuzzleConfig, parse_block_configs
from puzzle.model.checkpoint import load_config, load_tokenizer, save_model
from puzzle.outputs import check_output, marker
from puzzle.shape import ModelShape
from puzzle.run_dir import RunDir, writes_run_dir
from puzzle.search_space import check_parent, load_search_space

from .assemble import architecture_table, stream_child, table_markdown


@writes_run_dir("realize")
def realize(run_dir: Path = Path("runs/default"), solution: str | None = None, out: Path | None = None,
            parent: Path | None = None, target_engine: str | None = None, dtype: str = "auto",
            force: bool = False) -> Path:
    """Assemble the child of a solution from the block library and save it as a checkpoint.

    Args:
        run_dir: the run directory (holds the library and the solutions)
        solution: a solution name under run_dir/solutions/ or a path to a solution .json (default: the best
            one the last `puzzle solve` wrote, else the run's only solution)
        out: where to write the child (default: run_dir/children/SOLUTION)
        parent: the parent model (default: the one recorded in the run directory)
        target_engine: the engine the child must load in (transformers, vllm, sglang, trtllm, llamacpp;
            default: the solution's `target_engine` (solve --target-engine), else the search space's); a
            child that breaks its rules is refused
        dtype: the child's stored weights: auto (the parent's stored dtype), bf16, fp16 or fp32. Realize
            copies tensors (streamed on the CPU, one sublayer at a time), so it has no --device.
        force: replace an earlier output of another puzzle command at --out (never anything else: a
            directory puzzle did not write is refused)
    """

    wanted = None if dtype == "auto" else resolve_dtype(dtype)  # None: the parent's
    run = RunDir(run_dir)
    src = run.find_solution(solution)
    payload = read_json(src)
    if "block_configs" not in payload:
        raise PuzzleError(f"{src}: not a solution file (no 'block_configs')")
    out = Path(out) if out is not None else run.child(src.stem)
    # the output is checked before anything is written (resolve_info may record the parent's fingerprint)
    check_output(out, "realize", force=force, inputs=(parent or run.info().get("parent"), src), run_dir=run.root)
    info = run.resolve_info(parent, None, check=check_parent)
    clean_stale_temps(run.children)  # what a killed realize left (children/.NAME.tmp-*): the realize lock is ours
    config = load_config(info["parent"])
    target_engine = target_engine or payload.get("target_engine")
    if target_engine is None:
        target_engine = load_search_space(info["search_space"], config).target_engine
    engine = get_engine(target_engine)
    try:
        blocks = parse_block_configs(payload["block_configs"], config.hidden_size, config.num_attention_heads,
                                     config.num_hidden_layers)
    except BlockConfigError as err:
        raise PuzzleError(f"{src}: {err}") from None
    check_family(engine.name, config)
    check_child(engine.name, blocks, config.hidden_size)  # before any weight is read

    manifest = read_manifest(run_dir)
    check_library_parent(run_dir, manifest, info.get("parent_fingerprint"))  # of other parent weights: rebuild first
    digest = hashlib.sha256(json.dumps(payload["block_configs"], sort_keys=True).encode()).hexdigest()
    # what the child's weights come from besides its blocks: the parent's content and the library's entries
    sources = {"parent_fingerprint": info.get("parent_fingerprint"),
               "library_sha256": hashlib.sha256(json.dumps(manifest["variants"], sort_keys=True).encode()).hexdigest()}
    done = out / "realized.json"
    if done.exists() and _holds(out, digest, engine.name, wanted, sources):
        print(f"{out} already holds this solution; nothing to do")
        return out

    # streamed: the child is filled sublayer by sublayer from the parent's checkpoint and the library,
    # never next to a whole parent; stored in the parent's dtype unless --dtype names another
    child = stream_child(info["parent"], blocks, lambda v: variant_state(run_dir, None, v),
                         dtype=DTYPES[wanted] if wanted else None)
    stored = next(k for k, v in DTYPES.items() if v == child.model.embed_tokens.weight.dtype)
    rows = architecture_table(child)
    params = sum(p.numel() for p in child.parameters())
    parent_params = ModelShape.from_config(config).total_params()
    extra = {
        **marker("realize"),
        "architecture.json": rows,
        "predicted_costs.json": {"solution": src.stem, **payload.get("predicted", {})},
        "realized.json": {"solution": str(src), "block_configs_sha256": digest, "parent": info["parent"], **sources,
                          "target_engine": engine.name, "params": params, "parent_params": parent_params,
                          "dtype": stored, **_kept_experts(manifest, blocks)},
    }
    save_model(child, out, load_tokenizer(info["parent"]), extra_json=extra,
               extra_text={"architecture.md": table_markdown(rows)}, lm_head_weight=engine.lm_head_weight)
    print(table_markdown(rows))
    print(f"wrote {out}: {params / 1e6:.1f}M parameters ({params / parent_params:.0%} of the parent)")
    return out


def _kept_experts(manifest: dict, blocks: list) -> dict:
    """{"experts": {layer: the parent experts its MoE FFN keeps, in the child's order}} from the library entries
    (bld.py records them; the parent's own block keeps all); {} for a child without MoE layers."""
    kept = {}
    for i, block in enumerate(blocks):
        if block.ffn.is_moe:
            record = manifest["variants"].get(variant_key(i, "ffn", block.ffn.name), {})
            kept[str(i)] = record.get("experts")
    return {"experts": kept} if kept else {}


def _holds(out: Path, digest: str, engine: str, dtype: str | None, sources: dict[str, str | None]) -> bool:
    """Whether `out` is this solution realised for this engine, in `dtype` (None: whichever the parent's
    was), in today's checkpoint format (a child realised before --dtype is fp32), from today's parent
    content and library entries (`sources`)."""
    record = read_json(out / "realized.json")
    if any(record.get(k) != v for k, v in sources.items()):
        return False
    try:
        model_type = read_json(out / "config.json").get("model_type")
    except PuzzleError:
        return False
    return (record.get("block_configs_sha256") == digest and record.get("target_engine", "transformers") == engine
            and dtype in (None, record.get("dtype", "fp32")) and model_type == PuzzleConfig.model_type)
