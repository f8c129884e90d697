"""Dollar cost from API usage and a price table (USD per million tokens).

Prices change; the table is a default that a config overrides (`FeedbackClient.prices`).
A model with no price is counted in tokens and reported as unpriced, never as free.
"""

from __future__ import annotations

from typing import Mapping, Optional

# (input, output) USD per 1M tokens, list prices at the time of writing.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4-0314": (30.0, 60.0),
    "gpt-4-0613": (30.0, 60.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.0),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.0, 8.0),
    "gpt-3.5-turbo": (0.50, 1.50),
    "claude-v1": (11.02, 32.68),
    "claude-3-5-sonnet": (3.0, 15.0),
    "claude-3-haiku": (0.25, 1.25),
}
# The Batch API bills half the online price.
BATCH_DISCOUNT = 0.5


def price_for(model: str, prices: Optional[Mapping[str, tuple]] = None) -> Optional[tuple[float, float]]:
    """Exact match first, then the longest table entry the model name starts with
    ("gpt-4o-2024-08-06" -> "gpt-4o"), so dated snapshots price like their family."""
    table = DEFAULT_PRICES if prices is None else prices
    if model in table:
        return tuple(table[model])
    best = max((k for k in table if model.startswith(k)), key=len, default=None)
    return tuple(table[best]) if best else None


def cost_usd(usage: Mapping[str, int], price: Optional[tuple], discount: float = 1.0) -> Optional[float]:
    if price is None:
        return None
    p_in, p_out = price
    return discount * (usage.get("prompt_tokens", 0) * p_in + usage.get("completion_tokens", 0) * p_out) / 1e6
