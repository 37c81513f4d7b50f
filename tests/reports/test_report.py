"""report.json as a typed record: `status` computed from the checks, one layout, newer schemas refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.errors import ExportFolderError
from exporter.reports.persona import SCHEMA_VERSION, PersonaReport, load_report, write_report
from tests.helpers import REPO, make_report


def test_status_is_computed_from_every_check(tmp_path: Path) -> None:
    data = make_report("introvert")
    data["verification"]["onnx"] = {"max_abs_logit_diff": 0.5, "passed": False}
    report = PersonaReport.model_validate(data)  # the stored "passed" is not believed
    assert not report.passed and report.status == "failed"
    write_report(tmp_path, report)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["status"] == "failed" and written["schema_version"] == SCHEMA_VERSION
    assert list(written)[:5] == ["schema_version", "persona", "description", "partner", "status"]
    assert load_report(tmp_path / "report.json").dump() == written
    data["verification"]["onnx"] = {"top1_agreement": 0.9}  # no verdict never counts as passed
    assert PersonaReport.model_validate(data).status == "failed"


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


def test_report_warnings_are_part_of_the_schema() -> None:
    assert SCHEMA_VERSION >= 2 and PersonaReport.model_fields["warnings"].default == []


def test_an_older_report_reads_as_written_and_is_rewritten_in_this_layout(tmp_path: Path) -> None:
    """Schema 3 added the weight-only formats and gguf to `verification`, schema 4 the shipped decoding
    (`generation`); a schema 1, 2 or 3 report still reads (`warnings` defaults to none, `generation` to plain
    greedy, which is what those exports ship), its old "onnx-int8" entry kept as a record of what was checked."""
    data = make_report("introvert") | {"schema_version": 2}
    data["verification"]["onnx-int8"] = {"max_abs_logit_diff": 0.2, "passed": True}
    for version in (1, 2, 3):
        old = {k: v for k, v in data.items() if k not in ("warnings", "generation")} | {"schema_version": version}
        (tmp_path / "report.json").write_text(json.dumps(old))
        report = load_report(tmp_path / "report.json")
        assert report.schema_version == version and report.warnings == [] and report.passed
        assert report.verification["onnx-int8"].figures == data["verification"]["onnx-int8"]
        assert report.generation.greedy
    assert SCHEMA_VERSION == 4
