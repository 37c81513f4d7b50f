"""The package's architecture as docs/architecture.md draws it: imports run one way between the subpackages."""

from __future__ import annotations

import re

from tests.helpers import REPO

ORDER = ["errors", "io", "inputs", "quiet", "recipe", "reports", "model", "masking", "folders", "runtime"]
ORDER += ["serve", "publish", "export", "verify", "evaluation", "stages", "workflows", "cli"]


def test_a_package_imports_only_from_those_before_it() -> None:
    rank = {name: i for i, name in enumerate(ORDER)}
    upward = []
    for path in sorted((REPO / "exporter").rglob("*.py")):
        parts = path.relative_to(REPO / "exporter").with_suffix("").parts
        here = parts[0]
        if here in ("__init__", "__main__"):
            continue
        assert here in rank, f"exporter/{here} is not in the layout; add it to ORDER and to docs/architecture.md"
        for dep in re.findall(r"^\s*from exporter\.(\w+)", path.read_text(), re.M):
            if rank[dep] > rank[here]:
                upward.append(f"{path.relative_to(REPO)} imports exporter.{dep}")
    assert not upward, upward


def test_the_architecture_page_draws_every_folder() -> None:
    drawing = (REPO / "docs" / "architecture.md").read_text()
    folders = sorted(p.name for p in (REPO / "exporter").iterdir() if (p / "__init__.py").is_file())
    assert folders and all(f"\n  {name}/" in drawing for name in folders), folders


def test_no_workflow_imports_another() -> None:
    """A command's workflow composes the packages below it; what two commands share lives there, not in a workflow."""
    imports = {
        path.name: re.findall(r"^\s*from exporter\.workflows\.(\w+)", path.read_text(), re.M)
        for path in sorted((REPO / "exporter" / "workflows").glob("*.py"))
    }
    assert len(imports) > 3 and not {name: found for name, found in imports.items() if found}
