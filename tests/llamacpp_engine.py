"""llama-cpp-python for the tests that run llama.cpp: the module, or None where it is not installed (the tests
skip with one line); under CI, which builds it (scripts/install.sh), its absence is a failure, not a skip."""

import os

import pytest

try:
    import llama_cpp
except ImportError:
    if os.environ.get("CI"):
        raise
    llama_cpp = None

needs_llamacpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed; "
                                    "scripts/install.sh builds it from source")
