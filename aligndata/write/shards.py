"""Arrow shards plus manifest.json: the one contract between aligndata and aligntrain.

Layout of an output directory (docs/SHARDS.md has the full contract):

    OUT/manifest.json             written last, atomically; its absence means "incomplete"
    OUT/.incomplete               present while a conversion is writing
    OUT/train/shard-00000.arrow   Arrow IPC *stream* files (what `datasets` itself writes)
    OUT/train/state.json, dataset_info.json   so `datasets.load_from_disk("OUT/train")` works
    OUT/eval/...

Readers memory-map the shards; nothing here loads a split whole into RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from aligndata.errors import InputError, InvalidDataError
from aligndata.write.atomic import atomic_write_text, fsync_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INCOMPLETE = ".incomplete"
SPLITS = ("train", "eval")
BATCH_ROWS = 1024

_ids = pa.list_(pa.int32())
SCHEMAS: dict[str, pa.Schema] = {
    "sft": pa.schema(
        [
            ("input_ids", _ids),
            ("loss_mask", pa.list_(pa.int8())),
            ("source", pa.int32()),
            ("source_index", pa.int64()),
        ]
    ),
    "dpo": pa.schema(
        [
            ("prompt_ids", _ids),
            ("chosen_ids", _ids),
            ("rejected_ids", _ids),
            ("source", pa.int32()),
            ("source_index", pa.int64()),
        ]
    ),
}
REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


def list_columns(schema: pa.Schema) -> dict[str, Any]:
    """The id-list columns of a shard schema and the numpy dtype of their values."""
    return {f.name: _numpy_dtype(f.type.value_type) for f in schema if pa.types.is_list(f.type)}


class ShardError(InputError):
    """Shards are missing, incomplete or damaged: they cannot be read (exit code 2)."""


class ShardMismatch(ShardError, InvalidDataError):
    """Readable shards that do not fit what the caller needs: another task, length, tokenizer or reference
    model (exit code 1, a data error: re-convert, or change the config)."""


def count_tokens(task: str, lengths: dict[str, int]) -> int:
    """The tokens the manifest counts, from the lengths of the id columns (of a row or summed over rows):
    a DPO prompt counts twice, once before each completion."""
    if task == "sft":
        return lengths["input_ids"]
    return lengths["prompt_ids"] * 2 + lengths["chosen_ids"] + lengths["rejected_ids"]


def dpo_loss_mask(prompt_len: int, completion_len: int) -> list[int]:
    """The loss mask of one DPO sequence, prompt + one completion: no prompt token is trained and every
    completion token is. DPO shards store no mask; whoever needs one builds it here."""
    return [0] * prompt_len + [1] * completion_len


def dpo_trained_tokens(chosen_len: int, rejected_len: int) -> int:
    """Tokens DPO trains in pairs whose completions have these (summed) lengths: all of them (`dpo_loss_mask`)."""
    return chosen_len + rejected_len


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Append rows per split; rolls to a new shard file every `shard_rows` rows.

    Rows must arrive in a deterministic order; the writer adds nothing that depends on
    timing or process count, so identical inputs give byte-identical files.
    """

    def __init__(self, out_dir: Path, task: str, shard_rows: int = 50_000, extra_columns: Iterable[str] = ()):
        if task not in SCHEMAS:
            raise ValueError(f"unknown task {task!r}")
        self.out_dir = Path(out_dir)
        self.task = task
        self.shard_rows = max(1, int(shard_rows))
        schema = SCHEMAS[task]
        for name in extra_columns:
            schema = schema.append(pa.field(name, pa.float32()))
        self.schema = schema
        self._columns = schema.names
        self._list_dtypes = list_columns(schema)
        self._scalars = [f.name for f in schema if not pa.types.is_list(f.type)]
        self._open: dict[str, dict[str, Any]] = {}
        self.files: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}

    def write(self, split: str, row: dict[str, Any]) -> None:
        """Append one row (id lists as lists or numpy arrays)."""
        columns: dict[str, Any] = {}
        for name in self._columns:
            if name in self._list_dtypes:
                values = np.asarray(row[name], dtype=self._list_dtypes[name])
                columns[name] = (values, np.array([len(values)], dtype=np.int64))
            else:
                columns[name] = [row[name]]
        self.write_columns(split, columns, 1)

    def write_columns(self, split: str, columns: dict[str, Any], rows: int) -> None:
        """Append `rows` rows given column by column: an id-list column as (flat values, per-row lengths),
        any other column as a sequence of values. The files are the same as from writing the rows one by one."""
        block = _Block(rows, {n: columns[n] for n in self._list_dtypes}, {n: columns[n] for n in self._scalars})
        pos = 0
        while pos < rows:
            state = self._open.get(split)
            if state is None or state["rows"] >= self.shard_rows:
                if state is not None:
                    self._close(split)
                state = self._start(split)
            take = min(rows - pos, self.shard_rows - state["rows"], BATCH_ROWS - state["pending_rows"])
            part = block.slice(pos, pos + take)
            state["pending"].append(part)
            state["pending_rows"] += take
            state["rows"] += take
            state["tokens"] += part.tokens(self.task)
            if state["pending_rows"] >= BATCH_ROWS:
                self._flush(state)
            pos += take

    def _start(self, split: str) -> dict[str, Any]:
        n = len(self.files[split])
        rel = f"{split}/shard-{n:05d}.arrow"
        path = self.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sink = pa.OSFile(str(path), "wb")
        state = {
            "rel": rel,
            "path": path,
            "sink": sink,
            "writer": pa.ipc.new_stream(sink, self.schema),
            "pending": [],
            "pending_rows": 0,
            "rows": 0,
            "tokens": 0,
        }
        self._open[split] = state
        return state

    def _flush(self, state: dict[str, Any]) -> None:
        blocks = state["pending"]
        if not blocks:
            return
        arrays = [_column(blocks, c, self.schema.field(c).type) for c in self._columns]
        state["writer"].write_batch(pa.record_batch(arrays, schema=self.schema))
        state["pending"] = []
        state["pending_rows"] = 0

    def _close(self, split: str) -> None:
        state = self._open.pop(split)
        self._flush(state)
        state["writer"].close()
        state["sink"].close()
        with open(state["path"], "rb+") as f:
            os.fsync(f.fileno())
        self.files[split].append(
            {
                "path": state["rel"],
                "rows": state["rows"],
                "tokens": state["tokens"],
                "sha256": sha256_file(state["path"]),
            }
        )

    def close(self) -> dict[str, Any]:
        """Close open shards, write the `datasets` sidecar files; return the manifest's `splits`."""
        for split in list(self._open):
            self._close(split)
        splits: dict[str, Any] = {}
        for split in SPLITS:
            files = self.files[split]
            if not files:
                continue
            write_datasets_sidecars(self.out_dir / split, files, self.schema)
            splits[split] = {
                "rows": sum(f["rows"] for f in files),
                "tokens": sum(f["tokens"] for f in files),
                "files": files,
            }
        return splits


class _Block:
    """Consecutive rows, column by column: id lists as (flat values, per-row lengths), scalars as sequences."""

    __slots__ = ("rows", "lists", "scalars")

    def __init__(self, rows: int, lists: dict[str, tuple[np.ndarray, np.ndarray]], scalars: dict[str, Any]):
        self.rows = rows
        self.lists = lists
        self.scalars = scalars

    def slice(self, start: int, stop: int) -> "_Block":
        if start == 0 and stop == self.rows:
            return self
        lists = {}
        for name, (values, lengths) in self.lists.items():
            first = int(lengths[:start].sum())
            lengths = lengths[start:stop]
            lists[name] = (values[first:first + int(lengths.sum())], lengths)
        return _Block(stop - start, lists, {name: v[start:stop] for name, v in self.scalars.items()})

    def tokens(self, task: str) -> int:
        return count_tokens(task, {name: int(lengths.sum()) for name, (_, lengths) in self.lists.items()})


def _column(blocks: list[_Block], name: str, type_: pa.DataType) -> pa.Array:
    """One Arrow column from blocks; id lists go through numpy (one concatenation, no per-int objects)."""
    if not pa.types.is_list(type_):
        values: list[Any] = []
        for b in blocks:
            v = b.scalars[name]
            values.extend(v.tolist() if isinstance(v, np.ndarray) else v)
        if type_ in _NUMPY_DTYPES:
            return _from_numpy(np.array(values, dtype=_NUMPY_DTYPES[type_]), type_)
        return pa.array(values, type=type_)
    dtype = _numpy_dtype(type_.value_type)
    parts = [b.lists[name] for b in blocks]
    lengths = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    flat = np.ascontiguousarray(flat, dtype=dtype)
    return pa.ListArray.from_arrays(_from_numpy(offsets, pa.int32()), _from_numpy(flat, type_.value_type))


def _numpy_dtype(type_: pa.DataType) -> Any:
    """numpy dtype of an Arrow integer type (DataType.to_pandas_dtype would import pandas: ~0.3 s)."""
    return _NUMPY_DTYPES.get(type_) or type_.to_pandas_dtype()


_NUMPY_DTYPES = {pa.int8(): np.int8, pa.int32(): np.int32, pa.int64(): np.int64}


def _from_numpy(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """The same array as pa.array(values), without pyarrow's numpy path (it imports pandas: ~0.3 s per run)."""
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)], null_count=0)


def write_datasets_sidecars(split_dir: Path, files: list[dict[str, Any]], schema: pa.Schema) -> None:
    """state.json + dataset_info.json make `datasets.load_from_disk(split_dir)` work on our files."""
    names = [PurePosixPath(f["path"]).name for f in files]
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    atomic_write_text(split_dir / "state.json", json.dumps(state, indent=2) + "\n")
    info = {"description": "", "features": _features_json(schema), "citation": "", "homepage": "", "license": ""}
    atomic_write_text(split_dir / "dataset_info.json", json.dumps(info, indent=2) + "\n")


def _features_json(schema: pa.Schema) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in schema:
        t = field.type
        if pa.types.is_list(t):
            out[field.name] = {"feature": {"dtype": str(t.value_type), "_type": "Value"}, "_type": "List"}
        else:
            out[field.name] = {"dtype": str(t), "_type": "Value"}
    return out


# -- output directory lifecycle ------------------------------------------------------------------

def prepare_output(out_dir: Path) -> None:
    """Mark `out_dir` as being written. Removes what an earlier, unfinished run left there.

    Refuses a non-empty directory that is not ours (no manifest, no incomplete marker).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        ours = (out_dir / MANIFEST).exists() or (out_dir / INCOMPLETE).exists()
        if not ours:
            raise ShardError(f"{out_dir}: directory is not empty and was not written by aligndata; choose another --out")
        clear_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INCOMPLETE).write_text("conversion in progress or interrupted; re-run to complete\n")
    fsync_dir(out_dir)


def clear_output(out_dir: Path) -> None:
    """Remove the manifest first (so a crash mid-way leaves 'incomplete'), then our files."""
    manifest = out_dir / MANIFEST
    (out_dir / INCOMPLETE).write_text("being cleared\n")
    if manifest.exists():
        manifest.unlink()
    for split in SPLITS:
        if (out_dir / split).is_dir():
            shutil.rmtree(out_dir / split)
    for extra in ("rejects.jsonl",):
        if (out_dir / extra).exists():
            (out_dir / extra).unlink()


def finish_output(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically (the commit point), then drop the incomplete marker."""
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    marker = Path(out_dir) / INCOMPLETE
    if marker.exists():
        marker.unlink()
    fsync_dir(Path(out_dir))


# -- reading -------------------------------------------------------------------------------------

def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ShardError(f"{out_dir}: no such shard directory")
    path = out_dir / MANIFEST
    if not path.exists():
        if (out_dir / INCOMPLETE).exists():
            raise ShardError(f"{out_dir}: conversion did not finish (no manifest.json); re-run `aligndata convert`")
        raise ShardError(f"{out_dir}: no manifest.json; not an aligndata shard directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: unsupported shard format version {manifest.get('format_version') if isinstance(manifest, dict) else None!r} (expected {FORMAT_VERSION})")
    if manifest.get("task") not in SCHEMAS:
        raise ShardError(f"{path}: unknown task {manifest.get('task')!r}")
    listed: set[str] = set()
    for split, info in manifest.get("splits", {}).items():
        for f in info.get("files", []):
            shard_path(out_dir, f["path"])  # validates containment
            if f["path"] in listed:
                raise ShardError(f"{path}: shard {f['path']} is listed twice (its rows would be read twice); "
                                 "the manifest was edited or damaged: re-run `aligndata convert`")
            listed.add(f["path"])
    _check_counts(path, manifest)
    return manifest


def _check_counts(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest's numbers must add up: each split's rows are its shards' rows, the kept records are the
    rows of all splits, and read = kept + rejected + dropped (that the shards hold them: `check_contents`)."""
    def refuse(what: str) -> None:
        raise ShardError(f"{path}: {what}; the manifest was edited or damaged: re-run `aligndata convert`")

    rows = 0
    for split, info in manifest.get("splits", {}).items():
        listed = sum(f.get("rows", 0) for f in info.get("files", []))
        if info.get("rows") != listed:
            refuse(f"the {split} split has {info.get('rows')} rows but its shards are listed with {listed}")
        rows += listed
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or "kept" not in counts:
        return
    if counts["kept"] != rows:
        refuse(f"counts.kept is {counts['kept']} but the splits hold {rows} rows")
    others = sum(sum(counts.get(group, {}).values()) for group in ("rejected", "dropped"))
    if counts.get("read") != counts["kept"] + others:
        refuse(f"counts.read is {counts.get('read')}, not kept {counts['kept']} + rejected and dropped {others}")


def shard_path(out_dir: Path, rel: str) -> Path:
    """Resolve a manifest-relative shard path, refusing anything that escapes `out_dir`."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise ShardError(f"{out_dir}/{MANIFEST}: shard path {rel!r} escapes the shard directory")
    full = (Path(out_dir) / Path(*p.parts)).resolve()
    if not full.is_relative_to(Path(out_dir).resolve()):
        raise ShardError(f"{out_dir}/{MANIFEST}: shard path {rel!r} escapes the shard directory")
    return full


def verify_shards(out_dir: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """Check every shard file against the manifest's size-independent sha256; raise ShardError naming the file."""
    out_dir = Path(out_dir)
    manifest = manifest or read_manifest(out_dir)
    for split, info in manifest.get("splits", {}).items():
        for f in info["files"]:
            path = shard_path(out_dir, f["path"])
            if not path.exists():
                raise ShardError(f"{path}: shard listed in the manifest is missing")
            if sha256_file(path) != f["sha256"]:
                raise ShardError(f"{path}: checksum mismatch (file corrupted or modified after conversion); re-run `aligndata convert`")


def check_contents(out_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Check that every shard holds what the writer writes and the manifest says, in one vectorised pass
    over the memory-mapped columns: rows and tokens as listed; token ids within the recorded vocabulary;
    SFT masks as long as their ids, of 0s and 1s, training at least one token; no empty sequence; no row
    past the manifest's max_length. ShardError naming the shard and its row (0-based) otherwise.

    The checksums (`verify_shards`) only say that files were not changed after being written; this says
    that what was written can be trained on (a shard made by other code, or a manifest edited by hand)."""
    out_dir = Path(out_dir)
    task = manifest["task"]
    limits = {"vocab": (manifest.get("tokenizer") or {}).get("vocab_size"),
              "max_length": (manifest.get("settings") or {}).get("max_length")}
    for info in manifest.get("splits", {}).values():
        for f in info["files"]:
            path = shard_path(out_dir, f["path"])
            rows = tokens = 0
            for batch in _batches(path):
                columns = {name: _list_values(path, rows, batch, name) for name in list_columns(SCHEMAS[task])}
                problem = _first_bad_row(task, columns, limits)
                if problem is not None:
                    raise ShardError(f"{path}: row {rows + problem[0]}: {problem[1]}; the shard does not hold what "
                                     "aligndata writes: re-run `aligndata convert`")
                rows += batch.num_rows
                tokens += count_tokens(task, {name: int(off[-1]) for name, (_, off) in columns.items()})
            if (rows, tokens) != (f["rows"], f["tokens"]):
                raise ShardError(f"{path}: holds {rows} rows and {tokens} tokens, the manifest lists {f['rows']} and "
                                 f"{f['tokens']}; the manifest was edited or damaged: re-run `aligndata convert`")


def _batches(path: Path) -> Iterable[pa.RecordBatch]:
    try:
        yield from pa.ipc.open_stream(pa.memory_map(str(path), "r"))
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{path}: not a readable Arrow shard ({e})") from None


def _list_values(path: Path, first_row: int, batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets from 0) of an id-list column of a batch, without copying."""
    if name not in batch.schema.names or not pa.types.is_list(batch.schema.field(name).type):
        raise ShardError(f"{path}: no list column {name!r}; not a shard aligndata writes")
    arr = batch.column(name)
    if arr.null_count:
        row = first_row + int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise ShardError(f"{path}: row {row}: {name} is null; the shard does not hold what aligndata writes")
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return values, offsets - offsets[0]


def _first_bad_row(task: str, columns: dict[str, tuple[np.ndarray, np.ndarray]],
                   limits: dict[str, int | None]) -> tuple[int, str] | None:
    """(row, what is wrong) of the first bad row of a batch, checked one rule at a time; None if all are good."""
    found: list[tuple[int, str]] = []

    def rows_where(bad_rows: np.ndarray, what: str) -> None:
        if bad_rows.any():
            found.append((int(np.argmax(bad_rows)), what))

    def values_where(name: str, bad_values: np.ndarray, what: str) -> None:
        if bad_values.any():
            index = int(np.argmax(bad_values))
            row = int(np.searchsorted(columns[name][1], index, side="right")) - 1
            found.append((row, what.format(value=columns[name][0][index])))

    vocab = limits["vocab"]
    for name, (values, _) in columns.items():
        if name.endswith("_ids"):
            bad = (values < 0) | (values >= vocab) if vocab else values < 0
            values_where(name, bad, f"{name} holds token id {{value}}, outside the vocabulary "
                                    f"(0 to {vocab - 1 if vocab else 'its size'})")
    lengths = {name: np.diff(off) for name, (_, off) in columns.items()}
    if task == "sft":
        rows_where(lengths["input_ids"] == 0, "input_ids is empty")
        rows_where(lengths["loss_mask"] != lengths["input_ids"], "loss_mask is not as long as input_ids")
        mask, offsets = columns["loss_mask"]
        values_where("loss_mask", (mask != 0) & (mask != 1), "loss_mask holds {value}, not 0 or 1")
        trained = np.concatenate(([0], np.cumsum(mask != 0)))
        rows_where((lengths["loss_mask"] > 0) & (trained[offsets[1:]] == trained[offsets[:-1]]),
                   "no token is trained (the loss mask is all 0)")
        total = lengths["input_ids"]
    else:
        for name in ("chosen_ids", "rejected_ids"):
            rows_where(lengths[name] == 0, f"{name} is empty")
        total = lengths["prompt_ids"] + np.maximum(lengths["chosen_ids"], lengths["rejected_ids"])
    max_length = limits["max_length"]
    if max_length is not None:
        rows_where(total > max_length, f"longer than the manifest's max_length {max_length}")
    return min(found) if found else None


def open_split(out_dir: str | Path, split: str, manifest: dict[str, Any] | None = None) -> pa.Table:
    """All shards of a split as one memory-mapped table (zero-copy; nothing is read eagerly)."""
    out_dir = Path(out_dir)
    manifest = manifest or read_manifest(out_dir)
    info = manifest.get("splits", {}).get(split)
    if not info:
        raise ShardError(f"{out_dir}: no {split!r} split in the manifest")
    tables = []
    for f in info["files"]:
        path = shard_path(out_dir, f["path"])
        try:
            tables.append(pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all())
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"{path}: not a readable Arrow shard ({e})") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

