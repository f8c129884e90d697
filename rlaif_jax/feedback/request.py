"""A chat-completions request in canonical form, and the hash that keys its cached result."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, Optional, Sequence

# Sampling parameters that change what the API returns, so they are part of the key.
# Anything else a caller passes goes into the key too (canonical JSON of all of them).
KNOWN_PARAMS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "reasoning_effort",
)
KEY_VERSION = 1


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One request. `template` names the prompt template and its hash ("pairwise_v1@ab12..")
    so that editing a template re-keys (and re-pays) only what it changed. `meta` is
    bookkeeping (prompt id, role) kept beside the result; it is not part of the key."""

    model: str
    messages: tuple
    params: tuple = ()  # sorted (name, value) pairs; use ChatRequest.make
    template: str = ""
    meta: tuple = ()

    @staticmethod
    def make(
        model: str,
        messages: Sequence[Mapping[str, str]],
        template: str = "",
        meta: Optional[Mapping[str, Any]] = None,
        **params: Any,
    ) -> "ChatRequest":
        if not model:
            raise ValueError("model name is empty")
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"message {i} needs role system/user/assistant and str content, got {m!r}")
            msgs.append((("content", m["content"]), ("role", m["role"])))
        clean = tuple(sorted((k, _freeze(v)) for k, v in params.items() if v is not None))
        return ChatRequest(model, tuple(msgs), clean, template, tuple(sorted((meta or {}).items())))

    @property
    def message_dicts(self) -> list[dict]:
        return [dict(m) for m in self.messages]

    @property
    def param_dict(self) -> dict:
        return {k: _thaw(v) for k, v in self.params}

    @property
    def meta_dict(self) -> dict:
        return dict(self.meta)

    def body(self) -> dict:
        """The JSON body of POST /v1/chat/completions."""
        return {"model": self.model, "messages": self.message_dicts, **self.param_dict}

    @property
    def key(self) -> str:
        payload = {"v": KEY_VERSION, "template": self.template, **self.body()}
        return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()

    def estimated_tokens(self) -> int:
        """What a tokens-per-minute limiter should reserve before sending: prompt at ~4
        characters a token plus the completion budget times n (how OpenAI counts it)."""
        p = self.param_dict
        prompt = sum(len(c) for m in self.messages for k, c in m if k == "content") // 4 + 4 * len(self.messages)
        out = p.get("max_tokens") or p.get("max_completion_tokens") or 256
        return int(prompt + out * int(p.get("n") or 1))


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return ("__dict__", tuple(sorted((k, _freeze(x)) for k, x in v.items())))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "__dict__":
        return {k: _thaw(x) for k, x in v[1]}
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v
