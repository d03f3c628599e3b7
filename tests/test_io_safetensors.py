"""The streaming safetensors writer (puzzle.io `write_safetensors`, `atomic_save_safetensors`): the bytes
safetensors' own serialiser writes (metadata sorted), read back by `safe_open`, written atomically, and
without a serialised copy of the tensors in memory."""

import pytest
import torch
from safetensors import safe_open

from puzzle.io import atomic_save_safetensors, safetensors_bytes, write_safetensors

from memory import traced_peak
from safetensors_reference import reference_bytes


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype a checkpoint holds, names out of order, a transposed (non-contiguous) and a sliced view,
    0-dim and empty tensors."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return {
        "z.weight": torch.randn(5, 3, generator=g),
        "a.half": torch.randn(7, generator=g).half(),
        "m.bf16": torch.randn(3, 4, generator=g).bfloat16(),
        "b.int64": torch.arange(9).reshape(3, 3),
        "mask": torch.rand(11, generator=g) > 0.5,
        "t.transposed": base.t(),
        "s.rows": base[2:5],  # contiguous, at an offset into its storage
        "step": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
        "rng": torch.get_rng_state(),
    }


@pytest.mark.parametrize("metadata", [None, {}, {"kind": "ffn", "format": "pt", "layer": "3"}])
def test_streamed_bytes_equal_safetensors_own(tmp_path, metadata):
    tensors = mixed_tensors()
    expected = reference_bytes(tensors, metadata)
    path = atomic_save_safetensors(tmp_path / "x.safetensors", tensors, metadata)
    assert path.read_bytes() == expected
    assert safetensors_bytes(tensors, metadata) == expected
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == metadata if metadata else not f.metadata()
        assert set(f.keys()) == set(tensors)
        for name, tensor in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_dtype_converts_floating_tensors_one_at_a_time(tmp_path, dtype):
    """`dtype`: the file of the floating tensors converted first (integer and bool tensors kept as they are)."""
    tensors = mixed_tensors()
    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    with open(tmp_path / "c.safetensors", "wb") as f:
        write_safetensors(f, tensors, {"format": "pt"}, dtype=dtype)
    assert (tmp_path / "c.safetensors").read_bytes() == reference_bytes(converted, {"format": "pt"})


def test_tensors_sharing_storage_are_each_written_whole(tmp_path):
    """safetensors' `save` refuses aliases; the streaming writer stores each (a tied head written by name)."""
    embed = torch.randn(8, 4)
    path = atomic_save_safetensors(tmp_path / "tied.safetensors", {"embed": embed, "head": embed})
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("embed"), embed) and torch.equal(f.get_tensor("head"), embed)
    assert path.read_bytes() == reference_bytes({"embed": embed, "head": embed.clone()})


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path):
    path = atomic_save_safetensors(tmp_path / "x.safetensors", {"a": torch.ones(4)})
    before = path.read_bytes()
    # a meta tensor has a shape (the header is written) but no data: the write fails after the first tensor
    with pytest.raises(Exception):
        atomic_save_safetensors(path, {"a": torch.zeros(1000), "b": torch.empty(4, device="meta")})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_metadata_must_map_strings_to_strings(tmp_path):
    """safetensors' reader parses the metadata as strings: anything else is refused before a byte is written."""
    with pytest.raises(TypeError, match="strings"):
        atomic_save_safetensors(tmp_path / "m.safetensors", {"a": torch.ones(2)}, {"layer": 3})
    assert not list(tmp_path.iterdir())


def test_write_safetensors_returns_the_bytes_written(tmp_path):
    tensors = mixed_tensors()
    with open(tmp_path / "y.safetensors", "wb") as f:
        n = write_safetensors(f, tensors, {"format": "pt"})
    assert n == (tmp_path / "y.safetensors").stat().st_size


def test_streaming_holds_no_serialised_copy(tmp_path):
    """tracemalloc sees Python bytes and numpy buffers, not torch's own tensors: the serialising path's peak
    is at least the tensors' bytes (the whole file as bytes, then its slice), the streaming one's a few
    percent of them (header and file buffers)."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.{kind}": torch.randn(512, 1536, generator=g).to(dtype)
               for i in range(16) for kind, dtype in (("w", torch.float32), ("v", torch.bfloat16))}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert total >= 64 * 2**20
    streamed = traced_peak(lambda: atomic_save_safetensors(tmp_path / "s.safetensors", tensors, {"format": "pt"}))
    serialised = traced_peak(lambda: (tmp_path / "r.safetensors").write_bytes(reference_bytes(tensors, {"format": "pt"})))
    print(f"peak: streamed {streamed / total:.4f}x, serialised {serialised / total:.2f}x of {total} bytes")
    assert streamed < 0.05 * total, (streamed, total)
    assert serialised >= total, (serialised, total)
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "r.safetensors").read_bytes()
