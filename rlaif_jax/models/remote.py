"""HF directories on an object store (gs://, any fsspec URL) as local directories: a copy
fetched once per host, checked file by file. Below training and the feedback server alike,
so both load a model given by URL the same way (rlaif_jax.train.rundir writes the exports
this reads)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Optional

from rlaif_jax import fileio

log = logging.getLogger(__name__)

HF_EXPORT_MARKER = "EXPORT_COMPLETE.json"  # an export's completion marker, written last
STAGING_ENV = "RLAIF_STAGING_DIR"


def local_hf_dir(path, what: str, weights: bool = True):
    """`path` when it is local (or None); for a URL (gs://...), a local copy fetched once per
    host (fetch_hf), so HF models and tokenizers on GCS can be given wherever a directory is
    taken. Errors name the argument."""
    # Anything but a URL string passes as is: a local path, None, or a tokenizer object.
    if not isinstance(path, (str, os.PathLike)) or not fileio.is_url(os.fspath(path)):
        return path
    try:
        return fetch_hf(os.fspath(path), weights=weights)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what}: {e}") from None


def rjoin(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel


def fetch_hf(path: str, cache_root: Optional[str] = None, weights: bool = True) -> str:
    """A local directory holding the HF directory at `path`: `path` itself when local; for a
    URL, a copy under the staging root ($RLAIF_STAGING_DIR, else the temp dir), downloaded
    once per host and checked file by file against the expected sizes. An export of ours
    lists its files in its completion marker (and without the marker it is unfinished);
    any other HF directory (a base model uploaded to GCS) is taken as its top-level files,
    which must include config.json and every weight shard its index names."""
    if not fileio.is_url(path):
        return path
    fs, remote = fileio.url_fs(path)
    marker = fileio.join(path, HF_EXPORT_MARKER)
    if fileio.exists(marker):
        files = fileio.read_json(marker)["files"]  # relative path -> size
    else:
        files = _plain_hf_files(fs, remote, path, weights)
    root = cache_root or os.environ.get(STAGING_ENV) or tempfile.gettempdir()
    key = hashlib.sha256((path.rstrip("/") + json.dumps(files, sort_keys=True)).encode()).hexdigest()[:16]
    local = os.path.join(root, "rlaif_hf", key)

    def complete(d: str) -> bool:
        return all(
            os.path.isfile(os.path.join(d, *r.split("/"))) and os.path.getsize(os.path.join(d, *r.split("/"))) == n
            for r, n in files.items()
        )

    if not complete(local):
        # Into a directory of this process's own, renamed into place when whole: processes
        # sharing a disk (or a killed earlier fetch) never see a half-written copy.
        tmp = f"{local}.part-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        rels = sorted(files)
        for r in rels:
            os.makedirs(os.path.dirname(os.path.join(tmp, *r.split("/"))), exist_ok=True)
        fs.get([rjoin(remote, r) for r in rels], [os.path.join(tmp, *r.split("/")) for r in rels])
        if not complete(tmp):
            raise OSError(f"{path}: the copy in {tmp} does not match the expected file sizes")
        if not complete(local):
            shutil.rmtree(local, ignore_errors=True)
            try:
                os.replace(tmp, local)
            except OSError:
                if not complete(local):
                    raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        log.info("fetched %s -> %s (%d files)", path, local, len(rels))
    return local


def _plain_hf_files(fs, remote: str, path: str, weights: bool) -> dict:
    entries = fs.ls(remote, detail=True) if fs.exists(remote) else []
    files = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in entries if e["type"] == "file"}
    if weights:
        if "config.json" not in files:
            raise FileNotFoundError(
                f"{path}: no config.json (not an HF model directory, or an export of ours "
                f"without {HF_EXPORT_MARKER}: interrupted)"
            )
        index = "model.safetensors.index.json"
        if index in files:
            with fileio.open_file(fileio.join(path, index)) as f:
                missing = sorted(set(json.load(f)["weight_map"].values()) - set(files))
            if missing:
                raise FileNotFoundError(f"{path}: weight shards named by {index} are missing: {missing[:3]}")
        elif not any(n.endswith(".safetensors") for n in files):
            raise FileNotFoundError(f"{path}: no .safetensors weights")
    elif not any(n.startswith("tokenizer") for n in files):
        raise FileNotFoundError(f"{path}: no tokenizer files")
    return files
