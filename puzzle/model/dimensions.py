"""A parent's dimensions checked against the tensors it holds, before anything loops over them.

A GGUF header or a config.json is a handful of numbers that every later loop trusts: `block_count` 10^6 made
the search space build a million layers (minutes, then a hang), `embedding_length` 10^9 reached
transformers' config validation as a traceback. So before the config is built, each dimension the header
claims is compared with the tensors actually present, read from the headers alone (no weight is read):

  layers     the layer indices the tensor names hold (`model.layers.N.` / `blk.N.`) are exactly 0..L-1
  vocab, D   the embedding is [vocab_size, hidden_size] (and so is an untied head)
  heads      every layer's q_proj is [heads x head_dim, D], k_proj and v_proj [kv_heads x head_dim, D],
             o_proj [D, heads x head_dim]
  FFN        every layer's gate_proj and up_proj are [intermediate_size, D], down_proj [D, intermediate_size]

Each loop here runs over the tensors present, never over a claimed count, and the GGUF header reader checks
every count it reads against the bytes left in the file. A checkpoint with no weights beside its config
(`puzzle plan` sizes a model from its config alone) has only its numbers checked: positive integers.
"""

import math
import mmap
import struct
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError

# The dimensions checked, by their Hugging Face config names.
FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
          "vocab_size", "head_dim")
# Their GGUF metadata keys (after "ARCH."), as transformers' GGUF loader maps them (integrations/ggml.py).
GGUF_KEYS = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
             "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
             "num_key_value_heads": "attention.head_count_kv", "vocab_size": "vocab_size",
             "head_dim": "attention.key_length"}
# The tensors compared: (HF name, GGUF name) with {i} for the layer, and their (rows, columns) as sizes below.
_TENSORS = (
    ("model.embed_tokens.weight", "token_embd.weight", ("vocab", "hidden")),
    ("lm_head.weight", "output.weight", ("vocab", "hidden")),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", ("q", "hidden")),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", ("kv", "hidden")),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", ("kv", "hidden")),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", ("hidden", "q")),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", ("ffn", "hidden")),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", ("ffn", "hidden")),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", ("hidden", "ffn")),
)
# Each size: the product of these fields.
_SIZES = {"vocab": ("vocab_size",), "hidden": ("hidden_size",), "ffn": ("intermediate_size",),
          "q": ("num_attention_heads", "head_dim"), "kv": ("num_key_value_heads", "head_dim")}
_DAMAGED = "the file is damaged or its metadata was edited"
_DEFAULTS = {"head_dim": "hidden / heads", "num_key_value_heads": "the query heads"}  # see `_with_defaults`


def check_config_json(path: Path, raw: Any, weights: Path | None) -> None:
    """A Hugging Face parent: `raw` is its parsed config.json, `weights` its safetensors file or directory
    (None when it has none). One-line PuzzleError when a dimension is not a positive integer or disagrees
    with the tensors."""
    if not isinstance(raw, dict):
        return  # not a config transformers can read: its own loader says so
    claims = {k: raw[k] for k in FIELDS if raw.get(k) is not None}
    names = {k: k for k in FIELDS}
    _check_positive(claims, names, f"{path}: config.json")
    if weights is None:
        return
    from puzzle.model.loading import SafetensorsCheckpoint

    with SafetensorsCheckpoint(weights) as ckpt:
        shapes = {k: ckpt.shape(k) for k in ckpt.keys()}
    _check_against(claims, names, shapes, hf=True, where=f"{path}: config.json")


def check_gguf(path: Path, architectures: tuple[str, ...]) -> None:
    """A GGUF parent of one of `architectures` (GGUF names them as HF model types): its header's dimensions
    against its tensor table, both read without the tensor data. ValueError / struct.error for a file too
    damaged to read (the caller's one line for unreadable GGUFs)."""
    header = read_gguf_header(path)
    arch = header.metadata.get("general.architecture")
    if arch not in architectures:
        return  # refused as unsupported by the caller, which names the architecture
    names = {k: f"{arch}.{key}" for k, key in GGUF_KEYS.items()}
    claims = {k: header.metadata[names[k]] for k in FIELDS if names[k] in header.metadata}
    if "vocab_size" not in claims and "tokenizer.ggml.tokens" in header.array_lengths:
        claims["vocab_size"] = header.array_lengths["tokenizer.ggml.tokens"]
        names["vocab_size"] = "the length of tokenizer.ggml.tokens"
    _check_positive(claims, names, f"{path}: GGUF header")
    _check_against(claims, names, header.shapes, hf=False, where=f"{path}: GGUF header")


def _check_positive(claims: dict[str, Any], names: dict[str, str], where: str) -> None:
    for field, value in claims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PuzzleError(f"{where}: {names[field]} must be a positive integer, got {value!r}; {_DAMAGED}")


def _check_against(claims: dict[str, Any], names: dict[str, str], shapes: dict[str, tuple[int, ...]], hf: bool,
                   where: str) -> None:
    """Every claimed dimension against the tensors in `shapes` (HF or GGUF names, torch order)."""
    layers = _layer_indices(shapes, "model.layers." if hf else "blk.")
    if hf and not layers:  # NemotronH's hub checkpoints name them backbone.layers.N (transformers renames on load)
        layers = _layer_indices(shapes, "backbone.layers.")
    n = claims.get("num_hidden_layers")
    # n distinct indices from 0 to n - 1 are exactly 0..n-1 (no set of n elements is built)
    if n is not None and (len(layers) != n or (layers and (min(layers) != 0 or max(layers) != n - 1))):
        held = f"{len(layers)} (indices {min(layers)}..{max(layers)})" if layers else "none"
        raise PuzzleError(f"{where}: {names['num_hidden_layers']} says {n} layers, but the file holds tensors "
                          f"for {held}; {_DAMAGED}")
    dims = _with_defaults(claims)
    for hf_name, gguf_name, (rows, cols) in _TENSORS:
        expected = (_size(dims, rows), _size(dims, cols))
        if None in expected:
            continue  # a dimension the header does not give: nothing to compare
        template = hf_name if hf else gguf_name
        for i in sorted(layers) if "{i}" in template else [None]:
            name = template.format(i=i)
            if name in shapes and tuple(shapes[name]) != expected:
                fields = dict.fromkeys(_SIZES[rows] + _SIZES[cols])
                said = ", ".join(f"{names[f]} {dims[f]}" if f in claims else f"{f} {dims[f]} ({_DEFAULTS[f]})"
                                 for f in fields)
                raise PuzzleError(f"{where}: {name} is {list(shapes[name])}, but {said} give {list(expected)}; "
                                  f"{_DAMAGED}")


def _with_defaults(claims: dict[str, Any]) -> dict[str, Any]:
    """The claims with transformers' defaults for what a config leaves out: KV heads = query heads, head_dim =
    hidden / heads (None where a dimension it is made of is not given)."""
    dims = dict(claims)
    heads, hidden = dims.get("num_attention_heads"), dims.get("hidden_size")
    dims.setdefault("num_key_value_heads", heads)
    if dims.get("head_dim") is None and heads and hidden:
        dims["head_dim"] = hidden // heads
    return dims


def _size(dims: dict[str, Any], size: str) -> int | None:
    """The product of the fields `size` is made of; None when one is not given."""
    values = [dims.get(f) for f in _SIZES[size]]
    return None if None in values else math.prod(values)


def _layer_indices(shapes: dict[str, Any], prefix: str) -> set[int]:
    out = set()
    for name in shapes:
        if name.startswith(prefix):
            index = name[len(prefix):].split(".", 1)[0]
            if index.isdigit():
                out.add(int(index))
    return out


# ---- the GGUF header, read without its values' payloads ------------------------------------------------

class GGUFHeader:
    """What `check_gguf` needs of a GGUF header: scalar metadata, array lengths, tensor shapes (torch order)."""

    def __init__(self) -> None:
        self.metadata: dict[str, Any] = {}
        self.array_lengths: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}


# GGUF value types (ggml/include/gguf.h `gguf_type`): fixed sizes, and the two variable ones
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads a GGUF header from a memory map; every count is checked against the bytes left, so a damaged
    count (10^12 tensors) ends in a ValueError instead of a loop."""

    def __init__(self, data: Any, endian: str) -> None:
        self.data, self.endian, self.at = data, endian, 0

    def take(self, fmt: str) -> Any:
        fmt = self.endian + fmt
        value = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value[0] if len(value) == 1 else value

    def count(self, n: int, item_bytes: int, what: str) -> int:
        if n * item_bytes > len(self.data) - self.at:
            raise ValueError(f"{what} count {n} does not fit in the file")
        return n

    def string(self) -> str:
        n = self.count(self.take("Q"), 1, "string length")
        self.at += n
        return bytes(self.data[self.at - n:self.at]).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.count(self.take("Q"), 1, "string length")  # taken before `at` moves past the string
        self.at += n

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        raise ValueError(f"value type {kind} is not a GGUF scalar")

    def skip_array(self) -> int:
        kind, n = self.take("I"), self.take("Q")
        if kind in _SCALARS:
            size = struct.calcsize(_SCALARS[kind])
            self.at += size * self.count(n, size, "array")
        elif kind == _STRING:
            for _ in range(self.count(n, 8, "array")):  # each string takes at least its 8-byte length
                self.skip_string()
        elif kind == _ARRAY:
            for _ in range(self.count(n, 12, "array")):
                self.skip_array()
        else:
            raise ValueError(f"array of unknown type {kind}")
        return n


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The metadata (scalars; arrays by length only) and tensor table of a GGUF file, from its header alone.
    gguf's `GGUFReader` builds every metadata value (seconds for a 49K-token vocabulary); this skips them."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        version = struct.unpack_from("<I", data, 4)[0]
        cursor = _Cursor(data, "<" if version & 0xFFFF else ">")  # a big-endian file reads as 0xNN000000
        cursor.at = 8
        header = GGUFHeader()
        n_tensors, n_kv = cursor.take("Q"), cursor.take("Q")
        for _ in range(cursor.count(n_kv, 12, "metadata")):  # key length + type + the smallest value
            key, kind = cursor.string(), cursor.take("I")
            if kind == _ARRAY:
                header.array_lengths[key] = cursor.skip_array()
            else:
                header.metadata[key] = cursor.value(kind)
        for _ in range(cursor.count(n_tensors, 24, "tensor")):  # name length + n_dims + type + offset
            name = cursor.string()
            n_dims = cursor.count(cursor.take("I"), 8, "dimension")
            dims = [cursor.take("Q") for _ in range(n_dims)]
            cursor.take("I"), cursor.take("Q")  # ggml type, data offset
            header.shapes[name] = tuple(reversed(dims))  # GGUF lists the fastest-varying dimension first
        return header
