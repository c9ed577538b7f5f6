"""Trace directories: ``manifest.json`` + ``shards/*.parquet`` (architecture.md section 5).

Each process writes its own shards, each holding whole examples. A shard counts once its
sidecar ``.json`` (rows, sha256, example ids) exists: the parquet file is written under a
temporary name and renamed first, the sidecar after it, so a killed run leaves at worst a shard
without a sidecar, which ``--resume`` deletes and redoes. No two processes write the same file;
the first process writes ``manifest.json`` at the start (configuration, not complete) and again
at the end (every shard, complete).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SpeccascadeError
from .schema import SCHEMA_VERSION

MANIFEST = "manifest.json"
SHARDS = "shards"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise SpeccascadeError(f"{directory} holds no traces: {MANIFEST} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SpeccascadeError(f"{path} is not valid JSON: {err}") from err


def prepare(directory: Path, config: dict, resume: bool) -> None:
    """Refuse an output directory that holds other traces; say what to do instead. Writes nothing."""
    if not directory.exists() or not any(directory.iterdir()):
        return
    if not (directory / MANIFEST).exists():
        raise SpeccascadeError(f"output directory {directory} exists and holds no traces; choose an empty directory")
    old = read_manifest(directory).get("config", {})
    changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if changed:
        diffs = ", ".join(f"{k}={old.get(k)!r} (now {config.get(k)!r})" for k in changed)
        raise SpeccascadeError(f"{directory} was written with a different configuration: {diffs}")
    if not resume:
        raise SpeccascadeError(f"{directory} already holds these traces; pass --resume to continue, or choose another directory")


class ShardWriter:
    """Writes one process's shards; knows which examples every process has completed."""

    def __init__(self, directory: Path, rank: int) -> None:
        self.dir = directory / SHARDS
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self._discard_interrupted()
        mine = sorted(self.dir.glob(f"r{rank:03d}-*.json"))
        self.next_index = int(mine[-1].stem.split("-")[1]) + 1 if mine else 0

    def _discard_interrupted(self) -> None:
        """Delete this process's temporary files and shards that never got their sidecar."""
        for path in self.dir.glob(f".tmp-r{self.rank:03d}-*"):
            path.unlink(missing_ok=True)
        for path in self.dir.glob(f"r{self.rank:03d}-*.parquet"):
            if not path.with_suffix(".json").exists():
                path.unlink()

    def completed(self) -> set[str]:
        """Example ids in complete shards of every process."""
        done: set[str] = set()
        for sidecar in self.dir.glob("r*.json"):
            done.update(json.loads(sidecar.read_text())["examples"])
        return done

    def write(self, columns: dict[str, np.ndarray], examples: list[str]) -> int:
        """Write one shard of whole examples; return its row count."""
        table = pa.table({name: _arrow(values) for name, values in columns.items()})
        name = f"r{self.rank:03d}-{self.next_index:05d}"
        path = self.dir / f"{name}.parquet"
        tmp = self.dir / f".tmp-{name}.parquet"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        sidecar = {"file": f"{SHARDS}/{path.name}", "rows": table.num_rows, "sha256": _sha256(path), "examples": examples}
        _write_atomic(path.with_suffix(".json"), json.dumps(sidecar).encode())
        self.next_index += 1
        return table.num_rows


def _arrow(values: np.ndarray) -> pa.Array:
    """A column; 2-D arrays become fixed-size lists (top-k ids/probs, hidden states)."""
    if values.ndim == 1:
        return pa.array(values)
    flat = pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def write_manifest(directory: Path, header: dict, complete: bool) -> dict:
    """(Re)write the manifest from the header and every complete shard's sidecar."""
    shards = [json.loads(s.read_text()) for s in sorted((directory / SHARDS).glob("r*.json"))] if (directory / SHARDS).exists() else []
    manifest = {
        "schema_version": SCHEMA_VERSION,
        **header,
        "complete": complete,
        "rows": sum(s["rows"] for s in shards),
        "examples": sum(len(s["examples"]) for s in shards),
        "shards": [{k: s[k] for k in ("file", "rows", "sha256")} | {"examples": len(s["examples"])} for s in shards],
    }
    manifest["fingerprint"] = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def shard_files(directory: str | Path, verify: bool = False) -> list[str]:
    """Paths of the manifest's shards (checked against their checksums when ``verify``)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest.get("complete"):
        raise SpeccascadeError(f"traces in {directory} are incomplete; finish them with log-traces --resume")
    files = []
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        if not path.exists():
            raise SpeccascadeError(f"shard {path} listed in the manifest is missing")
        if verify and _sha256(path) != shard["sha256"]:
            raise SpeccascadeError(f"shard {path} does not match its checksum (corrupt or changed)")
        files.append(str(path))
    return files


def load_traces(directory: str | Path, verify: bool = True):
    """The traces as a ``datasets.Dataset`` (memory-mapped Arrow, not loaded into RAM)."""
    from datasets import load_dataset

    files = shard_files(directory, verify=verify)
    if not files:
        raise SpeccascadeError(f"traces in {directory} have no rows")
    return load_dataset("parquet", data_files=files, split="train")
