"""Trace directories: ``manifest.json`` + ``shards/*.parquet`` (architecture.md section 5).

Each process writes its own shards, each holding whole examples. A shard counts once its
sidecar ``.json`` (rows, sha256, example ids) exists: the parquet file is written under a
temporary name and renamed first, the sidecar after it, so a killed run leaves at worst a shard
without a sidecar, which ``--resume`` deletes and redoes; ``--resume`` also deletes and redoes every shard that
fails :func:`damaged_files`. No two processes write the same file;
the first process writes ``manifest.json`` at the start (configuration, not complete) and again
at the end (every shard, complete).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..deferral.spec import HIDDEN_INPUTS, SPEC_NAME, SPEC_VERSION, Source
from ..errors import SpeccascadeError
from ..outdir import fits
from ..report import damaged, read_json, write_json

MANIFEST = "manifest.json"
SHARDS = "shards"
SCHEMA_VERSION = 1  # of the rows' columns (:mod:`.schema`): readers refuse traces of another version
# Columns that traces logged before them lack, and their value there, which the readers fill in (:func:`load_traces`)
# and shards added to such traces by a resumed run leave out (:class:`ShardWriter`, so that all read as one table):
# ``turn`` is 0 in single-turn and reference traces; an older multi-turn trace counted a later turn's positions on from
# the earlier replies, so its rows stay unique as turn 0 (but its later turns' ``position`` is not the decoder's).
ADDED_COLUMNS: dict[str, int] = {"turn": 0}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def legacy_marker(directory: Path) -> dict | None:
    """The output-directory marker of traces logged before markers existed: their manifest records the same
    configuration, so ``--resume`` continues them (None where there is no manifest or it records none)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    if not isinstance(manifest.get("config"), dict):
        return None
    return {"command": "log-traces", "config": manifest["config"], "complete": bool(manifest.get("complete"))}


def read_manifest(directory: str | Path) -> dict:
    """A trace directory's manifest, checked to be a JSON object that lists its shards."""
    path = fits(directory, "trace directory") / MANIFEST
    if not path.is_file():
        raise SpeccascadeError(f"{directory} holds no traces: {MANIFEST} is missing")
    manifest = read_json(path)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "rows", "sha256"} <= s.keys() for s in shards):
        raise SpeccascadeError(f"{path} is not a trace manifest: it lists no shards (file, rows, sha256)")
    return manifest


def check_readable(manifest: dict, directory: str | Path) -> None:
    """Refuse traces this code would misread: another schema version or another feature spec."""
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SpeccascadeError(f"traces in {directory} have schema version {version}; this speccascade reads version "
                               f"{SCHEMA_VERSION} (log them again with log-traces)")
    spec = manifest.get("feature_spec") if isinstance(manifest.get("feature_spec"), dict) else {}
    if (spec.get("name"), spec.get("version")) != (SPEC_NAME, SPEC_VERSION):
        raise SpeccascadeError(f"traces in {directory} were logged with feature spec {spec.get('name')} v{spec.get('version')}; "
                               f"this speccascade computes {SPEC_NAME} v{SPEC_VERSION} (log them again with log-traces)")


def _schema(directory: str | Path, manifest: dict) -> pa.Schema | None:
    """The traces' schema, read off the first shard (every shard has the one schema); None without shards."""
    if not manifest["shards"]:
        return None
    return _shard_schema(Path(directory) / manifest["shards"][0]["file"])


def _shard_schema(path: Path) -> pa.Schema:
    """A shard's schema, read off its footer; a shard that does not parse is a :class:`SpeccascadeError` naming it."""
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise damaged(path, err) from None


def columns(directory: str | Path, manifest: dict) -> list[str]:
    """The column names of these traces, as :func:`load_traces` gives them (with :data:`ADDED_COLUMNS`)."""
    schema = _schema(directory, manifest)
    names = schema.names if schema is not None else []
    return [*names, *(name for name in ADDED_COLUMNS if names and name not in names)]


def source(directory: str | Path, manifest: dict) -> Source:
    """What these traces give a head (:func:`speccascade.deferral.spec.check_head`): their feature spec, schema
    version, tokenizer (and its vocabulary size, where recorded) and the width of each hidden-state column."""
    schema = _schema(directory, manifest)
    widths = {f.name: f.type.list_size for f in schema or ()
              if f.name in HIDDEN_INPUTS and pa.types.is_fixed_size_list(f.type)}
    return Source(f"traces in {directory}", manifest.get("feature_spec"), manifest.get("schema_version"), widths,
                  manifest.get("tokenizer"), manifest.get("vocab_size"))


def read_sidecar(path: Path) -> dict:
    """A shard's sidecar, checked to record its file, rows, sha256 and example ids."""
    sidecar = read_json(path)
    fields = {"file": str, "rows": int, "sha256": str, "examples": list}
    if not all(isinstance(sidecar.get(name), kind) for name, kind in fields.items()):
        raise damaged(path, f"a shard sidecar records {', '.join(fields)}")
    return sidecar


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet file the package wrote (``columns=[]``: its row count alone, from the footer); one that does not
    parse is a :class:`SpeccascadeError` naming it."""
    try:
        return pq.read_table(path, columns=columns)
    except pa.ArrowException as err:
        raise damaged(path, err) from None


def damaged_files(directory: Path) -> dict[Path, str]:
    """The files ``--resume`` must not keep, each with what is wrong: a damaged manifest, and by sidecar every shard
    whose sidecar is damaged or whose parquet file is missing, differs from the sha256 or row count of its sidecar
    or of the manifest, or does not parse."""
    problems, listed = {}, {}
    if (directory / MANIFEST).is_file():
        try:
            listed = {s["file"]: s for s in read_manifest(directory)["shards"]}
        except SpeccascadeError as err:
            problems[directory / MANIFEST] = str(err)
    for path in sorted((directory / SHARDS).glob("r*.json")):
        try:
            problem = _shard_problem(directory, path, listed)
        except SpeccascadeError as err:  # a damaged sidecar or parquet file
            problem = str(err)
        if problem:
            problems[path] = problem
    return problems


def _shard_problem(directory: Path, path: Path, listed: dict[str, dict]) -> str | None:
    """What is wrong with the shard of sidecar ``path`` (None: nothing)."""
    sidecar = read_sidecar(path)
    shard = path.with_suffix(".parquet")
    if sidecar["file"] != f"{SHARDS}/{shard.name}" or not shard.is_file():
        return f"shard {shard} is missing"
    entry = listed.get(sidecar["file"], sidecar)
    if (entry["rows"], entry["sha256"]) != (sidecar["rows"], sidecar["sha256"]):
        return f"shard {shard} differs between its sidecar and {directory / MANIFEST}"
    if _sha256(shard) != sidecar["sha256"]:
        return f"shard {shard} does not match its checksum (truncated or changed)"
    if read_parquet(shard, columns=[]).num_rows != sidecar["rows"]:
        return f"shard {shard} does not hold the rows its sidecar records"
    return None


def discard(path: Path) -> None:
    """Delete a file :func:`damaged_files` names: a shard's sidecar, then its parquet file (a shard without a
    sidecar never counts), or the manifest."""
    path.unlink(missing_ok=True)
    if path.name != MANIFEST:
        path.with_suffix(".parquet").unlink(missing_ok=True)


def pair_of(manifest: dict) -> tuple:
    """The model pair traces were logged with: (drafter, target, tokenizer fingerprint)."""
    return manifest.get("drafter"), manifest.get("target"), manifest.get("tokenizer")


class ShardWriter:
    """Writes one process's shards; knows which examples every process has completed."""

    def __init__(self, directory: Path, rank: int) -> None:
        self.dir = directory / SHARDS
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self._discard_interrupted()
        mine = sorted(self.dir.glob(f"r{rank:03d}-*.json"))
        self.next_index = int(mine[-1].stem.split("-")[1]) + 1 if mine else 0
        self.older = self._older_columns()

    def _older_columns(self) -> list[str]:
        """The columns of :data:`ADDED_COLUMNS` that the complete shards lack (a run begun before they were written)."""
        sidecars = sorted(self.dir.glob("r*.json"))
        if not sidecars:
            return []
        names = _shard_schema(self.dir.parent / read_sidecar(sidecars[0])["file"]).names
        return [name for name in ADDED_COLUMNS if name not in names]

    def _as_older(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``columns`` without the columns the older shards lack, so that all read as one table (:func:`load_traces`
        fills them in); refused where a row's value is not the one they stand for (a later turn's rows)."""
        for name in self.older:
            if (columns[name] != ADDED_COLUMNS[name]).any():
                raise SpeccascadeError(f"traces in {self.dir.parent} were begun before log-traces wrote {name!r} (a later "
                                       "turn's positions counted on there): rows of a later turn cannot join them; log "
                                       "them again (--overwrite)")
        return {k: v for k, v in columns.items() if k not in self.older}

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
            done.update(read_sidecar(sidecar)["examples"])
        return done

    def write(self, columns: dict[str, np.ndarray], examples: list[str], stats: dict[str, int] | None = None) -> int:
        """Write one shard of whole examples; return its row count. ``stats`` (counts such as the outcome
        labels' cost) go into the sidecar, so totals over complete shards survive ``--resume``."""
        table = pa.table({name: _arrow(values) for name, values in self._as_older(columns).items()})
        name = f"r{self.rank:03d}-{self.next_index:05d}"
        path = self.dir / f"{name}.parquet"
        tmp = self.dir / f".tmp-{name}.parquet"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        sidecar = {"file": f"{SHARDS}/{path.name}", "rows": table.num_rows, "sha256": _sha256(path), "examples": examples}
        if stats:
            sidecar["stats"] = stats
        write_json(path.with_suffix(".json"), sidecar, indent=None)
        self.next_index += 1
        return table.num_rows


def _arrow(values: np.ndarray) -> pa.Array:
    """A column; 2-D arrays become fixed-size lists (top-k ids/probs, hidden states)."""
    if values.ndim == 1:
        return pa.array(values)
    flat = pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def shard_stats(directory: Path) -> dict[str, int]:
    """The sidecars' ``stats`` of every complete shard, summed by name."""
    totals: dict[str, int] = {}
    for sidecar in sorted((directory / SHARDS).glob("r*.json")):
        for name, value in read_sidecar(sidecar).get("stats", {}).items():
            totals[name] = totals.get(name, 0) + value
    return totals


def write_manifest(directory: Path, header: dict, complete: bool) -> dict:
    """(Re)write the manifest from the header and every complete shard's sidecar."""
    shards = [read_sidecar(s) for s in sorted((directory / SHARDS).glob("r*.json"))] if (directory / SHARDS).exists() else []
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
    write_json(directory / MANIFEST, manifest)
    return manifest


def shard_files(directory: str | Path, verify: bool = False) -> list[str]:
    """Paths of the manifest's shards, checked to parse and hold the manifest's rows (and against their checksums
    when ``verify``)."""
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
        if read_parquet(path, columns=[]).num_rows != shard["rows"]:
            raise damaged(path, f"{shard['rows']} rows listed in {directory / MANIFEST}")
        files.append(str(path))
    return files


def load_traces(directory: str | Path, verify: bool = True):
    """The traces as a ``datasets.Dataset`` (memory-mapped Arrow, not loaded into RAM); a column of
    :data:`ADDED_COLUMNS` that they lack (logged before it) is filled in with its value there."""
    from datasets import load_dataset

    files = shard_files(directory, verify=verify)
    if not files:
        raise SpeccascadeError(f"traces in {directory} have no rows")
    rows = load_dataset("parquet", data_files=files, split="train")
    for name, value in ADDED_COLUMNS.items():
        if name not in rows.column_names:
            rows = rows.add_column(name, np.full(len(rows), value, dtype=np.int32))  # ids are int32 in traces (schema.to_numpy)
    return rows
