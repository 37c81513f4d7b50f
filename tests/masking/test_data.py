from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.cli import main
from exporter.errors import CalibrationDataError
from exporter.evaluation.items import EvalDataError
from exporter.masking.data import collate, read_samples, select_samples, tokenize
from exporter.recipe.schema import DataSpec
from tests.helpers import edited_recipe, expect, point_eval_at, tiny_tokenizer, with_eval


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
    with pytest.raises(CalibrationDataError, match=r"file not found: .*none\.jsonl"):
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


# -- files a spreadsheet writes, and bad files through the one records reader (calibration, eval, replies) --

ROWS = [{"prompt": f"question {i}", "answer": f"reply {i}, with a comma"} for i in range(3)]


def _csv(rows: list[dict[str, str]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["prompt", "answer"], lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


SPREADSHEET = {
    "csv": ("d.csv", _csv(ROWS)),
    "jsonl": ("d.jsonl", "".join(json.dumps(r) + "\r\n" for r in ROWS)),
    "json": ("d.json", json.dumps(ROWS, indent=1).replace("\n", "\r\n")),
    "json-object": ("d.json", json.dumps({"rows": ROWS}, indent=2).replace("\n", "\r\n")),
}


@pytest.mark.parametrize("bom", [True, False], ids=["bom", "no-bom"])
@pytest.mark.parametrize("fmt", sorted(SPREADSHEET))
def test_bom_and_crlf_files_read_as_plain_ones(fmt: str, bom: bool, tmp_path: Path) -> None:
    name, text = SPREADSHEET[fmt]
    path = tmp_path / name
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    spec = DataSpec(path=str(path), prompt_field="prompt", response_field="answer", max_samples=1)
    samples = read_samples(spec)
    assert [(s.prompt, s.response) for s in samples] == [(r["prompt"], r["answer"]) for r in ROWS]


def test_a_text_file_with_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("\ufefffirst paragraph\r\nstill first\r\n\r\nsecond\r\n".encode())
    samples = read_samples(DataSpec(path=str(path), max_samples=1))
    assert [s.response for s in samples] == ["first paragraph\nstill first", "second"]


DATA_CASES: list[tuple[str, str, bytes, str]] = [
    # (id, file name, content, message); the file is used as calibration data and as eval data
    ("not-utf8", "x.jsonl", b'{"prompt": "a", "introvert": "\xff\xfe"}\n', "not UTF-8 text"),
    ("latin1-csv", "x.csv", "prompt,introvert\ncaf\xe9,ol\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ("bad-json", "x.json", b'[{"prompt": "a", "introvert": "b"', "not valid JSON"),
    ("bad-jsonl-line", "x.jsonl", b'{"prompt": "a", "introvert": "b"}\n{"prompt": \n', "x.jsonl:2: not valid JSON"),
    ("json-scalar", "x.json", b"42", "expected a JSON list"),
    ("csv-extra-cell", "x.csv", b"prompt,introvert\na,b,c\n", "row 1 (after the header) has 3 cells but the header"),
    ("csv-extra-cells", "x.csv", b"prompt,introvert\na,b\nc,d,e,f\n", "row 2 (after the header) has 4 cells"),
    ("csv-short-row", "x.csv", b"prompt,introvert\na\n", "has 'introvert' set to null (or an empty CSV cell)"),
    ("null-field", "x.jsonl", b'{"prompt": "a", "introvert": null}\n', "has 'introvert' set to null"),
    ("number-field", "x.jsonl", b'{"prompt": "a", "introvert": 3}\n', "has 'introvert' as a int (3), expected text"),
    ("list-field", "x.jsonl", b'{"prompt": ["a"], "introvert": "b"}\n', "has 'prompt' as a list"),
    ("blank-field", "x.jsonl", b'{"prompt": "a", "introvert": "  "}\n', "has 'introvert' blank"),
]


@pytest.mark.parametrize("where", ["calibration", "eval"])
@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
@pytest.mark.usefixtures("no_model_load")
def test_bad_data_files_through_one_reader(
    case: tuple[str, str, bytes, str],
    where: str,
    tmp_path: Path,
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    _, name, content, message = case
    bad = tmp_path / name
    bad.write_bytes(content)

    def edit(d: dict[str, Any], t: Path) -> None:
        if where == "calibration":
            d["personas"]["introvert"]["calibration"].update(path=str(bad), max_samples=1)
        else:
            point_eval_at(d, bad)

    recipe = edited_recipe(tmp_path, tiny_llama_dir, edit)
    error = CalibrationDataError if where == "calibration" else EvalDataError
    text = expect(["validate", str(recipe)], error, message, capsys)
    key = "personas.introvert.calibration.path: " if where == "calibration" else "eval.paired.path: "
    assert text.startswith(key) or (where == "eval" and "record" in text)


PROMPTS = "How was your weekend?\nWhat should I cook tonight?\nAny plans for the holidays?\n"


REPLY_FILES: list[tuple[str, Callable[[Path], Path], str | None]] = [
    ("plain", lambda t: _write(t / "p.txt", PROMPTS.encode()), None),
    ("bom-crlf", lambda t: _write(t / "p.txt", b"\xef\xbb\xbf" + PROMPTS.replace("\n", "\r\n").encode()), None),
    ("latin-1", lambda t: _write(t / "p.txt", "Caf\xe9 or tea?\n".encode("latin-1")), "not UTF-8 text"),
    ("empty", lambda t: _write(t / "p.txt", b""), "holds no records"),
    ("folder", lambda t: (t / "adir").mkdir() or t / "adir", "is a folder, not a regular file"),
    ("fifo", lambda t: os.mkfifo(t / "pipe") or t / "pipe", "is a named pipe (FIFO), not a regular file"),
    ("missing", lambda t: t / "none.txt", "file not found"),
]


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", REPLY_FILES, ids=[c[0] for c in REPLY_FILES])
@pytest.mark.usefixtures("no_model_load")
def test_reply_prompt_files_are_read_by_the_one_reader(
    case: tuple[str, Callable[[Path], Path], str | None],
    tmp_path: Path,
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    _, make, message = case
    path = make(tmp_path)
    recipe = edited_recipe(tmp_path, tiny_llama_dir, with_eval(replies={"path": str(path)}))
    if message is None:
        assert expect_valid(recipe, capsys)
        return
    text = expect(["validate", str(recipe)], EvalDataError, message, capsys)
    assert text.startswith("eval.replies.path: ")


def expect_valid(recipe: Path, capsys: pytest.CaptureFixture) -> bool:

    code = main(["validate", str(recipe)])
    return code == 0 and "valid" in capsys.readouterr().out


def test_a_data_file_larger_than_read_whole_is_refused_from_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter.masking import data

    monkeypatch.setattr(data, "MAX_DATA_BYTES", 100)
    (tmp_path / "big.jsonl").write_text('{"q": "x", "a": "y"}\n' * 10)
    with pytest.raises(
        CalibrationDataError, match=r"big\.jsonl holds 210 bytes; data files are read whole, at most 100"
    ):
        read_samples(spec(tmp_path / "big.jsonl"))
