"""One dtype vocabulary (puzzle/dtypes.py): fp32, bf16, fp16, fp8, torch's names accepted as aliases by every
stage that takes a dtype; one table of bytes, torch and file-format names; one GIB, one memory probe and one
default search space in the package."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from puzzle import dtypes
from puzzle.cli import main
from puzzle.device import resolve_dtype, resolve_remote
from puzzle.errors import PuzzleError
from puzzle.export.fields import safetensors_dtype
from puzzle.io import read_yaml
from puzzle.profiling.hardware import parse_profile, resolve_profile_path

REPO = Path(__file__).resolve().parents[1]
SPELLINGS = [("fp32", "fp32"), ("float32", "fp32"), ("torch.float32", "fp32"), ("FP32", "fp32"), ("f32", "fp32"),
             ("bf16", "bf16"), ("bfloat16", "bf16"), ("BF16", "bf16"),
             ("fp16", "fp16"), ("float16", "fp16"), ("half", "fp16"), ("f16", "fp16"), ("fp8", "fp8")]


def test_the_table_agrees_with_torch_and_safetensors():
    from puzzle.io import _safetensors_dtypes  # the writer's own table of safetensors codes

    for d in dtypes.TABLE:
        t = dtypes.torch_dtype(d.name)
        assert t.itemsize == d.bytes == dtypes.BYTES[d.name], d
        assert _safetensors_dtypes()[t] == d.safetensors, d
        assert dtypes.name_of(t) == d.name == dtypes.name_of(str(t)), d


@pytest.mark.parametrize("spelling, name", SPELLINGS)
def test_every_spelling_names_one_dtype(spelling, name):
    assert dtypes.canonical(spelling) == name


def test_the_vocabulary_imports_no_torch():
    code = "import sys, puzzle.dtypes, puzzle.units; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("spelling, name", [s for s in SPELLINGS if s[1] in dtypes.COMPUTE])
def test_every_stage_takes_every_spelling_of_a_compute_dtype(spelling, name):
    """Training and inference stages (puzzle.device), the safetensors exports, a hardware profile's workload."""
    assert resolve_dtype(spelling, "cpu") == name and resolve_remote("cpu", spelling).dtype_name == name
    assert safetensors_dtype(spelling, None) == dtypes.torch_dtype(name)
    raw = read_yaml(resolve_profile_path("h100_80gb"))
    raw["workload"]["dtype"] = spelling
    raw["device"]["peak_flops"] = {dtypes.BY_NAME[name].torch: 1e12}  # keyed by torch's name
    profile = parse_profile(raw)
    assert profile.workload.dtype == name and profile.device.peak_flops == {name: 1e12}


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16", "fp16"])
def test_convert_takes_the_vocabulary(tiny_parent_dir, tmp_path, dtype):
    """`puzzle convert --dtype bf16` (it took only float32 / bfloat16 / float16 before)."""
    assert main(["convert", str(tiny_parent_dir), str(tmp_path / "child"), "--dtype", dtype]) == 0
    weights = load_file(str(tmp_path / "child" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {dtypes.torch_dtype(dtype)}


@pytest.mark.parametrize("call", [lambda: resolve_dtype("int8"), lambda: resolve_dtype("fp8"),
                                  lambda: safetensors_dtype("q8_0", None), lambda: dtypes.canonical("float64")])
def test_an_unknown_or_unusable_dtype_is_one_line(call):
    with pytest.raises(PuzzleError, match="unknown dtype .*; choose .*fp32"):
        call()


def test_convert_refuses_an_unknown_dtype_in_one_line(tiny_parent_dir, tmp_path, capsys):
    assert main(["convert", str(tiny_parent_dir), str(tmp_path / "child"), "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown dtype 'int8'" in err[0]
    assert not (tmp_path / "child").exists()


def _sources(folders):
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), path.read_text()


BOTH = ("puzzle", "scripts")


@pytest.mark.parametrize("fact, pattern, homes, folders", [
    ("GiB", r"^GIB\s*=|\b2\s*\*\*\s*30\b|\b1024\s*\*\*\s*3\b", ["puzzle/units.py"], BOTH),
    ("the host memory probe", r"sysconf\(", ["puzzle/units.py"], BOTH),
    # a dtype table as a mapping (bytes, torch dtypes, aliases): puzzle/dtypes.py's TABLE states them, and the
    # safetensors writer keeps its table of every torch type (ints and bools too; checked against TABLE above)
    ("a dtype table", r"[\"'](bf16|bfloat16)[\"']\s*:\s*(2\b|torch\.|[\"'])", ["puzzle/io.py"], BOTH),
    # the benchmarks name the space they measure; the package falls back to its default in one place
    ("the default search space", r"[\"']llama_default[\"']", ["puzzle/run_dir.py"], ("puzzle",)),
])
def test_a_fact_is_stated_in_one_module(fact, pattern, homes, folders):
    found = [name for name, text in _sources(folders) if re.search(pattern, text, re.M)]
    assert found == homes, f"{fact} is stated in {found}, not only in {homes}"


@pytest.mark.parametrize("spelling, stored", [("fp32", "F32"), ("float16", "F16"), ("f16", "F16")])
def test_gguf_export_takes_the_vocabulary(tiny_parent_dir, tmp_path, spelling, stored):
    """`puzzle export --format gguf --dtype fp32` (llama.cpp's f32 / f16 were its only names before)."""
    import gguf

    from puzzle.export.commands import export

    path = export(tiny_parent_dir, tmp_path / "p.gguf", format="gguf", dtype=spelling)
    matrices = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1}
    assert matrices == {stored}
    with pytest.raises(PuzzleError, match="GGUF dtype 'bf16' not supported"):
        export(tiny_parent_dir, tmp_path / "b.gguf", format="gguf", dtype="bf16")
