"""A persona export's report.json as one typed record, `PersonaReport`, read and written only here.

The file's `status` is not state of its own: it is computed from the verification results ("passed" only
when every one passed), so a report cannot claim more than its checks show. `schema_version` is bumped when
the layout changes; a report of a newer layout is refused with a message saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, computed_field, field_serializer, model_validator
from pydantic_core import PydanticCustomError

from exporter.errors import ExportFolderError
from exporter.inputs import folder_problem, read_json_object
from exporter.io import write_json
from exporter.recipe.schema import MethodSpec, PruneSpec

# 2: `warnings`; 3: verification of the weight-only formats (onnx-int8 in ort-int8/, onnx-int4 in ort-int4/,
# with folder, bits, floor and below_floor) and gguf. An older report reads as it was written: its "onnx-int8"
# describes a folder onnx-int8/ that nothing reads any more, and `export --format` rewrites it in this layout.
SCHEMA_VERSION = 3
FILE = "report.json"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class Check(BaseModel):
    """One verification result ("hf", "onnx", "onnx-int8", "onnx-int4", "gguf", "onnx-genai"): figures that
    differ by format, and `passed`.

    The figures are kept as written, in their order; a result without a boolean `passed` never counts as
    passed. `below_floor` (quantized formats), which decides what is pushed, must be a boolean too.
    """

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _boolean_verdict(self) -> Check:
        for key in ("passed", "below_floor"):
            verdict = self.figures.get(key)
            if key in self.figures and not isinstance(verdict, bool):
                raise PydanticCustomError(
                    "verdict",
                    "must be true or false, got {kind} {value}",
                    {"kind": type(verdict).__name__, "value": repr(verdict), "key": key},
                )
        return self

    @property
    def figures(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def passed(self) -> bool | None:
        verdict = self.figures.get("passed")
        return verdict if isinstance(verdict, bool) else None


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
    verification: dict[str, Check]
    timings_s: dict[str, float]
    versions: dict[str, str]
    warnings: list[str] = []  # what a reader must know that the checks do not fail on (e.g. nothing removed)
    evaluation: dict[str, Any] | None = None  # added by the eval stage / `persona-export eval`

    @model_validator(mode="before")
    @classmethod
    def _computed_status(cls, data: Any) -> Any:
        """A stored `status` is not read: it is computed from the verification results."""
        return {k: v for k, v in data.items() if k != "status"} if isinstance(data, dict) else data

    @property
    def passed(self) -> bool:
        """The checkpoint was verified, and so was every other format checked."""
        return "hf" in self.verification and all(c.passed is True for c in self.verification.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status(self) -> Literal["passed", "failed"]:
        return "passed" if self.passed else "failed"

    @field_serializer("verification")
    def _figures(self, verification: dict[str, Check]) -> dict[str, dict[str, Any]]:
        return {name: check.figures for name, check in verification.items()}

    def dump(self) -> dict[str, Any]:
        """The JSON layout: the fields in their order, `status` after `partner`, no `evaluation` until added."""
        data = self.model_dump(exclude={"evaluation"} if self.evaluation is None else None)
        status = data.pop("status")
        keys = list(data)
        cut = keys.index("partner") + 1
        return {**{k: data[k] for k in keys[:cut]}, "status": status, **{k: data[k] for k in keys[cut:]}}


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
        elif err["type"] == "verdict":  # raised by Check for its `passed` and `below_floor` figures
            out.append(f"{where}.{err.get('ctx', {}).get('key', 'passed')}: {err['msg']}")
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
