"""The README and docs/ stay true: relative links resolve (files and #anchors as GitHub renders them), the
commands the README names exist in the CLI, CI runs the README's test command, and the README's recipe
walkthrough is the shipped recipe file."""

from __future__ import annotations

import argparse
import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import yaml

from exporter.cli import build_parser, parse
from exporter.recipe.load import load_recipe
from exporter.workflows.validate import validate
from tests.helpers import REPO

README = REPO / "README.md"
PAGES = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
# Pages written alongside this one: a link to them may point at a file that is not there yet; once the file
# exists its link and anchors are checked like any other.
PENDING = {REPO / "docs" / "serving.md"}

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped, lower case, only letters, digits, marks, '_', '-'
    and spaces kept, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    kept = (c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return "".join(kept).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub makes for a page: one per heading (repeats get -1, -2, ...) and HTML anchors."""
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    found = set(HTML_ANCHOR.findall(text))
    for _, title in HEADING.findall(text):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            if dest not in PENDING:
                problems.append(f"{page.name}: {target}: no such file")
            continue
        if anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{page.name}: {target}: no heading with anchor #{anchor}")
    return problems


def test_the_slug_is_githubs() -> None:
    assert slug("CPU deployment against llama.cpp") == "cpu-deployment-against-llamacpp"
    assert slug("Where the evaluation's time goes") == "where-the-evaluations-time-goes"
    assert slug("`hf`: the proven checkpoint") == "hf-the-proven-checkpoint"
    assert slug("Models: parity and size") == "models-parity-and-size"
    assert slug("Results: persona strength on SmolLM2-135M") == "results-persona-strength-on-smollm2-135m"


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# B page\n\n## Part two\n\n## Part two\n")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md#part-two) [ok](b.md#part-two-1) [self](#a) [web](https://example.org/x)\n"
        "# A\n`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "[gone](missing.md) [bad anchor](b.md#part-three) ![img](pic.png)\n"
    )
    assert broken_links(page) == [
        "a.md: missing.md: no such file",
        "a.md: b.md#part-three: no heading with anchor #part-three",
        "a.md: pic.png: no such file",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README.read_text()))}
    pages = set((REPO / "docs").glob("*.md")) | PENDING
    assert sorted(p.name for p in pages - linked) == []


def bash_lines(first_only: bool) -> list[str]:
    """The commands of the README's ```bash blocks (or its first), one per line, comments dropped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.M | re.S)
    assert blocks, "README.md has no ```bash block"
    lines = [line.split(" #")[0].strip() for b in (blocks[:1] if first_only else blocks) for line in b.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def parse_readme(argv: list[str]) -> argparse.Namespace:
    try:
        return parse(argv)
    except SystemExit:
        pytest.fail(f"the CLI refuses the README's command: persona-export {shlex.join(argv)}")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def test_the_opening_commands_parse_and_ci_runs_the_test_command() -> None:
    install, run, tests = [], [], []
    for line in bash_lines(first_only=True):
        for part in (p.strip() for p in line.split("&&")):
            words = shlex.split(part)
            if words[0] == ".venv/bin/persona-export":
                run.append(words[1:])
            elif words[:3] == [".venv/bin/python", "-m", "pytest"]:
                tests.append(part)
            else:
                install.append(part)
    assert set(install) == {"bash ci/setup.sh"} and (REPO / "ci" / "setup.sh").is_file()
    assert run, "the README's opening commands run no persona-export command"
    for argv in run:
        args = parse_readme(argv)
        assert Path(REPO / args.recipe).is_file(), args.recipe
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests and all(t in ci for t in tests), f"{tests} is not a line of .ci/run"


def table_commands() -> list[list[str]]:
    """The README commands table's first cells, split into words."""
    cells = re.findall(r"^\| `persona-export ([^`]+)` \|", README.read_text(), re.M)
    return [cell.replace("\\|", "|").split() for cell in cells]


def test_every_command_in_the_readme_table_exists_with_its_options() -> None:
    commands = subparsers(build_parser())
    rows = table_commands()
    assert len(rows) >= 8, rows
    missing = []
    for words in rows:
        sub = commands.get(words[0])
        if sub is None:
            missing.append(words[0])
            continue
        options = {s for a in sub._actions for s in a.option_strings}
        flags = {w.strip("[]") for w in words[1:] if w.strip("[]").startswith("-")}
        missing += [f"{words[0]} {f}" for f in sorted(flags - options)]
    assert missing == []


def test_the_readme_walkthrough_is_the_minimal_recipe_and_it_validates() -> None:
    shipped = REPO / "recipes" / "minimal.yaml"
    blocks = re.findall(r"^```yaml\n(.*?)^```", README.read_text(), re.M | re.S)
    assert any(yaml.safe_load(b) == yaml.safe_load(shipped.read_text()) for b in blocks)
    recipe = load_recipe(shipped)
    checked = validate(recipe)
    assert set(checked.samples) == {"introvert", "extravert"} and all(n > 0 for n in checked.samples.values())


def test_every_command_in_the_readme_walkthroughs_parses() -> None:
    parts = [p.strip() for line in bash_lines(first_only=False) for p in line.split("&&")]
    commands = [shlex.split(p) for p in parts if p.startswith(".venv/bin/persona-export ")]
    assert len(commands) >= 4, commands
    for words in commands:
        args = parse_readme(words[1:])
        if getattr(args, "recipe", None):
            assert Path(REPO / args.recipe).is_file(), args.recipe
