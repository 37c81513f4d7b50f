"""A persona export's report.json as one typed record, `PersonaReport`, read and written only here.

Verdicts are not state of their own: each check's `passed` is computed from its figures
(exporter/reports/checks.py), and the report's `status` from its checks ("passed" only when every one passed),
so a report cannot claim more than its checks show. `schema_version` is bumped when the layout changes; a report
of a newer layout is refused with a message saying so, one of an older layout is read by `upgraded`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SerializeAsAny, ValidationError, computed_field, field_validator
from pydantic_core import PydanticCustomError

from exporter.errors import ExportFolderError
from exporter.inputs import folder_problem, read_json_object
from exporter.io import write_json
from exporter.recipe.formats import FORMATS
from exporter.recipe.schema import MethodSpec, PruneSpec
from exporter.reports.checks import CHECKS, Check
from exporter.reports.evaluation import PersonaEvaluation
from exporter.reports.record import Record

log = logging.getLogger(__name__)
# 2: `warnings`; 3: verification of the weight-only formats (onnx-int8 in ort-int8/, onnx-int4 in ort-int4/,
# with folder, bits, floor and below_floor) and gguf; 4: each check a typed record of its format's kind whose
# verdicts (`passed`, `below_floor`) are computed from its figures, not read back.
SCHEMA_VERSION = 4
FILE = "report.json"
C = TypeVar("C", bound=Check)


class BaseModelInfo(Record):
    name: str
    sha256: str
    license: str | None
    model_type: str
    weights: str  # "safetensors", or the GGUF file de-quantized by transformers


class RecipeRef(Record):
    name: str
    sha256: str


class CalibrationInfo(Record):
    path: str
    samples: int
    tokens_counted: int
    data_sha256: str
    statistic: str
    tokens: str


class Geometries(Record):
    dense: dict[str, int]
    pruned: dict[str, int]


class Parameters(Record):
    dense: int
    pruned: int
    ratio: float


class Sizes(Record):
    dense_weights: int
    pruned_weights_on_disk: int
    hf_folder: int
    ratio: float


class PersonaReport(Record):
    schema_version: int = SCHEMA_VERSION
    persona: str
    description: str
    partner: str | None
    base_model: BaseModelInfo
    recipe: RecipeRef
    method: MethodSpec
    prune: PruneSpec
    calibration: CalibrationInfo
    geometry: Geometries
    removed_per_layer: dict[str, list[list[int]]]  # unit kind -> per layer, the removed unit indices
    parameters: Parameters
    bytes: Sizes
    dtype: str
    loading: dict[str, Any]  # {"whole": true}, or the memory budget and accelerate's placement
    verification: dict[str, SerializeAsAny[Check]]  # format name -> its check (exporter/reports/checks.py)
    timings_s: dict[str, float]
    versions: dict[str, str]
    warnings: list[str] = Field(
        default_factory=list
    )  # what a reader must know that the checks do not fail on (e.g. nothing removed)
    evaluation: PersonaEvaluation | None = None  # added by the eval stage / `persona-export eval`

    @field_validator("verification", mode="before")
    @classmethod
    def _typed_checks(cls, value: Any) -> Any:
        """Each entry read as the check its format declares (an unknown format is refused)."""
        if not isinstance(value, dict):
            return value
        out = {}
        for name, check in value.items():
            if name not in FORMATS:
                raise PydanticCustomError("format", "unknown format {name}", {"name": repr(name)})
            try:
                out[name] = CHECKS[FORMATS[name].check].model_validate(check, strict=True)
            except ValidationError as exc:  # named with the entry's key path, as the rest of the report
                problems = "; ".join(f"{name}.{p}" for p in schema_problems(exc))
                raise PydanticCustomError("check", "{problems}", {"problems": problems}) from None
        return out

    def check(self, name: str, kind: type[C]) -> C | None:
        """The check of format `name`, of the kind its format declares; None when it was not checked."""
        found = self.verification.get(name)
        assert found is None or isinstance(found, kind), f"{name} holds a {type(found).__name__}"
        return found

    @property
    def passed(self) -> bool:
        """The checkpoint was verified, and so was every other format checked."""
        return "hf" in self.verification and all(c.passed for c in self.verification.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status(self) -> Literal["passed", "failed"]:
        return "passed" if self.passed else "failed"

    def dump(self) -> dict[str, Any]:
        """The JSON layout of this schema version: the fields in their order, `status` after `partner`, no
        `evaluation` until added."""
        data = self.model_dump()
        data["schema_version"] = SCHEMA_VERSION
        status = data.pop("status")
        keys = list(data)
        cut = keys.index("partner") + 1
        return {**{k: data[k] for k in keys[:cut]}, "status": status, **{k: data[k] for k in keys[cut:]}}


def upgraded(data: dict[str, Any], version: int, path: Path) -> dict[str, Any]:
    """A report of an older schema in this one's terms. Schemas 1 and 2 held an "onnx-int8" entry for an
    onnx-int8/ folder of dynamic int8 weights that no command reads, pushes or rebuilds any more: it is left
    out (the folder stays as it is). An evaluation in a layout this release does not read is left out too, with
    a warning: `persona-export eval` writes it again."""
    verification = data.get("verification")
    if version < 3 and isinstance(verification, dict) and "onnx-int8" in verification:
        log.info("%s (schema %d): its onnx-int8 entry (an older onnx-int8/ folder) is not read", path, version)
        data = {**data, "verification": {k: v for k, v in verification.items() if k != "onnx-int8"}}
    if data.get("evaluation") is not None:
        try:
            PersonaEvaluation.model_validate(data["evaluation"], strict=True)
        except ValidationError:
            log.warning("%s (schema %d): its evaluation has an older layout and is not read; run "
                        "`persona-export eval` on the run folder to write it again", path, version)  # fmt: skip
            data = {k: v for k, v in data.items() if k != "evaluation"}
    return data


def load_report(path: Path) -> PersonaReport:
    """Parse one report.json; a file that is not a persona report is an ExportFolderError naming the problem.

    Types are checked strictly: a `"true"` is not a verdict and a `"3"` not a count.
    """
    data = read_json_object(path, ExportFolderError, "re-run the export")
    if "persona" not in data:
        raise ExportFolderError(f"{path} is not a persona report; re-run the export")
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ExportFolderError(
            f"{path} has report schema {version}, newer than this persona-export reads ({SCHEMA_VERSION}); "
            "upgrade persona-export"
        )
    if isinstance(version, int) and version < SCHEMA_VERSION:
        data = upgraded(data, version, path)
    try:
        return PersonaReport.model_validate(data, strict=True)
    except ValidationError as exc:
        raise ExportFolderError(
            f"{path} does not follow the report schema ({'; '.join(schema_problems(exc)[:8])}); it was edited or "
            "not written by persona-export: re-run the export"
        ) from None


def schema_problems(exc: ValidationError) -> list[str]:
    """Each problem with its key path and, unless the key is missing, what was found."""
    out = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] == "missing":
            out.append(f"{where}: required key is missing")
        elif err["type"] == "format":  # a verification entry of no known format
            out.append(f"{where}: {err['msg']}")
        elif err["type"] == "check":  # a verification entry that does not follow its check's layout
            out.append(f"{where}.{err['msg']}")
        else:
            value = err.get("input")
            msg = err["msg"][:1].lower() + err["msg"][1:]
            out.append(f"{where}: {msg}, got {type(value).__name__} {value!r}"[:200])
    return out


def read_report(folder: Path) -> PersonaReport:
    """The report of the persona export in `folder`; refuses folders that are not persona exports."""
    report = folder / FILE
    if (problem := folder_problem(folder)) is not None:
        raise ExportFolderError(
            f"{problem}; pass a persona folder of a run, RUN_DIR/<persona>, e.g. runs/demo/introvert"
        )
    if not report.is_file() or not (folder / "hf" / "config.json").is_file():
        raise ExportFolderError(
            f"{str(folder)!r} is not a persona export (expected report.json and hf/config.json); pass "
            "RUN_DIR/<persona>, e.g. runs/demo/introvert"
        )
    return load_report(report)


def write_report(folder: Path, report: PersonaReport) -> None:
    """Replace `folder`/report.json in one rename."""
    write_json(folder / FILE, report.dump())
