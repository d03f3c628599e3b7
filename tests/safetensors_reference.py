"""An independent reference for the streaming safetensors writer (puzzle.io `write_safetensors`): the file
as the serialising path wrote it before streaming."""

import json

import torch


def reference_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save` (the whole file as bytes), its header re-dumped with the metadata sorted
    (safetensors writes it from a Rust HashMap, in no fixed order)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} if "__metadata__" in header else {}
    ordered.update(header)  # the tensors, in safetensors' own order
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]
