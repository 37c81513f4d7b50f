"""The project's exception family. Every message says what is wrong, where, and how to fix it."""

from __future__ import annotations


class PersonaExportError(Exception):
    """Base class: the CLI prints these without a traceback and exits with `exit_code`."""

    exit_code = 2


class RecipeError(PersonaExportError):
    """A recipe (or a `key.path=value` override) is invalid."""


class CalibrationDataError(PersonaExportError):
    """A data file is missing, empty, malformed or lacks a field."""


class ModelSourceError(PersonaExportError):
    """A model cannot be found or loaded."""


class UnsupportedModelError(PersonaExportError):
    """The model's architecture has no registered adapter."""


class MaskError(PersonaExportError):
    """Masks cannot be computed as asked (e.g. too few units to remove disjointly)."""


class OutputError(PersonaExportError):
    """An output location exists, is not writable, or is not what a command expects."""


class HubError(PersonaExportError):
    """A push to the Hugging Face Hub was refused before sending, or the Hub (or the network) failed."""


class OnnxModelError(PersonaExportError):
    """An ONNX folder is missing, corrupt, or not a `text-generation-with-past` export."""


class OnnxExportError(PersonaExportError):
    """An ONNX export or quantization could not be produced."""


class ExportFolderError(PersonaExportError):
    """A folder given as a persona export is not one (no report.json, hf/, a mismatched tokenizer, or a checkpoint
    that does not match its config.json)."""


class GgufExportError(PersonaExportError):
    """A GGUF file could not be written, or the checkpoint holds what a GGUF file cannot carry."""
