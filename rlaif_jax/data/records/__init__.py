"""Versioned TFRecord (`tf.train.Example`) record sets with manifests. No TensorFlow needed."""

from rlaif_jax.data.records.example import SchemaError, decode_example, encode_example
from rlaif_jax.data.records.schemas import (
    COMPARISONS,
    DEMONSTRATIONS,
    FINISH_REASONS,
    LABELLED,
    PREFERENCES,
    PROMPTS,
    SCHEMAS,
    VERDICTS,
    Field,
    Schema,
    get_schema,
    normalize_finish_reason,
)
from rlaif_jax.data.records.shards import (
    ManifestError,
    read_manifest,
    read_records,
    schema_of,
    shard_indices_for_process,
    write_records,
)
from rlaif_jax.data.records.tfrecord import RecordError, TFRecordWriter, iter_records

__all__ = [
    "COMPARISONS",
    "DEMONSTRATIONS",
    "FINISH_REASONS",
    "LABELLED",
    "PREFERENCES",
    "PROMPTS",
    "SCHEMAS",
    "VERDICTS",
    "Field",
    "ManifestError",
    "RecordError",
    "Schema",
    "SchemaError",
    "TFRecordWriter",
    "decode_example",
    "encode_example",
    "get_schema",
    "iter_records",
    "normalize_finish_reason",
    "read_manifest",
    "read_records",
    "schema_of",
    "shard_indices_for_process",
    "write_records",
]
