"""Names of the scalar heads a decoder can carry, in one place.

A scalar head `name` is the parameter subtree `<name>_head` (decoder.Transformer) and the
output `out[name]` of `apply`; the reward model's head is also the `score.weight` of an HF
*ForSequenceClassification checkpoint (hf_io)."""

SCORE_HEAD = "score"  # reward model: one scalar per sequence, read at its last token
VALUE_HEAD = "value"  # PPO critic: one scalar per token


def head_param(name: str) -> str:
    """The parameter subtree of scalar head `name`."""
    return f"{name}_head"


def without_head(params: dict, name: str) -> dict:
    """params without scalar head `name` (e.g. the policy's LM params without its value head)."""
    return {k: v for k, v in params.items() if k != head_param(name)}
