"""The block library on disk: one safetensors file per trained variant, listed with its hash in a manifest.

Layout under `runs/R/library/`:

    manifest.json                          {"version", "parent", "parent_fingerprint", "search_space",
                                           "settings", "variants"}
    L{layer:03d}/{kind}/{variant}.safetensors   the variant's sublayer state (`sublayer_state` form:
                                           norm + module weights keyed as inside the decoder layer)
    log.jsonl                              JSON lines: init, training losses, finished variants

`manifest["variants"]` maps "L003/ffn/ffn_768" to a record: layer, kind, variant, source
("trained" | "parent" | "noop"), init, tokens, steps, loss_init, loss_final, params, flops, wall_s, and for
trained variants file, bytes, sha256 and settings_sha256 (the digest of the settings that trained it,
`BLDSettings.digest`). Parent-identical variants and no-ops have no file. The header's `settings` are the
last build's; each trained entry's digest is what decides whether a rerun reuses it.

A variant counts as done only when the manifest holds it and, for a trained one, its file exists with the
recorded hash: the file is written first (temp + rename), the manifest after it, so neither a crash between
the two nor a half-written or stray file is ever taken for a finished variant. Each read-modify-write of the
manifest holds an exclusive `flock` on `.manifest.lock`. On Ray the workers write into private directories
and the driver writes what they stream back (`receive_variant`): the run directory is shared with no one.
"""

import fcntl
import hashlib
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load

from puzzle.errors import PuzzleError
from puzzle.io import JsonlLog, atomic_write_bytes, atomic_write_json, read_json, safetensors_bytes, sha256_file
from puzzle.model.surgery import sublayer_state
from puzzle.run_dir import RunDir, open_lock
from puzzle.search_space import Kind, Variant

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


def library_dir(run_dir: str | Path) -> Path:
    return RunDir(run_dir).library


def manifest_path(run_dir: str | Path) -> Path:
    return library_dir(run_dir) / MANIFEST_NAME


def library_log(run_dir: str | Path) -> JsonlLog:
    return JsonlLog(library_dir(run_dir) / "log.jsonl")


def variant_key(layer: int, kind: Kind, name: str) -> str:
    """The manifest key of a variant, also its file's path under library/ without the suffix."""
    return f"L{layer:03d}/{kind}/{name}"


def key_of(variant: Variant) -> str:
    return variant_key(variant.layer, variant.kind, variant.name)


def variant_path(run_dir: str | Path, layer: int, kind: Kind, name: str) -> Path:
    return library_dir(run_dir) / f"{variant_key(layer, kind, name)}.safetensors"


def empty_manifest() -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "parent": None, "search_space": None, "settings": {}, "variants": {}}


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The library manifest, or an empty one when nothing was built yet."""
    path = manifest_path(run_dir)
    if not path.exists():
        return empty_manifest()
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("variants"), dict):
        raise PuzzleError(f"{path}: not a block library manifest; move it away and rerun puzzle build-library")
    return manifest


@contextmanager
def _locked(run_dir: str | Path) -> Iterator[None]:
    lock = library_dir(run_dir) / ".manifest.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open_lock(lock) as f:  # never through a symlink planted in its place
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_manifest(
    run_dir: str | Path,
    records: Iterable[dict[str, Any]] = (),
    header: dict[str, Any] | None = None,
    drop: Iterable[str] = (),
) -> dict[str, Any]:
    """Atomically add `records` (keyed by layer/kind/variant), set `header` fields, remove `drop` keys."""
    with _locked(run_dir):
        manifest = read_manifest(run_dir)
        manifest.update(header or {})
        for key in drop:
            manifest["variants"].pop(key, None)
        for record in records:
            manifest["variants"][variant_key(record["layer"], record["kind"], record["variant"])] = record
        manifest["variants"] = dict(sorted(manifest["variants"].items()))
        atomic_write_json(manifest_path(run_dir), manifest)
        return manifest


def write_variant(run_dir: str | Path, record: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write a trained variant's weights (atomically), then its manifest record with the file's hash."""
    layer, kind, name = record["layer"], record["kind"], record["variant"]
    path = variant_path(run_dir, layer, kind, name)
    data = safetensors_bytes(state, metadata={"format": "pt", "kind": kind, "layer": str(layer), "variant": name})
    atomic_write_bytes(path, data)
    record = {
        **record,
        "source": "trained",
        "file": str(path.relative_to(library_dir(run_dir))),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    update_manifest(run_dir, [record])
    return record


def record_untrained(run_dir: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Manifest records of variants with no file: the parent's own (`source` "parent") and no-ops ("noop")."""
    records = list(records)
    for r in records:
        if r.get("source") not in ("parent", "noop"):
            raise ValueError(f"untrained records need source 'parent' or 'noop', got {r.get('source')!r}")
    update_manifest(run_dir, records)


def of_another_parent(manifest: dict[str, Any], fingerprint: str | None) -> bool:
    """Whether the manifest records variants made from another parent content than `fingerprint` (the run's
    parent now, parent.json's `parent_fingerprint`). A library written before fingerprints were recorded
    has none and is taken as the parent's."""
    recorded = manifest.get("parent_fingerprint")
    return bool(manifest["variants"]) and None not in (recorded, fingerprint) and recorded != fingerprint


def check_library_parent(run_dir: str | Path, manifest: dict[str, Any], fingerprint: str | None) -> None:
    """One line when the library was built from another parent content than the run's parent now: a stage
    that reads it (score, realize) does not retrain it, so it refuses, naming the stage that does."""
    if of_another_parent(manifest, fingerprint):
        raise PuzzleError(f"the block library in {library_dir(run_dir)} was built from other parent weights than "
                          f"the parent now holds (its content changed since); rerun puzzle build-library first")


def is_done(run_dir: str | Path, manifest: dict[str, Any], layer: int, kind: Kind, name: str, check_hash: bool = True,
            settings_sha256: str | None = None) -> bool:
    """True when the manifest holds the variant and, for a trained one, its file is whole (hash matches) and,
    with `settings_sha256`, was trained under those settings (parent and no-op entries have no settings)."""
    record = manifest["variants"].get(variant_key(layer, kind, name))
    if record is None:
        return False
    if record.get("source") in ("parent", "noop"):
        return True
    if settings_sha256 is not None and record.get("settings_sha256") != settings_sha256:
        return False
    path = library_dir(run_dir) / record.get("file", "")
    if not path.is_file() or path.stat().st_size != record.get("bytes"):
        return False
    return not check_hash or sha256_file(path) == record.get("sha256")


def missing_variants(run_dir: str | Path, variants: Iterable[Variant], check_hash: bool = True,
                     settings_sha256: str | None = None) -> list[Variant]:
    """The variants the library does not (completely, or under these settings) hold yet; empty when complete."""
    manifest = read_manifest(run_dir)
    return [v for v in variants if not is_done(run_dir, manifest, v.layer, v.kind, v.name, check_hash, settings_sha256)]


def load_variant(run_dir: str | Path, layer: int, kind: Kind, name: str) -> dict[str, torch.Tensor]:
    """A trained variant's stored state, checked against the manifest's hash."""
    record = read_manifest(run_dir)["variants"].get(variant_key(layer, kind, name))
    if record is None or record.get("source") != "trained":
        raise PuzzleError(
            f"the block library in {run_dir} has no trained {kind} variant {name!r} for layer {layer}; "
            "run puzzle build-library"
        )
    path = library_dir(run_dir) / record["file"]
    if not path.is_file():
        raise PuzzleError(f"{path} is missing; run puzzle build-library to rebuild it")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):  # a record without a hash verifies nothing
        raise PuzzleError(f"{path} does not match its manifest hash (incomplete or changed); run puzzle build-library")
    return load(data)


def variant_state(run_dir: str | Path, parent_model: Any, variant: Variant) -> dict[str, torch.Tensor]:
    """The weights to pass to `replace_sublayer` for `variant`: the parent's own, {} for a no-op, or the stored file."""
    if variant.is_parent:
        return sublayer_state(parent_model, variant.layer, variant.kind)
    if variant.config.no_op:
        return {}
    return load_variant(run_dir, variant.layer, variant.kind, variant.name)


class LibraryReader:
    """Library entries for a whole run (scoring): the manifest read once, each file's sha256 verified once,
    and its tensors kept after the first load while they fit in `keep_bytes` (the others are read again on
    each later use, not hashed again). Scoring visits every variant once per batch; this makes that one
    load per run where memory allows, and one hash per run always."""

    def __init__(self, run_dir: str | Path, keep_bytes: float = float("inf")) -> None:
        self.run_dir = run_dir
        self.manifest = read_manifest(run_dir)
        self.keep_bytes = keep_bytes
        self.kept: dict[str, dict[str, torch.Tensor]] = {}
        self.kept_bytes = 0
        self.verified: set[str] = set()
        self.loads = 0  # files read (verified or not): what a test counts

    def state(self, variant: Variant) -> dict[str, torch.Tensor]:
        """A library variant's weights ({} for a no-op); parent-identical variants are the caller's."""
        if variant.config.no_op:
            return {}
        key = key_of(variant)
        if key in self.kept:
            return self.kept[key]
        record = self.manifest["variants"].get(key)
        if record is None or record.get("source") != "trained":
            raise PuzzleError(f"the block library in {self.run_dir} has no trained {variant.kind} variant "
                              f"{variant.name!r} for layer {variant.layer}; run puzzle build-library")
        path = library_dir(self.run_dir) / record["file"]
        if not path.is_file():
            raise PuzzleError(f"{path} is missing; run puzzle build-library to rebuild it")
        data = path.read_bytes()
        self.loads += 1
        if key not in self.verified:
            if hashlib.sha256(data).hexdigest() != record.get("sha256"):
                raise PuzzleError(f"{path} does not match its manifest hash (incomplete or changed); "
                                  "run puzzle build-library")
            self.verified.add(key)
        state = load(data)
        if self.kept_bytes + len(data) <= self.keep_bytes:
            self.kept[key] = state
            self.kept_bytes += len(data)
        return state


def receive_variant(run_dir: str | Path, record: dict[str, Any], data: bytes | None) -> None:
    """A variant finished elsewhere (a Ray worker's private directory, puzzle/cluster.py): for a trained one
    its file, checked against the record's hash and written atomically, then the record."""
    if record.get("source") == "trained":
        if data is None or hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise PuzzleError(f"variant {record.get('file')} arrived damaged from its worker; rerun puzzle build-library")
        atomic_write_bytes(library_dir(run_dir) / record["file"], data)
    update_manifest(run_dir, [record])
