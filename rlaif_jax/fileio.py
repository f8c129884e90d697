"""File access for local paths and URLs, and the small atomic writers the stages share.

Every function takes a local path or a URL (gs://bucket/x, s3://..., memory://..., anything
fsspec supports; gs:// needs gcsfs, a dependency). Local paths go through the builtins
(open, os.path, os.replace) exactly as before; only a path with a scheme goes through
fsspec, imported on first use. Credentials for gs:// are gcsfs's usual ones (application
default credentials; on a Cloud TPU VM, the VM's service account).

Object stores have no directories and no rename (a rename is a copy), but an object
upload is atomic: `makedirs` is a no-op there, and `atomic_write` writes the final object
directly instead of a temp file that is then renamed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from typing import IO, Any, Callable, Iterable, Iterator, Optional

import gin

from rlaif_jax.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Filesystems without real directories: makedirs is a no-op on these.
_OBJECT_STORES = {"gs", "gcs", "s3", "s3a", "az", "abfs", "abfss", "adl", "memory", "http", "https"}


def is_url(path: str | os.PathLike) -> bool:
    """True for "scheme://..." (gs://, memory://, file://...); False for a plain local path."""
    return isinstance(path, str) and _URL.match(path) is not None


def url_fs(url: str):
    """(fsspec filesystem, path without the protocol) for a URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def _protocols(fs) -> set:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)


def open_file(path: str | os.PathLike, mode: str = "r", encoding: Optional[str] = None) -> IO:
    """`open` for a local path or a URL. Reads of a URL stream (fsspec's block cache); a
    URL opened for writing appears when the file is closed (not atomically on every
    filesystem: use atomic_write for results)."""
    path = os.fspath(path)
    if not is_url(path):
        return open(path, mode, encoding=encoding)
    fs, p = url_fs(path)
    if "b" in mode:
        return fs.open(p, mode)
    return fs.open(p, mode, encoding=encoding or "utf-8")


def _either(local: Callable, remote: str) -> Callable:
    """A path query: `local(path)` for a local path, the fsspec method `remote` for a URL."""

    def query(path: str | os.PathLike):
        path = os.fspath(path)
        if not is_url(path):
            return local(path)
        fs, p = url_fs(path)
        return getattr(fs, remote)(p)

    query.__name__ = local.__name__
    return query


exists = _either(os.path.exists, "exists")
isdir = _either(os.path.isdir, "isdir")  # on an object store: any object under the prefix
isfile = _either(os.path.isfile, "isfile")
getsize = _either(os.path.getsize, "size")


def remove(path: str | os.PathLike, missing_ok: bool = False) -> None:
    path = os.fspath(path)
    if missing_ok and not exists(path):
        return
    if not is_url(path):
        os.remove(path)
        return
    fs, p = url_fs(path)
    fs.rm_file(p)


def makedirs(path: str | os.PathLike) -> None:
    """os.makedirs(exist_ok=True); a no-op on object stores (they have no directories)."""
    path = os.fspath(path)
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, p = url_fs(path)
    if not _protocols(fs) & _OBJECT_STORES:
        fs.makedirs(p, exist_ok=True)


def join(base: str | os.PathLike, *parts: str) -> str:
    """os.path.join for local paths; "/"-joining for URLs, never through os.path (whose
    normpath / abspath turn "gs://b" into "gs:/b")."""
    base = os.fspath(base)
    if not is_url(base):
        return os.path.join(base, *parts)
    out = base
    for part in parts:
        out = part if is_url(part) else out.rstrip("/") + "/" + part.lstrip("/")
    return out


def abspath(path: str | os.PathLike) -> str:
    """os.path.abspath for local paths; URLs unchanged (for provenance)."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def listdir_sizes(directory: str | os.PathLike) -> dict[str, int]:
    """{name: size} of the files directly in a directory, in one listing (one request on
    an object store, instead of one per file)."""
    directory = os.fspath(directory)
    if not is_url(directory):
        return {e.name: e.stat().st_size for e in os.scandir(directory) if e.is_file()}
    fs, p = url_fs(directory)
    try:
        entries = fs.ls(p, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in entries if e.get("type") == "file"}


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern; URL patterns give URLs back."""
    import glob as _glob

    if not is_url(pattern):
        return sorted(_glob.glob(pattern))
    fs, p = url_fs(pattern)
    return sorted(fs.unstrip_protocol(m) for m in fs.glob(p))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file whose contents appear at `path` only if the block ends without an error.

    Local: write `path + ".tmp"`, then os.replace. Object stores: the final object is
    written directly (an upload is atomic; a rename would be a copy); on an error the
    upload is discarded, or, where the filesystem cannot discard, the object removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    if not is_url(path):
        tmp = path + ".tmp"
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
        return
    fs, p = url_fs(path)
    raw = fs.open(p, "wb")
    f = raw if mode == "wb" else io.TextIOWrapper(raw, encoding="utf-8")
    try:
        yield f
    except BaseException:
        _abort_write(fs, p, raw, f)
        raise
    f.close()


def _abort_write(fs, p: str, raw, f) -> None:
    from fsspec.spec import AbstractBufferedFile

    if f is not raw:
        with contextlib.suppress(Exception):
            f.detach()  # the text wrapper must not close (and so commit) the object
    if isinstance(raw, AbstractBufferedFile) and not raw.closed:
        with contextlib.suppress(Exception):
            raw.discard()  # e.g. gcsfs: cancels a resumable upload
        raw.closed = True  # nothing was committed: uploads happen on close
    else:
        with contextlib.suppress(Exception):
            raw.close()
    with contextlib.suppress(Exception):
        if fs.exists(p):
            fs.rm_file(p)


def read_json(path: str) -> Any:
    with open_file(path) as f:
        return json.load(f)


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages ("a JSON array")."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else "string"


def decode_utf8(data: bytes, path: str, line: int = 1, offset: int = 0) -> str:
    """`data` (one line or a whole file, starting at line `line` and byte `offset` of the
    file) as text; a UserError naming the file, line and byte offset when it is not UTF-8 (a
    bare UnicodeDecodeError names neither, and a prompt file saved as Latin-1 or UTF-16 is an
    everyday mistake)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line + data.count(b"\n", 0, e.start)
        raise UserError(
            f"{path}: line {at} (byte {offset + e.start}) is not UTF-8 ({e.reason}, byte "
            f"{data[e.start : e.start + 1]!r}); save the file as UTF-8"
        ) from None


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSONL file; a line that is not
    UTF-8 or not JSON is a UserError naming the file and line. A UTF-8 byte-order mark on
    the first line is skipped (editors on Windows write one)."""
    path = os.fspath(path)
    offset = 0
    with open_file(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            text = decode_utf8(raw, path, i, offset)
            offset += len(raw)
            if i == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if text.strip():
                try:
                    yield i, json.loads(text)
                except ValueError as e:
                    raise UserError(f"{path}: line {i} is not JSON ({e})") from None


def read_jsonl(path: str) -> list:
    """Every non-blank line of a JSONL file; a bad line is named by its number."""
    return [value for _, value in iter_jsonl(path)]


def read_jsonl_objects(path: str, expected: str = "an object") -> list[dict]:
    """The lines of a JSONL file of objects; a line holding an array, string or number is a
    UserError ("FILE: line N is a JSON array, expected <expected>") instead of an
    AttributeError wherever the first field is read."""
    out = []
    for i, value in iter_jsonl(path):
        if not isinstance(value, dict):
            raise UserError(f"{path}: line {i} is a JSON {json_kind(value)}, expected {expected}")
        out.append(value)
    return out


def write_json(path: str, obj: Any, default: Optional[Callable] = str) -> None:
    """Write-then-rename (or one object upload), so a killed run never leaves half a report."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False, default=default)


def write_jsonl(path: str, rows: Iterable[Any], default: Optional[Callable] = None) -> None:
    with atomic_write(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True, ensure_ascii=False, default=default) + "\n")


def save_operative_config(out_dir: str) -> None:
    """The gin bindings the run used. API clients take the *name* of their key's
    environment variable, never the key, so this cannot leak it."""
    try:
        text = gin.operative_config_str()
    except Exception:  # pragma: no cover - gin not in use
        return
    if text.strip():
        with open_file(join(out_dir, "operative_config.gin"), "w") as f:
            f.write(text)
