"""report.json as a typed record: verdicts computed from the figures, one layout, older schemas read, newer refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exporter.errors import ExportFolderError
from exporter.reports.checks import GgufCheck, OnnxCheck, QuantizedCheck
from exporter.reports.markdown import evaluation_markdown
from exporter.reports.persona import SCHEMA_VERSION, PersonaReport, load_report, write_report
from tests.helpers import REPO, gguf_file, make_evaluation, make_report, onnx_check, quantized_check


def test_status_is_computed_from_every_check(tmp_path: Path) -> None:
    data = make_report("introvert")
    data["verification"]["onnx"] = onnx_check(max_abs=0.5) | {"passed": True}  # the stored verdict is not believed
    report = PersonaReport.model_validate(data, strict=True)
    assert not report.passed and report.status == "failed"
    write_report(tmp_path, report)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["status"] == "failed" and written["schema_version"] == SCHEMA_VERSION
    assert written["verification"]["onnx"]["passed"] is False
    assert list(written)[:5] == ["schema_version", "persona", "description", "partner", "status"]
    assert load_report(tmp_path / "report.json").dump() == written


def test_a_check_is_written_in_the_layout_it_was_read_in(tmp_path: Path) -> None:
    """Verdicts sit where earlier releases wrote them (`passed` after the greedy figures of an ONNX check, first
    in the GGUF folder's entry), and a quantized format's `below_floor` follows its floor."""
    checks = {
        "onnx": onnx_check(),
        "onnx-int8": quantized_check(8, 0.99, persona_shift=-0.01, paired_items=16),
        "gguf": {"passed": True, "F16": gguf_file("model-f16.gguf", exact=True), "Q8_0": gguf_file("q8.gguf")},
    }
    data = make_report("introvert", **checks)
    report = PersonaReport.model_validate(data, strict=True)
    dumped = report.dump()["verification"]
    onnx = list(dumped["onnx"])
    assert onnx.index("passed") == onnx.index("greedy_divergences_are_near_ties") + 1 and onnx[-1] == "decode_steps"
    int8 = list(dumped["onnx-int8"])
    assert int8.index("below_floor") == int8.index("floor") + 1 and int8[-1] == "passed"
    assert list(dumped["gguf"]) == ["passed", "F16", "Q8_0"]
    assert isinstance(report.check("onnx", OnnxCheck), OnnxCheck)
    assert isinstance(report.check("onnx-int8", QuantizedCheck), QuantizedCheck)
    gguf = report.check("gguf", GgufCheck)
    assert gguf is not None and gguf.files["F16"].passed and gguf.files["Q8_0"].below_floor is False


@pytest.mark.parametrize(
    ("figures", "below"),
    [({}, False), ({"top1_agreement": 0.96}, True), ({"ppl_ratio": 1.06}, True), ({"persona_shift": 0.04}, True)],
)
def test_below_floor_is_judged_from_the_figures_and_the_floor(figures: dict[str, float], below: bool) -> None:
    check = quantized_check(8, 0.99, persona_shift=-0.01, paired_items=16) | figures | {"below_floor": not below}
    assert QuantizedCheck.model_validate(check, strict=True).below_floor is below


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": SCHEMA_VERSION + 1}, "newer than this persona-export reads"),
        ({"parameters": None}, "does not follow the report schema (parameters: "),
        ({"persona": None, "verification": None}, "does not follow the report schema"),
    ],
)
def test_reports_that_cannot_be_read_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    (tmp_path / "report.json").write_text(json.dumps(make_report("introvert") | change))
    with pytest.raises(ExportFolderError, match=message.replace("(", r"\(")):
        load_report(tmp_path / "report.json")


@pytest.mark.subprocess
def test_importing_the_pipeline_leaves_matplotlib_alone() -> None:
    import subprocess
    import sys

    code = (
        "import sys, exporter.cli, exporter.workflows.run, exporter.workflows.sweep, exporter.workflows.tune; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_an_older_report_reads_and_is_rewritten_in_this_layout(tmp_path: Path) -> None:
    """Schema 3 and 4 reports read as they are (each check in the layout it has had since; 5 adds a composite's
    `mix`, absent from a pole's report); schemas 1 and 2 also lack `warnings`, and their "onnx-int8" entry
    describes an onnx-int8/ folder of dynamic int8 weights that nothing reads: it is left out. Before schema 6 a
    report has no `generation`: its exports ship plain greedy decoding. Written again, a report takes this
    schema's number."""
    data = make_report("introvert", onnx=onnx_check())
    old_int8 = {"max_abs_logit_diff": 0.2, "top1_agreement": 0.9, "parity_target": False, "passed": True}
    for version in (1, 2, 3, 4, 5):
        dropped = ("generation",) if version >= 3 else ("generation", "warnings")
        old = {k: v for k, v in data.items() if k not in dropped} | {"schema_version": version}
        if version < 3:
            old["verification"] = {**data["verification"], "onnx-int8": old_int8}
        (tmp_path / "report.json").write_text(json.dumps(old))
        report = load_report(tmp_path / "report.json")
        assert report.schema_version == version and report.warnings == [] and report.passed
        assert list(report.verification) == ["hf", "onnx"] and report.generation.greedy
        write_report(tmp_path, report)
        written = json.loads((tmp_path / "report.json").read_text())
        assert written["schema_version"] == SCHEMA_VERSION == 6
        assert written["generation"] == {"repetition_penalty": 1.0}


def verdict_depth_report(persona: str) -> PersonaReport:
    """A report whose evaluation holds the verdict depth: one random seed, 16 of 40 reply prompts."""
    report = make_report(persona)
    ev = make_evaluation(shift=0.63)
    ci = {"mean": 0.1, "ci95": [0.02, 0.18]}
    random = {"condition": "random mask (1 seed)", "parameters_removed": 5000, "fraction_removed": 0.25,
              "paired": {"margin": ci, "accuracy": ci, "shift": ci, "n": 8}}  # fmt: skip
    degeneration = {"repeated_4grams": 0.01, "distinct_2": 0.9, "cut_at_max_tokens": 0.5, "empty": 0.0}
    replies = {"prompts": 16, "max_new_tokens": 64, "opposite": "extravert", "examples": [], "gap": {"export": ci},
               "conditions": {c: {"score": ci, "degeneration": degeneration} for c in ("dense", "export")}}  # fmt: skip
    acceptance = {"shift": 0.63, "random_shift": 0.1, "random_movement": 0.1, "shift_over_random": 6.3,
                  "perplexity_ratio": None, "checks": {"shift >= 3.0 x random movement": True}}  # fmt: skip
    ev |= {"depth": "verdict", "random_seeds": [0], "rows": [*ev["rows"], random], "replies": replies}
    ev["acceptance"] = acceptance
    ev["splits"] = {"replies": {"file": {"path": "p.txt", "sha256": "0" * 64}, "total": 80, "held_out": True,
                                "selected": 16, "seed": 0, "line_indices": list(range(16)), "full_depth": 40}}  # fmt: skip
    report["evaluation"] = ev
    return PersonaReport.model_validate(report)


def test_reports_say_which_depth_they_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    text = evaluation_markdown("introvert", verdict_depth_report("introvert").evaluation)  # type: ignore[arg-type]
    assert (
        "- Depth: verdict (dense, prompt-only, the export, 1 random mask of its size, greedy replies to 16 of 40 "
        in text
    )
    assert "every reply prompt and the replies as the exports ship them" in text
    assert "`persona-export eval RUN_DIR --full` adds every ablation" in text
    assert "random-mask movement 0.100 (its one seed's |shift|; ratio 6.3)" in text
    assert "Verdict depth: 16 of the 40 prompts the full depth answers, so each interval is about 1.58 x" in text
    # the first command ends with the verdict, then the depth and the command for the full one
    import exporter.workflows.run as run_module
    from exporter.cli import main

    reports = {p: verdict_depth_report(p) for p in ("introvert", "extravert")}
    for p in reports:
        (tmp_path / "out" / p).mkdir(parents=True)
    summary = {"reports": reports, "personas": {p: "passed" for p in reports}}
    monkeypatch.setattr(run_module, "run", lambda *args, **kwargs: summary)
    recipe = REPO / "recipes" / "minimal.yaml"
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-3:]
    assert [line.split(":")[0] for line in last] == ["introvert", "extravert", "evaluation depth"]
    assert f"`persona-export eval {tmp_path / 'out'} --full` adds every ablation" in last[2]
