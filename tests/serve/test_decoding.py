"""Decoding rows together and a reply's text, without the HTTP side: a row of a batch gives the logits it gives
alone, whenever it joins or the others leave; pieces of text are shown only once they cannot change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.runtime.decoders import OrtBatch, TorchRows
from exporter.runtime.onnx import OnnxCausalLM
from exporter.runtime.reply import Reply
from tests.helpers import tiny_model, tiny_tokenizer

PROMPTS = [list(range(10, 40)), list(range(50, 58)), list(range(100, 151))]  # 30, 8 and 51 tokens


@pytest.fixture
def onnx_dir(run: Path) -> Path:
    return run / "introvert" / "onnx"


def alone(model: OnnxCausalLM, ids: list[int], tokens: list[int]) -> list[np.ndarray]:
    """The logits of `ids` then each of `tokens`, decoded as the only row."""
    batch = OrtBatch(model)
    out = [batch.add(ids, len(tokens))]
    out += [batch.step([t])[0] for t in tokens]
    return out


def test_rows_joining_and_leaving_get_the_logits_they_get_alone(onnx_dir: Path) -> None:
    model = OnnxCausalLM.from_dir(onnx_dir)
    rng = np.random.default_rng(0)
    feeds = [rng.integers(10, 300, 12).tolist() for _ in PROMPTS]  # tokens fed to each row after its prompt
    want = [alone(model, ids, feed) for ids, feed in zip(PROMPTS, feeds, strict=True)]
    batch = OrtBatch(model)
    got: list[list[np.ndarray]] = [[] for _ in PROMPTS]
    rows: list[int] = []  # prompt index of each row, in row order
    fed = [0, 0, 0]
    for step in range(30):
        if step in (0, 2, 3):  # the rows join at different steps, with prompts of different lengths
            p = (0, 2, 1)[(0, 2, 3).index(step)]
            got[p].append(batch.add(PROMPTS[p], 12))
            rows.append(p)
        if step == 6:  # the longest row leaves early: the padding only it needed is cut
            width = batch.mask.shape[1]
            batch.remove(rows.index(2))
            rows.remove(2)
            assert batch.mask.shape[1] < width and batch.mask[:, 0].any()
        for p in [p for p in rows if fed[p] == len(feeds[p])]:  # a row fed everything leaves
            batch.remove(rows.index(p))
            rows.remove(p)
        if not rows:
            break
        tokens = [feeds[p][fed[p]] for p in rows]
        for p, logits in zip(rows, batch.step(tokens), strict=True):
            got[p].append(logits)
            fed[p] += 1
    assert fed[0] == fed[1] == 12 and batch.rows == 0
    for p in range(len(PROMPTS)):
        n = len(got[p])
        assert n >= 5
        diff = max(float(np.abs(a - b).max()) for a, b in zip(got[p], want[p][:n], strict=True))
        assert diff < 1e-4, f"row {p}: max |logit difference| {diff:.2e} against decoding it alone"
    assert all(p.shape[0] == 0 for p in batch.past) and batch.mask.shape == (0, 0)


def test_torch_rows_are_independent() -> None:
    torch_rows = TorchRows(tiny_model("llama"))
    first = torch_rows.add(PROMPTS[0], 4)
    torch_rows.add(PROMPTS[1], 4)
    both = torch_rows.step([7, 8])
    torch_rows.remove(1)
    solo = TorchRows(tiny_model("llama"))
    assert np.allclose(solo.add(PROMPTS[0], 4), first, atol=1e-5)
    assert np.allclose(solo.step([7])[0], both[0], atol=1e-5)
    assert torch_rows.rows == 1


class Bytes:
    """A tokenizer whose tokens are single bytes of UTF-8 (so a character can be cut between tokens)."""

    eos_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def feed(reply: Reply, text: str) -> list[str]:
    return [reply.add(b) for b in text.encode()]


def test_a_reply_holds_back_a_cut_character_and_a_possible_stop_sequence() -> None:
    reply = Reply(Bytes(), {0}, 100, stops=["END"])
    pieces = feed(reply, "né E")
    assert pieces == ["n", "", "é", " ", ""]  # é is two bytes; "E" may start "END"
    assert feed(reply, "x") == ["Ex"] and reply.finish is None
    assert feed(reply, "EN") == ["", ""]
    assert reply.add(ord("D")) == "" and reply.finish == "stop"
    assert reply.text == "né Ex"


def test_a_reply_ends_at_the_end_token_or_its_budget_showing_what_was_held() -> None:
    reply = Reply(Bytes(), {0}, 100, stops=["END"])
    assert feed(reply, "aE") == ["a", ""]
    assert reply.add(0) == "E" and reply.finish == "stop" and reply.generated == 3
    cut = Reply(Bytes(), {0}, 3, stops=["END"])
    assert feed(cut, "xyE") == ["x", "y", "E"] and cut.finish == "length"


def test_a_reply_decodes_a_real_tokenizer_piece_by_piece() -> None:
    tok: Any = tiny_tokenizer()
    ids = tok("quiet party music and dance")["input_ids"]
    reply = Reply(tok, {tok.eos_token_id}, len(ids) + 1, stops=["dance"])
    shown = "".join(reply.add(t) for t in ids)
    assert reply.finish == "stop" and shown == "quiet party music and "
