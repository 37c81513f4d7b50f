"""The recipe's optional `push:` section (see exporter/publish/hub.py): where and how each persona is published.

The rules for a destination (repo ids, branch, where ONNX goes) are written here once, for the recipe and for
`persona-export push`'s options alike.

push:
  repo_id: my-org/smollm2-{persona}   # "{persona}" becomes each persona's name
  private: true
  revision: main                      # a branch; created when missing
  create_pr: false
  commit_message: "Add the {persona} persona"
  onnx: same-repo                     # same-repo (onnx/ subfolder) | separate-repo | none
  onnx_repo_id: my-org/smollm2-{persona}-onnx   # separate-repo only; default "<repo_id>-onnx"
"""

from __future__ import annotations

import re
import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

OnnxMode = Literal["same-repo", "separate-repo", "none"]
# used with fullmatch: `$` would also accept a trailing newline
BRANCH = re.compile(r"(?!.*\.\.)(?!refs/)[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")


def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a Hub model id "OWNER/NAME", or None when it is one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    example = "e.g. my-org/smollm2-135m-introvert"
    if repo_id.count("/") != 1:
        return f"{repo_id!r} is not of the form OWNER/NAME ({example})"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return (
            f"{repo_id!r} is not a valid Hub repo id: use letters, digits, '-', '_' and '.', at most 96 "
            f"characters per part, no '--' or '..', not ending in '.git' ({example})"
        )
    return None


def branch_problem(name: str) -> str | None:
    """Why `name` is not a branch to push to, or None when it is one."""
    if BRANCH.fullmatch(name):
        return None
    return f"{name!r} is not a branch name (letters, digits, '.', '_', '-', '/'; e.g. 'main' or 'v1')"


def onnx_repo_problem(repo_id: str, onnx: OnnxMode, onnx_repo_id: str | None, onnx_key: str) -> str | None:
    """Why the ONNX destination does not fit the checkpoint's repo; `onnx_key` names the option in the message."""
    if onnx == "separate-repo":
        if (onnx_repo_id or f"{repo_id}-onnx") == repo_id:
            return f"the ONNX repo {repo_id!r} is the checkpoint's repo; use {onnx_key} same-repo"
    elif onnx_repo_id:
        return f"an ONNX repo id is used only with {onnx_key} separate-repo; remove it or set that mode"
    return None


def fill(template: str, persona: str) -> str:
    """Replace `{persona}`; any other `{...}` field is an error."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if fields - {"persona"}:
        raise ValueError(f"{template!r}: only the '{{persona}}' placeholder is known, got {sorted(fields)}")
    return template.format(persona=persona)


def _check_template(template: str) -> str:
    problem = repo_id_problem(fill(template, "persona"))
    if problem:
        raise ValueError(problem)
    return template


class PushSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    repo_id: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    onnx: OnnxMode = "same-repo"
    onnx_repo_id: str | None = None
    below_floor: bool = False  # also push quantized formats measured below their quality floor

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        return _check_template(value)

    @field_validator("onnx_repo_id")
    @classmethod
    def _onnx_repo_id(cls, value: str | None) -> str | None:
        return None if value is None else _check_template(value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and (problem := branch_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("commit_message")
    @classmethod
    def _message(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.strip():
                raise ValueError("an empty commit message; remove the key to use the default one")
            fill(value, "persona")
        return value

    @model_validator(mode="after")
    def _onnx_repo(self) -> PushSpec:
        repo_id = fill(self.repo_id, "persona")
        onnx_repo_id = fill(self.onnx_repo_id, "persona") if self.onnx_repo_id else None
        if problem := onnx_repo_problem(repo_id, self.onnx, onnx_repo_id, "onnx:"):
            raise ValueError(problem)
        return self
