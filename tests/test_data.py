from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.errors import CalibrationDataError
from exporter.masking.data import collate, read_samples, select_samples, tokenize
from exporter.recipe.schema import DataSpec
from tests.conftest import tiny_tokenizer


def spec(path: Path, **kw) -> DataSpec:  # type: ignore[no-untyped-def]
    base = {"path": str(path), "prompt_field": "q", "response_field": "a", "max_samples": 2}
    return DataSpec(**(base | kw))


def test_formats_read_the_same_samples(tmp_path: Path) -> None:
    rows = [{"q": "hello there", "a": "hi"}, {"q": "how are you", "a": "fine"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.csv").write_text("q,a\nhello there,hi\nhow are you,fine\n")
    (tmp_path / "d2.json").write_text(json.dumps({"data": rows}))
    got = [read_samples(spec(tmp_path / n)) for n in ("d.json", "d.jsonl", "d.csv", "d2.json")]
    assert all(g == got[0] for g in got)
    assert got[0][1].prompt == "how are you" and got[0][1].response == "fine"


def test_text_format_is_one_sample_per_paragraph(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("first para\nstill first\n\nsecond\n")
    samples = read_samples(DataSpec(path=str(tmp_path / "t.txt"), max_samples=1))
    assert [s.response for s in samples] == ["first para\nstill first", "second"]
    assert samples[0].prompt is None


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("", "e.jsonl", "holds no records"),
        ('{"q": "x", "a": "y"}\n{oops\n', "m.jsonl", r"m\.jsonl:2: not valid JSON"),
        ('[{"q": "x"}]', "f.json", r"record 0 has no text field 'a'"),
        ('[{"q": "x", "a": ""}]', "g.json", r"record 0 has 'a' blank"),
        ("[1, 2]", "h.json", "record 0 is a int"),
        ('"text"', "i.json", "expected a JSON list"),
        ("{broken", "j.json", "not valid JSON"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, name: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(CalibrationDataError, match=message):
        read_samples(spec(tmp_path / name))


def test_missing_file_and_too_few_samples(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match="does not exist"):
        read_samples(spec(tmp_path / "none.jsonl"))
    (tmp_path / "d.jsonl").write_text('{"q": "x", "a": "y"}\n')
    with pytest.raises(CalibrationDataError, match="max_samples is 2 but the file holds 1"):
        select_samples(spec(tmp_path / "d.jsonl"))


def test_selection_is_seeded(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(50)))
    a = select_samples(spec(tmp_path / "d.jsonl", max_samples=10, seed=1))
    b = select_samples(spec(tmp_path / "d.jsonl", max_samples=10, seed=1))
    c = select_samples(spec(tmp_path / "d.jsonl", max_samples=10, seed=2))
    assert a == b and a != c and len(a) == 10


def test_tokenize_marks_the_response(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    from exporter.masking.data import Sample

    s = Sample("plan a trip", "read a book alone")
    t = tokenize(tok, s, spec(tmp_path / "x.jsonl", max_tokens=64))
    assert tok.decode(t.input_ids[: t.response_start]).endswith("<|assistant|>")
    assert tok.decode(t.input_ids[t.response_start :]).startswith("read a book alone")
    plain = tokenize(tok, s, spec(tmp_path / "x.jsonl", chat_template=False, max_tokens=64))
    assert tok.decode(plain.input_ids[plain.response_start :]) == "read a book alone"
    with pytest.raises(CalibrationDataError, match="leaving no response token"):
        tokenize(tok, Sample("plan " * 40, "x"), spec(tmp_path / "x.jsonl", max_tokens=8))


def test_collate_excludes_padding_and_prompt(tmp_path: Path) -> None:
    from exporter.masking.data import TokenizedSample

    ids, attn, weight = collate([TokenizedSample([5, 6, 7, 8], 2), TokenizedSample([5, 9], 1)], 0, True)
    assert ids.tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert weight.tolist() == [[False, False, True, True], [False, True, False, False]]
    _, _, everything = collate([TokenizedSample([5, 6, 7], 2)], 0, False)
    assert everything.tolist() == [[True, True, True]]
