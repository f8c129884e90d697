"""Sharded record sets: `<dir>/<name>-SSSSS-of-NNNNN.tfrecord` files plus `manifest.json`.

The manifest is written last (atomically), so a directory without one is an unfinished
write. It records schema name and version, per-shard record counts, byte sizes and sha256
checksums, and free-form provenance (models, templates, sampling parameters...).

A directory may be a URL (gs://bucket/data/prompts/sft, anything fsspec supports; see
rlaif_jax.fileio): shards are streamed, and a checksummed shard is downloaded once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from rlaif_jax.data.records.example import SchemaError, decode_example, encode_example
from rlaif_jax.data.records.schemas import Schema, get_schema
from rlaif_jax.data.records.tfrecord import RecordError, encode_record, iter_records, read_framed
from rlaif_jax.errors import UserError
from rlaif_jax.fileio import atomic_write, exists, is_url, join, listdir_sizes, makedirs, open_file, remove
from rlaif_jax.outputs import check_replace

MANIFEST = "manifest.json"
FORMAT = "rlaif_jax.records/1"


class ManifestError(UserError):
    """A missing, inconsistent or mismatched manifest, or a shard that disagrees with it."""


def _sha256(path: str, copy_to=None) -> str:
    """sha256 of a file or URL, optionally copying the bytes to `copy_to` on the way."""
    h = hashlib.sha256()
    with open_file(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            if copy_to is not None:
                copy_to.write(chunk)
    return h.hexdigest()


def shard_name(name: str, index: int, count: int) -> str:
    return f"{name}-{index:05d}-of-{count:05d}.tfrecord"


def write_records(
    directory: str | os.PathLike,
    schema: Schema,
    records: Iterable[Mapping[str, Any]],
    *,
    num_shards: int = 1,
    provenance: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
    overwrite_binding: Optional[str] = None,
) -> dict:
    """Writes records in order into `num_shards` contiguous shards; returns the manifest.

    A complete set already in `directory` is replaced only by as many records or more,
    unless `overwrite` (rlaif_jax.outputs.check_replace; `overwrite_binding` is the gin
    binding the refusal names).

    Contiguous (not round-robin) so that reading shards in manifest order gives back the
    input order, which the order-based SFT/feedback split relies on. Records are
    materialized once to size the shards evenly; a shard may be empty when there are
    fewer records than shards.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    directory = os.fspath(directory)
    records = list(records)
    check_replace(directory, len(records), overwrite_binding, overwrite)
    makedirs(directory)
    remove(join(directory, MANIFEST), missing_ok=True)  # invalidate before rewriting shards
    encoded = []
    for i, r in enumerate(records):
        try:
            encoded.append(encode_example(schema, r))
        except SchemaError as e:
            raise SchemaError(f"{directory}: record {i}: {e}") from None
    per_shard = math.ceil(len(encoded) / num_shards) if encoded else 0
    shards = []
    for s in range(num_shards):
        fname = shard_name(schema.name, s, num_shards)
        chunk = encoded[s * per_shard : (s + 1) * per_shard]
        h, nbytes = hashlib.sha256(), 0
        with atomic_write(join(directory, fname), "wb") as f:
            for data in chunk:
                framed = encode_record(data)
                f.write(framed)
                h.update(framed)
                nbytes += len(framed)
        shards.append({"file": fname, "num_records": len(chunk), "bytes": nbytes, "sha256": h.hexdigest()})
    manifest = {
        "format": FORMAT,
        "schema": schema.describe(),
        "num_records": len(encoded),
        "shards": shards,
        "provenance": dict(provenance or {}),
        "created_unix": int(time.time()),
    }
    with atomic_write(join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest


def read_manifest(directory: str | os.PathLike, schema: Optional[Schema] = None) -> dict:
    """Loads and checks the manifest (format, schema name and version, shard files present)."""
    directory = os.fspath(directory)
    path = join(directory, MANIFEST)
    if not exists(path):
        raise ManifestError(f"{path}: no manifest (unfinished or not a record directory)")
    try:
        with open_file(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    got = manifest.get("schema", {})
    if schema is not None and (got.get("name"), got.get("version")) != (schema.name, schema.version):
        raise ManifestError(
            f"{path}: schema {got.get('name')!r} v{got.get('version')}, expected {schema.name!r} v{schema.version}"
        )
    total = 0
    sizes = listdir_sizes(directory) if is_url(directory) else None  # one listing, not a request per shard
    for shard in manifest["shards"]:
        shard_path = join(directory, shard["file"])
        if sizes is None:
            size = os.path.getsize(shard_path) if os.path.exists(shard_path) else None
        else:
            size = sizes.get(shard["file"])
        if size is None:
            raise ManifestError(f"{path}: shard {shard_path} is missing")
        if size != shard["bytes"]:
            raise ManifestError(f"{shard_path}: {size} bytes on disk, manifest says {shard['bytes']} (truncated?)")
        total += shard["num_records"]
    if total != manifest["num_records"]:
        raise ManifestError(f"{path}: shard counts sum to {total}, not {manifest['num_records']}")
    return manifest


def schema_of(directory: str | os.PathLike) -> Schema:
    """The (current) Schema named by a directory's manifest; fails on a version mismatch."""
    manifest = read_manifest(directory)
    schema = get_schema(manifest["schema"]["name"])
    read_manifest(directory, schema)
    return schema


def shard_indices_for_process(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """Shards a process reads: every process_count-th, so each host reads only its own files."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
    if num_shards < process_count:
        raise ValueError(
            f"{num_shards} shards cannot be split over {process_count} processes; "
            "rewrite the data with num_shards >= process count"
        )
    return list(range(process_index, num_shards, process_count))


def iter_shard(
    directory: str | os.PathLike, schema: Schema, shard: Mapping[str, Any], verify_checksum: bool = True
) -> Iterator[dict]:
    path = join(os.fspath(directory), shard["file"])
    if verify_checksum and is_url(path):
        # One download, hashed on the way into a local spool (memory up to 64 MiB, then a
        # temp file), then parsed from there: the checksum is still checked before any
        # record is yielded, without fetching the object twice.
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as local:
            _check_sha256(path, _sha256(path, copy_to=local), shard)
            local.seek(0)
            yield from _decode_shard(path, schema, shard, read_framed(local, path))
        return
    if verify_checksum:
        _check_sha256(path, _sha256(path), shard)
    yield from _decode_shard(path, schema, shard, iter_records(path))


def _check_sha256(path: str, digest: str, shard: Mapping[str, Any]) -> None:
    if digest != shard["sha256"]:
        raise ManifestError(f"{path}: sha256 {digest[:12]}.. differs from manifest {shard['sha256'][:12]}..")


def _decode_shard(path: str, schema: Schema, shard: Mapping[str, Any], payloads: Iterable[bytes]) -> Iterator[dict]:
    n = 0
    for i, data in enumerate(payloads):
        try:
            yield decode_example(schema, data)
        except SchemaError as e:
            raise RecordError(f"{path}: record {i}: {e}") from None
        n += 1
    if n != shard["num_records"]:
        raise ManifestError(f"{path}: {n} records, manifest says {shard['num_records']}")


def read_records(
    directory: str | os.PathLike,
    schema: Optional[Schema] = None,
    *,
    shards: Optional[Sequence[int]] = None,
    verify_checksum: bool = True,
) -> Iterator[dict]:
    """Yields decoded records of the chosen shards (default: all) in manifest order.

    `schema` defaults to the one the manifest names (checked for version); pass it to also
    assert which kind of records a stage expects.
    """
    if schema is None:
        schema = schema_of(directory)
    manifest = read_manifest(directory, schema)
    entries = manifest["shards"]
    for s in range(len(entries)) if shards is None else shards:
        yield from iter_shard(directory, schema, entries[s], verify_checksum)
