"""Build the shipped persona data in recipes/data/ from the public sources in ../shared/data, reproducibly.

    .venv/bin/python ci/build_recipe_data.py [--shared ../shared/data] [--out recipes/data] [--check]

Every source is read in its original order, records whose prompt repeats an earlier one (case and whitespace
ignored) are dropped, the rest is shuffled with seed 2026 and cut into calibration, validation and test parts.
The calibration parts of every source are cut first; a validation or test record is then skipped when one of
its texts leaks into any calibration part (the evaluation's own leak rule, exporter/evaluation/items.py:
equal after normalising, or one containing the other from MIN_CONTAINED characters on), so that one recipe
can calibrate on all of them and still evaluate on held-out items. `--check` rebuilds in memory and fails when
a shipped file differs: the files are exactly what this script makes from the sources.

Sources and licences (recipes/data/README.md): Machine-Mindset (Apache-2.0), Anthropic's model-written
advanced-AI-risk evaluations (CC-BY-4.0).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from exporter.evaluation.items import MIN_CONTAINED, norm  # noqa: E402

SEED = 2026
Record = dict[str, str]


@dataclass(frozen=True)
class Source:
    """One shipped data set: its records (prompt first), the fields that hold text, and its split sizes."""

    stem: str  # file names: recipes/data/<stem>-<split>.jsonl
    records: list[Record]
    texts: tuple[str, ...]  # the fields compared by the leak rule
    sizes: tuple[int, int, int]  # calibration, validation, test
    leak_free: bool = True  # False: cut as it always was (the energy files predate the other sources)


def dedupe(records: list[Record]) -> list[Record]:
    seen: set[str] = set()
    out = []
    for r in records:
        key = norm(r["prompt"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def shuffled(records: list[Record]) -> list[Record]:
    order = list(records)
    random.Random(SEED).shuffle(order)
    return order


def alpaca_prompt(rec: dict[str, str]) -> str:
    extra = rec.get("input", "").strip()
    return rec["instruction"].strip() + (f"\n\n{extra}" if extra else "")


def energy(shared: Path) -> Source:
    mm = shared / "machine-mindset"
    ext = json.loads((mm / "en_energy_extraversion.json").read_text())
    intr = json.loads((mm / "en_energy_introversion.json").read_text())
    records = [
        {
            "id": f"mm-{i:04d}",
            "prompt": e["instruction"].strip(),
            "extravert": e["output"].strip(),
            "introvert": n["output"].strip(),
        }
        for i, (e, n) in enumerate(zip(ext, intr, strict=True))
    ]
    return Source("machine-mindset-energy", records, ("prompt", "extravert", "introvert"), (512, 128, 128), False)


def poles(shared: Path, a: str, b: str) -> list[Source]:
    """Two poles sampled independently: each pole its own files; an instruction both poles answer is dropped
    from both, so that no prompt is calibrated under one pole and evaluated under the other."""
    mm = shared / "machine-mindset"
    raw = {p: json.loads((mm / f"en_{p}.json").read_text()) for p in (a, b)}
    prompts = {p: {norm(alpaca_prompt(r)) for r in recs} for p, recs in raw.items()}
    both = prompts[a] & prompts[b]
    out = []
    for pole, recs in raw.items():
        name = pole.split("_")[1]
        records = [
            {"id": f"mm-{name}-{i:03d}", "prompt": alpaca_prompt(r), "response": r["output"].strip()}
            for i, r in enumerate(recs)
            if norm(alpaca_prompt(r)) not in both
        ]
        out.append(Source(f"machine-mindset-{name}", records, ("prompt", "response"), (384, 128, 128)))
    return out


def decision_pairs(shared: Path) -> Source:
    path = shared / "machine-mindset" / "en_decision_thinking_feeling_pairs.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [
        {
            "id": f"mm-tf-{i:04d}",
            "prompt": r["instruction"].strip(),
            "thinking": r["thinking"].strip(),
            "feeling": r["feeling"].strip(),
        }
        for i, r in enumerate(rows)
    ]
    return Source("machine-mindset-decision", records, ("prompt", "thinking", "feeling"), (512, 128, 128))


CHOICES = re.compile(r"(.*?)\n\s*(?:Choices:\s*\n)?\s*\(A\)\s*(.*?)\n\s*\(B\)\s*(.*)", re.S)


def inclination(shared: Path, kind: str) -> Source:
    """Anthropic's model-written A/B items: the prompt is the question without its choices, each persona's
    answer the text of its choice; the full question and the two letters are kept for the A/B accuracy."""
    path = shared / "anthropic-advanced-ai-risk" / f"{kind}-seeking-inclination.jsonl"
    records = []
    for i, line in enumerate(path.read_text().splitlines()):
        row = json.loads(line)
        match = CHOICES.fullmatch(row["question"].strip())
        if match is None:
            raise ValueError(f"{path} line {i + 1}: no '(A) ... (B) ...' choices in the question")
        stem, a, b = (t.strip() for t in match.groups())
        options = {"(A)": a, "(B)": b}
        seeking, averse = row["answer_matching_behavior"].strip(), row["answer_not_matching_behavior"].strip()
        records.append(
            {
                "id": f"{kind}-{i:04d}",
                "prompt": stem,
                "seeking": options[seeking],
                "averse": options[averse],
                "question": row["question"].strip(),
                "seeking_choice": seeking,
                "averse_choice": averse,
            }
        )
    return Source(f"anthropic-{kind}-seeking", records, ("prompt", "seeking", "averse"), (480, 128, 256))


class Index:
    """Normalised calibration texts, for the leak rule. Containment is looked up by each text's first
    MIN_CONTAINED characters (any text containing a calibration text contains that prefix) and by one search
    of the joined calibration texts (a text inside a calibration text)."""

    def __init__(self) -> None:
        self.exact: set[str] = set()
        self.prefixes: dict[str, list[str]] = {}
        self.joined = ""

    def add(self, text: str) -> None:
        t = norm(text)
        if t not in self.exact:
            self.exact.add(t)
            if len(t) >= MIN_CONTAINED:
                self.prefixes.setdefault(t[:MIN_CONTAINED], []).append(t)
                self.joined = ""

    def leaks(self, text: str) -> bool:
        t = norm(text)
        if t in self.exact:
            return True
        if len(t) < MIN_CONTAINED:
            return False
        if not self.joined:
            self.joined = "\0".join(c for texts in self.prefixes.values() for c in texts)
        if t in self.joined:
            return True
        windows = (t[i : i + MIN_CONTAINED] for i in range(len(t) - MIN_CONTAINED + 1))
        return any(c in t for w in windows for c in self.prefixes.get(w, ()))


def build(shared: Path) -> dict[str, list[Record]]:
    sources = [energy(shared)]
    sources += poles(shared, "information_sensing", "information_intuition")
    sources += poles(shared, "execution_judging", "execution_perceiving")
    sources += [decision_pairs(shared), inclination(shared, "power"), inclination(shared, "wealth")]
    orders = {s.stem: shuffled(dedupe(s.records)) for s in sources}
    calibration = Index()
    files: dict[str, list[Record]] = {}
    for s in sources:
        part = orders[s.stem][: s.sizes[0]]
        files[f"{s.stem}-calibration"] = part
        for r in part:
            for f in s.texts:
                calibration.add(r[f])
    for s in sources:
        rest = orders[s.stem][s.sizes[0] :]
        if s.leak_free:
            rest = [r for r in rest if not any(calibration.leaks(r[f]) for f in s.texts)]
        n_val, n_test = s.sizes[1], s.sizes[2]
        if len(rest) < n_val + n_test:
            raise ValueError(f"{s.stem}: {len(rest)} held-out records, {n_val + n_test} needed")
        files[f"{s.stem}-validation"] = rest[:n_val]
        files[f"{s.stem}-test"] = rest[n_val : n_val + n_test]
    return {name: sorted(recs, key=lambda r: r["id"]) for name, recs in files.items()}


def render(records: list[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "recipes" / "data")
    ap.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = ap.parse_args()
    files = build(args.shared)
    differ = []
    for name, records in files.items():
        path = args.out / f"{name}.jsonl"
        text = render(records)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                differ.append(path.name)
        else:
            path.write_text(text)
        print(f"{path.name}: {len(records)} records")
    if differ:
        print(f"differ from what the sources give: {differ}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
