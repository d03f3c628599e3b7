"""`puzzle export` as a command: refusals are one line and exit code 2, before any file is written."""

import pytest

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.export.commands import export

from tiny_children import make_child, save_child


def test_a_refused_child_is_one_line_and_exit_2(tmp_path, capsys):
    path = save_child(make_child(["attn_g2+ffn_128", "attn_g2+ffn_linear"]), tmp_path / "child")
    capsys.readouterr()  # saving the child showed progress
    assert main(["export", str(path), str(tmp_path / "x.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("puzzle: error: layer 1 (attn_g2+ffn_linear) cannot be exported to llama.cpp")
    assert "\n" not in err and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("fmt, dtype", [("gguf", "bf16"), ("nemotron-nas", "q8_0"), ("anymodel", "f8")])
def test_a_dtype_the_format_cannot_hold_is_refused(tmp_path, fmt, dtype):
    path = save_child(make_child(["attn_g2+ffn_256"], intermediate_size=256), tmp_path / "child")  # on every grid
    with pytest.raises(PuzzleError, match=dtype):
        export(path, tmp_path / "out", format=fmt, dtype=dtype)
    assert not (tmp_path / "out").exists()
