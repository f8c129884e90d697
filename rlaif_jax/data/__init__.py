"""Data: prompt ingestion, TFRecord record sets, tokenization, and the training input pipeline.

    prompts   readers (ShareGPT, Alpaca/AlpacaEval, JSONL, TRL, local HF datasets), the
              paper's released completion / annotation files, length filter, dedup, the
              order-based SFT/feedback split; `prepare_prompts` (gin) writes record sets
    records   versioned `tf.train.Example` schemas (prompts, demonstrations, comparisons,
              preferences with optional reference log-probs) in sharded TFRecord files with
              a manifest; standard TFRecords, written and read without TensorFlow
    tokenize  local HF tokenizers, the paper's and the model's chat templates, one BOS,
              EOS after responses, the paper's truncation; `build_test_tokenizer`
    pipeline  padded / packed SFT and preference batches, deterministic seeded order,
              per-host shards, prefetch, exact resume; `sft_pipeline` and
              `preference_pipeline` (gin)

`ids.prompt_id` (first 16 hex of sha256 of the prompt text) keys every record of every stage.
Batch layout and the loss-mask convention are documented in `pipeline.batches`.
"""

from rlaif_jax.data.ids import prompt_id

__all__ = ["prompt_id"]
