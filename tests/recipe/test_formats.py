"""Export formats are declared once (exporter/recipe/formats.py) and every list of them is derived from there: the
recipe schema, `export --format`, `--backend`, the Hub push's subfolders."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from exporter.cli import BACKENDS, EXPORT_FORMATS, build_parser
from exporter.publish.hub import ONNX_FORMATS
from exporter.recipe.formats import ADDED, FORMAT_NAMES, FORMATS, folder_format
from exporter.recipe.schema import OutputSpec


def test_format_lists_are_derived_from_the_declarations() -> None:
    assert tuple(FORMATS) == FORMAT_NAMES and FORMAT_NAMES[0] == "hf"
    assert EXPORT_FORMATS == list(ADDED) == [n for n in FORMAT_NAMES if n != "hf"] and ONNX_FORMATS == ADDED
    assert BACKENDS == ["onnx", "onnx-int8", "onnx-int4", "onnx-genai", "onnx-q4", "torch"]
    parser = build_parser()
    assert all(parser.parse_args(["export", "run/p", "--format", n]).format == n for n in EXPORT_FORMATS)
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "run/p", "--format", "hf"])  # the checkpoint is written by `run`


def test_the_recipe_accepts_exactly_the_declared_names() -> None:
    assert OutputSpec(formats=list(FORMAT_NAMES)).formats == list(FORMAT_NAMES)
    names = ", ".join(f"'{n}'" for n in FORMAT_NAMES[:-1]) + f" or '{FORMAT_NAMES[-1]}'"
    with pytest.raises(ValidationError, match=re.escape(f"Input should be {names}")):
        OutputSpec(formats=["hf", "tflite"])  # type: ignore[list-item]


def test_no_folder_name_is_a_prefix_of_another() -> None:
    """optimum-onnx matches `subfolder` as a prefix of the Hub's file paths: onnx/ beside onnx-int8/ loaded int8."""
    folders = [f.folder for f in FORMATS.values()]
    assert len(set(folders)) == len(folders)
    assert not [(a, b) for a in folders for b in folders if a != b and b.startswith(a)]
    assert all(folder_format(f.folder) == n for n, f in FORMATS.items()) and folder_format("elsewhere") is None
