"""scripts/fetch_reference_assets.sh with apt-get and dpkg stubbed (no network): the corpus lands in
PUZZLE_ASSETS whether it is relative to the repository or absolute."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fetch_reference_assets.sh"
DOCS = {"tutorial/index.rst.txt": "The tutorial.", "library/os.rst.txt": "The os module.", "about.rst.txt": "About."}


def _stubs(bin_dir: Path) -> None:
    """apt-get download -> an empty .deb; dpkg -x DEB DIR -> the docs tree the script copies from."""
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text('#!/bin/sh\n[ "$1" = download ] && touch python3.11-doc_3.11_all.deb\n')
    lines = ["#!/bin/sh", 'src="$3/usr/share/doc/python3.11/html/_sources"']
    for rel, text in DOCS.items():
        lines += [f'mkdir -p "$src/{Path(rel).parent}"', f'echo "{text}" > "$src/{rel}"']
    (bin_dir / "dpkg").write_text("\n".join(lines) + "\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute", "relative"])
def test_the_corpus_lands_in_puzzle_assets(tmp_path, absolute):
    _stubs(tmp_path / "bin")
    assets = tmp_path / "assets" if absolute else Path("runs") / f"test-assets-{os.getpid()}"  # runs/ is git-ignored
    where = assets if absolute else REPO / assets
    gguf = where / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")  # present: the parent is not fetched
    try:
        env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "PUZZLE_ASSETS": str(assets)}
        proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        corpus = where / "corpus" / "python-docs"
        assert {p.relative_to(corpus).as_posix() for p in corpus.rglob("*") if p.is_file()} == set(DOCS)
    finally:
        if not absolute:
            subprocess.run(["rm", "-rf", str(where)])
