"""Model inputs, written once: a chat as token ids (the chat template when the tokenizer has one, else plain
text), and the position ids of a padded batch.

Two definitions of a reply's tokens exist, on purpose, and each caller names its own (`end_of_turn`):
calibration counts the template's end-of-turn tokens after the reply as response tokens; evaluation scores
only the reply's content tokens. Two prompt encodings likewise: `prompt_ids` (the chat runner and the
verification prompts) and `reply_prefix` (the evaluation, which scores what follows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from exporter.errors import CalibrationDataError

Messages = list[dict[str, str]]
Mask = TypeVar("Mask")  # a torch.Tensor or a numpy array of 0/1


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages(prompt: str | None, system: str | None = None) -> Messages:
    """The chat before the reply: the system prompt when given, the user's prompt when there is one."""
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": prompt}] if prompt is not None else msgs


def prompt_ids(tokenizer: Any, chat: Messages) -> list[int]:
    """Token ids that ask for the next assistant turn; without a template, the turns' text joined by lines."""
    if has_template(tokenizer):
        return list(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
    return list(tokenizer("\n".join(m["content"] for m in chat))["input_ids"])


def reply_prefix(tokenizer: Any, prompt: str | None, system: str | None = None) -> list[int]:
    """The tokens before the assistant's reply as the evaluation writes them: what a model is given to reply
    to (eval.replies), and what encode_reply puts before the reply's content tokens. Without a template:
    "system\\n\\nprompt\\n", or BOS alone."""
    if has_template(tokenizer):
        head = tokenizer.apply_chat_template(messages(prompt, system), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(head, add_special_tokens=False)["input_ids"])
    return _plain_prefix(tokenizer, prompt, system)


def _plain_prefix(tokenizer: Any, prompt: str | None, system: str | None) -> list[int]:
    text = (system + "\n\n" if system else "") + (prompt + "\n" if prompt is not None else "")
    prefix = list(tokenizer(text)["input_ids"]) if text else []
    if not prefix and tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id]
    return prefix


def encode_reply(
    tokenizer: Any,
    prompt: str | None,
    reply: str,
    system: str | None = None,
    *,
    end_of_turn: bool,
    template: bool = True,
) -> tuple[list[int], int]:
    """(ids, start): the chat and the reply as one sequence; ids[start:] are the reply's tokens.

    With `end_of_turn` the template's tokens closing the reply are part of it; without, the sequence ends with
    the reply's last content token. `template=False` (or a tokenizer without one) uses plain text:
    "system\\n\\nprompt\\n" then the reply.
    """
    if template and has_template(tokenizer):
        chat = messages(prompt, system)
        turn = [*chat, {"role": "assistant", "content": reply}]
        if end_of_turn:
            prefix = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))
            ids = list(tokenizer.apply_chat_template(turn, tokenize=True))
            if ids[: len(prefix)] != prefix:
                raise CalibrationDataError(
                    "the tokenizer's chat template does not render the prompt as a prefix of prompt + response; "
                    "set calibration.chat_template: false for this model"
                )
            return ids, len(prefix)
        head = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(turn, tokenize=False)
        at = full.find(reply, len(head))
        if not full.startswith(head) or at < 0:
            raise CalibrationDataError("the chat template does not render the answer after the prompt verbatim")
        prefix = reply_prefix(tokenizer, prompt, system)
        ids = list(tokenizer(full[: at + len(reply)], add_special_tokens=False)["input_ids"])
        if ids[: len(prefix)] != prefix:
            raise CalibrationDataError("the chat template's prompt does not tokenize as a prefix of prompt + answer")
        return ids, len(prefix)
    prefix = _plain_prefix(tokenizer, prompt, system)
    return prefix + list(tokenizer(reply, add_special_tokens=False)["input_ids"]), len(prefix)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token the chat template puts right after an assistant message (SmolLM2: <|im_end|>); EOS without
    a template."""
    if not has_template(tokenizer):
        return tokenizer.eos_token_id
    marker = "Zq9"
    text = tokenizer.apply_chat_template([*messages("x"), {"role": "assistant", "content": marker}], tokenize=False)
    tail = text[text.rfind(marker) + len(marker) :]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    return int(ids[0]) if ids else tokenizer.eos_token_id


def position_ids(attention_mask: Mask) -> Mask:
    """Positions of a padded batch as transformers' `generate` makes them: tokens counted from 0, padding 1."""
    pos = attention_mask.cumsum(-1) - 1  # type: ignore[attr-defined]
    pos[attention_mask == 0] = 1
    return pos  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Scored:
    """A token sequence whose tokens [start, len) are scored."""

    ids: list[int]
    start: int


def encode_answer(
    tokenizer: Any, prompt: str | None, answer: str, *, system: str | None = None, max_tokens: int = 256
) -> Scored:
    """Prompt (+ system prompt) and answer as one chat; the answer's content tokens are scored (not the
    template's end-of-turn tokens)."""
    ids, n_prefix = encode_reply(tokenizer, prompt, answer, system, end_of_turn=False)
    start = max(n_prefix, 1)  # the first token of a sequence has no prediction
    ids = ids[:max_tokens]
    if len(ids) <= start:
        raise CalibrationDataError(
            f"a prompt fills all {max_tokens} tokens (eval.max_tokens), leaving no answer token; raise max_tokens"
        )
    return Scored(ids, start)
