"""A reply's text as its tokens arrive: the pieces that are safe to show, and why it ended.

A piece is held back while it may still change: the end of a multi-byte character not yet complete, or text
that may be the start of a stop sequence. A reply ends at an end-of-turn token or a stop sequence
("stop", the stop sequence and what follows are not shown) or at its token budget ("length").
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

INCOMPLETE = "\ufffd"  # what decoding shows for the first bytes of a character cut between tokens


def end_ids(tokenizer: Any, generation_config: dict[str, Any] | None = None) -> set[int]:
    """The tokens that end a turn: the tokenizer's eos and the generation config's eos id(s)."""
    declared = (generation_config or {}).get("eos_token_id")
    ids = set(declared) if isinstance(declared, list) else {declared} if isinstance(declared, int) else set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _held(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` may be the start of a stop sequence (or of a character)."""
    held = len(text) - len(text.rstrip(INCOMPLETE))
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                held = max(held, n)
                break
    return held


class Reply:
    def __init__(self, tokenizer: Any, ends: Collection[int], max_tokens: int, stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.ends, self.max_tokens = tokenizer, set(ends), max_tokens
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already shown
        self.generated = 0  # tokens decoded, the end-of-turn token included
        self.finish: str | None = None  # "stop" or "length" once the reply has ended

    def add(self, token: int) -> str:
        """The text to show after `token` (maybe empty); sets `finish` when the reply ends with it."""
        self.generated += 1
        if token in self.ends:
            self.finish = "stop"
            return self._show(len(self.text))
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        found = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if found:
            self.finish = "stop"
            self.text = self.text[: min(found)]
            return self._show(len(self.text))
        if self.generated >= self.max_tokens:
            self.finish = "length"
            return self._show(len(self.text))
        return self._show(len(self.text) - _held(self.text, self.stops))

    def _show(self, end: int) -> str:
        piece = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece
