"""Prompt ingestion: readers, the paper's released files, dedup and the order-based split."""

from rlaif_jax.data.prompts.imports import import_paper_annotations, import_paper_completions
from rlaif_jax.data.prompts.paper import (
    PAIRINGS,
    comparisons_to_preferences,
    paper_loader_preferences,
    parse_completion_map,
    parse_paper_annotations,
    read_completion_file,
    read_paper_annotations,
    read_paper_completions,
)
from rlaif_jax.data.prompts.prepare import dedup, length_filter, prepare_prompts, split_by_order
from rlaif_jax.data.prompts.readers import (
    SPECIAL_STRINGS,
    detect_format,
    load_hf_rows,
    load_json_records,
    parse_alpaca,
    parse_plain,
    parse_sharegpt,
    parse_trl,
    read_prompt_source,
)
from rlaif_jax.data.prompts.types import InputError, PromptExample, Stats

__all__ = [
    "InputError",
    "PAIRINGS",
    "PromptExample",
    "SPECIAL_STRINGS",
    "Stats",
    "comparisons_to_preferences",
    "dedup",
    "detect_format",
    "import_paper_annotations",
    "import_paper_completions",
    "length_filter",
    "load_hf_rows",
    "load_json_records",
    "paper_loader_preferences",
    "parse_alpaca",
    "parse_completion_map",
    "parse_paper_annotations",
    "parse_plain",
    "parse_sharegpt",
    "parse_trl",
    "prepare_prompts",
    "read_completion_file",
    "read_paper_annotations",
    "read_paper_completions",
    "read_prompt_source",
    "split_by_order",
]
