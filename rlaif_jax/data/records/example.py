"""Python dict <-> serialized `tf.train.Example`, validated against a Schema.

The protobuf classes come from tensorflow-datasets' pre-generated `tf_example_pb2`
(already a dependency), so no TensorFlow is needed to write or read.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

from rlaif_jax.data.records.schemas import Schema
from rlaif_jax.errors import UserError


class SchemaError(UserError):
    """A record that does not fit its schema; the message names the field."""


def encode_example(schema: Schema, record: Mapping[str, Any]) -> bytes:
    fields = schema.field_map
    unknown = set(record) - set(fields)
    if unknown:
        raise SchemaError(f"{schema.name}: unknown field(s) {sorted(unknown)}")
    ex = tf_example_pb2.Example()
    feats = ex.features.feature
    for f in schema.fields:
        value = record.get(f.name)
        if value is None:
            if f.required:
                raise SchemaError(f"{schema.name}: missing required field {f.name!r}")
            continue
        if f.choices is not None and value not in f.choices:
            raise SchemaError(f"{schema.name}: field {f.name!r}={value!r} not in {tuple(f.choices)}")
        if f.kind == "str":
            if not isinstance(value, str):
                raise SchemaError(f"{schema.name}: field {f.name!r} must be str, got {type(value).__name__}")
            feats[f.name].bytes_list.value.append(value.encode("utf-8"))
        elif f.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                value = _as_int(schema, f.name, value)
            feats[f.name].int64_list.value.append(int(value))
        elif f.kind == "float":
            value = float(value)
            if not math.isfinite(value):
                raise SchemaError(f"{schema.name}: field {f.name!r} is not finite: {value}")
            # float_list holds float32: a finite value beyond its range would be read back as inf
            with np.errstate(over="ignore"):
                as_f32 = float(np.float32(value))
            if not math.isfinite(as_f32):
                raise SchemaError(
                    f"{schema.name}: field {f.name!r}={value!r} overflows float32 (|x| <= "
                    f"{float(np.finfo(np.float32).max):.6g}), the precision tf.train.Example "
                    "stores floats in; check the value (a summed log-prob this large is a bug upstream)"
                )
            feats[f.name].float_list.value.append(value)
        else:  # pragma: no cover - schemas are static
            raise SchemaError(f"{schema.name}: field {f.name!r} has unknown kind {f.kind}")
    return ex.SerializeToString(deterministic=True)


def _as_int(schema: Schema, name: str, value: Any) -> int:
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise SchemaError(f"{schema.name}: field {name!r} must be int, got {value!r}") from None
    if as_int != value:
        raise SchemaError(f"{schema.name}: field {name!r} must be int, got {value!r}")
    return as_int


def decode_example(schema: Schema, data: bytes) -> dict[str, Any]:
    """Parses one serialized Example; missing optional fields come back as None."""
    ex = tf_example_pb2.Example()
    try:
        ex.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError, a private subclass
        raise SchemaError(f"{schema.name}: not a tf.train.Example ({e})") from None
    feats = ex.features.feature
    fields = schema.field_map
    unknown = set(feats.keys()) - set(fields)
    if unknown:
        raise SchemaError(f"{schema.name}: unknown feature(s) {sorted(unknown)}")
    out: dict[str, Any] = {}
    for f in schema.fields:
        if f.name not in feats:
            if f.required:
                raise SchemaError(f"{schema.name}: missing required field {f.name!r}")
            out[f.name] = None
            continue
        feat = feats[f.name]
        kind = feat.WhichOneof("kind")
        expected = {"str": "bytes_list", "int": "int64_list", "float": "float_list"}[f.kind]
        values = getattr(feat, expected).value if kind == expected else None
        if values is None or len(values) != 1:
            raise SchemaError(
                f"{schema.name}: field {f.name!r} must be one {expected} value, got {kind} "
                f"with {0 if values is None else len(values)} values"
            )
        value = values[0]
        if f.kind == "str":
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SchemaError(f"{schema.name}: field {f.name!r} is not UTF-8 ({e})") from None
        elif f.kind == "float":
            value = float(value)
        else:
            value = int(value)
        out[f.name] = value
    return out
