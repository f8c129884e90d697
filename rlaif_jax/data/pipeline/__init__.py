"""Training input pipeline: batch layouts, packing, and the checkpointable iterator."""

from rlaif_jax.data.pipeline.batches import (
    SEQUENCE_KEYS,
    RowPacker,
    as_document_stream,
    empty_batch,
    pack_batch,
    packing_efficiency,
    pad_batch,
    pad_preference_batch,
)
from rlaif_jax.data.pipeline.builders import labelled_pipeline, load_host_records, preference_pipeline, sft_pipeline
from rlaif_jax.data.pipeline.iterator import (
    DataIterator,
    IndexStream,
    PackedBatcher,
    PaddedBatcher,
    PreferenceBatcher,
)

__all__ = [
    "SEQUENCE_KEYS",
    "DataIterator",
    "IndexStream",
    "PackedBatcher",
    "PaddedBatcher",
    "PreferenceBatcher",
    "RowPacker",
    "as_document_stream",
    "empty_batch",
    "labelled_pipeline",
    "load_host_records",
    "pack_batch",
    "packing_efficiency",
    "pad_batch",
    "pad_preference_batch",
    "preference_pipeline",
    "sft_pipeline",
]
