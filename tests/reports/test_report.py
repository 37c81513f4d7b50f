"""report.json as a typed record: verdicts computed from the figures, one layout, older schemas read, newer refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.errors import ExportFolderError
from exporter.reports.checks import GgufCheck, OnnxCheck, QuantizedCheck
from exporter.reports.persona import SCHEMA_VERSION, PersonaReport, load_report, write_report
from tests.helpers import REPO, gguf_file, make_report, onnx_check, quantized_check


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
    `mix`, absent from a pole's report); schemas 1 and 2 also lack
    `warnings`, and their "onnx-int8" entry describes an onnx-int8/ folder of dynamic int8 weights that nothing
    reads: it is left out. Written again, a report takes this schema's number."""
    data = make_report("introvert", onnx=onnx_check())
    old_int8 = {"max_abs_logit_diff": 0.2, "top1_agreement": 0.9, "parity_target": False, "passed": True}
    for version in (1, 2, 3, 4):
        old = {k: v for k, v in data.items() if version >= 3 or k != "warnings"} | {"schema_version": version}
        if version < 3:
            old["verification"] = {**data["verification"], "onnx-int8": old_int8}
        (tmp_path / "report.json").write_text(json.dumps(old))
        report = load_report(tmp_path / "report.json")
        assert report.schema_version == version and report.warnings == [] and report.passed
        assert list(report.verification) == ["hf", "onnx"]
        write_report(tmp_path, report)
        assert json.loads((tmp_path / "report.json").read_text())["schema_version"] == SCHEMA_VERSION == 5
