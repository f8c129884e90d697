"""TFRecord framing (the on-disk container), without TensorFlow.

A TFRecord file is a sequence of records, each:
  uint64 length (little endian) | uint32 masked_crc32c(length bytes) |
  bytes data[length]             | uint32 masked_crc32c(data)
This is the format `tf.data.TFRecordDataset` reads. The framing is four fields, so it is
written here rather than pulling in a third-party TFRecord package; CRC32C itself comes from
`google-crc32c` (Google's C implementation). Writing it ourselves also lets every error name
the file, record index and byte offset.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterator

import google_crc32c

from rlaif_jax.errors import UserError
from rlaif_jax.fileio import open_file

_MASK_DELTA = 0xA282EAD8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
HEADER_BYTES = 12
FOOTER_BYTES = 4


class RecordError(UserError):
    """A corrupt, truncated or otherwise unreadable record; the message names file and index."""


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def encode_record(data: bytes) -> bytes:
    length = _U64.pack(len(data))
    return b"".join((length, _U32.pack(masked_crc32c(length)), data, _U32.pack(masked_crc32c(data))))


class TFRecordWriter:
    """Appends framed records to one file or URL (use as a context manager)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._f: BinaryIO = open_file(self.path, "wb")
        self.num_records = 0

    def write(self, data: bytes) -> None:
        self._f.write(encode_record(data))
        self.num_records += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_records(path: str | os.PathLike, verify_crc: bool = True) -> Iterator[bytes]:
    """Yields the payload of each record of a file or URL, streaming; raises RecordError
    naming file, index and offset."""
    path = os.fspath(path)
    with open_file(path, "rb") as f:
        yield from read_framed(f, path, verify_crc)


def read_framed(f: BinaryIO, path: str, verify_crc: bool = True) -> Iterator[bytes]:
    """The records of an open binary file from its current position; `path` names it in errors."""
    index = 0
    while True:
        offset = f.tell()
        header = f.read(HEADER_BYTES)
        if not header:
            return
        if len(header) < HEADER_BYTES:
            raise RecordError(
                f"{path}: record {index} (byte {offset}): truncated header ({len(header)} of {HEADER_BYTES} bytes)"
            )
        length_bytes = header[:8]
        if verify_crc and _U32.unpack(header[8:])[0] != masked_crc32c(length_bytes):
            raise RecordError(f"{path}: record {index} (byte {offset}): length CRC mismatch")
        (length,) = _U64.unpack(length_bytes)
        body = f.read(length + FOOTER_BYTES)
        if len(body) < length + FOOTER_BYTES:
            raise RecordError(
                f"{path}: record {index} (byte {offset}): truncated data ({len(body)} of {length + FOOTER_BYTES} bytes)"
            )
        data = body[:length]
        if verify_crc and _U32.unpack(body[length:])[0] != masked_crc32c(data):
            raise RecordError(f"{path}: record {index} (byte {offset}): data CRC mismatch")
        yield data
        index += 1
