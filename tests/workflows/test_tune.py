"""`persona-export tune`: a grid chosen on validation items, reported on test items it never looked at."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from exporter.cli import dispatch, main
from exporter.errors import OutputError, RecipeError
from exporter.evaluation.items import EvalDataError
from exporter.recipe.load import load_recipe
from exporter.recipe.tune import Setting, grid
from exporter.reports.evaluation import PersonaEvaluation
from exporter.reports.tune import Bounds, GridPoint, PersonaPoint
from exporter.workflows.tune import per_persona_points
from tests.helpers import (
    NEUTRAL,
    WORDS,
    edited_recipe,
    expect,
    with_eval,
    write_mix_recipe,
    write_pair_data,
    write_recipe,
)


def _paired(path: Path) -> dict[str, Any]:
    return {
        "path": str(path),
        "prompt_field": "prompt",
        "responses": {"introvert": {"field": "introvert"}, "extravert": {"field": "extravert"}},
        "max_items": 6,
        "exclude_calibration": True,
    }


def _recipe(tmp_path: Path, model_dir: Path, validation_file: Path, **tune: Any) -> Path:
    (tmp_path / "neutral.txt").write_text(NEUTRAL)
    test_file = write_pair_data(tmp_path / "test-pairs.jsonl", n=8, seed=11)
    neutral = {"path": str(tmp_path / "neutral.txt"), "window": 24}
    section = {
        "sparsity": [0.0, 0.25],
        "steer": [0.0, 1.0],
        "max_perplexity_ratio": 1000.0,
        "validation": {"paired": _paired(validation_file), "neutral": neutral},
    } | tune
    return write_recipe(
        tmp_path,
        model_dir,
        prune={"mlp": {"sparsity": 0.25}},
        eval={"paired": _paired(test_file), "neutral": neutral, "bootstrap": 200, "baselines": ["random"]},
        tune=section,
    )


def test_tune_chooses_on_validation_and_reports_on_test(tmp_path: Path, tiny_llama_dir: Path) -> None:
    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    recipe = _recipe(tmp_path, tiny_llama_dir, validation)
    out = tmp_path / "tune"
    assert main(["tune", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["grid"]) == 4 and sum(bool(p.get("chosen")) for p in report["grid"]) == 1
    chosen = next(p for p in report["grid"] if p.get("chosen"))
    assert chosen["min_shift"] == max(p["min_shift"] for p in report["grid"] if p["feasible"])
    assert all(p["feasible"] == (p["setting"]["sparsity"] > 0) for p in report["grid"])  # removal is required
    assert report["chosen"] == chosen["setting"]
    # the validation and test items are different files, and the test figures come from the test file only
    assert report["validation_splits"]["paired"]["files"] != report["test"]["introvert"]["splits"]["paired"]["files"]
    assert "test-pairs.jsonl" in json.dumps(report["test"]["introvert"]["splits"]["paired"])
    assert "val-pairs.jsonl" not in json.dumps(report["test"])
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert written["method"]["steer"] == chosen["setting"]["steer"] and "tune" not in written
    assert written["prune"]["mlp"]["sparsity"] == chosen["setting"]["sparsity"]
    assert (out / "pareto.png").stat().st_size > 0 and "**chosen**" in (out / "report.md").read_text()


def _with_replies(tmp_path: Path, recipe: Path, max_repeated: float, replies: str = "every") -> Path:
    """The recipe with validation replies (everyday prompts of its own) and a repetition bound, decoded at
    every point within the perplexity bound or best shift first (`replies`)."""
    prompts = tmp_path / "val-prompts.txt"
    prompts.write_text("".join(f"tell me about {w} please\n" for w in ("mornings", "rain", "friends", "books")))
    data = yaml.safe_load(recipe.read_text())
    data["tune"]["validation"]["replies"] = {"path": str(prompts), "max_new_tokens": 12}
    data["tune"]["validation"]["acceptance"] = {"max_repeated_4grams_over_dense": max_repeated}
    data["tune"]["per_persona"] = True
    data["tune"]["replies"] = replies
    recipe.write_text(yaml.safe_dump(data))
    return recipe


def test_tune_scores_validation_replies_and_bounds_their_repetition(tmp_path: Path, tiny_llama_dir: Path) -> None:
    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    recipe = _with_replies(tmp_path, _recipe(tmp_path, tiny_llama_dir, validation), max_repeated=1.0)
    out = tmp_path / "tune"
    assert main(["tune", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["max_repeated_4grams_over_dense"] == 1.0 and "repeated 4-grams" in report["selection"]
    for point in report["grid"]:
        per = point["personas"]
        assert set(per) == {"introvert", "extravert"}
        # a pair's reply gap is its first persona's export score minus the other's, scored the same way
        assert -1.0 <= per["introvert"]["repeated_4grams_over_dense"] <= 1.0
        assert np.isfinite(point["reply_gap"]) and np.isfinite(point["prompt_only_reply_gap"])
    # without steering or removal (the reference point) an export's replies are the dense model's
    bare = next(p for p in report["grid"] if p["setting"]["sparsity"] == 0 and p["setting"]["steer"] == 0)
    assert bare["max_repeated_4grams_over_dense"] == 0.0 and bare["reply_gap"] == 0.0
    md = (out / "report.md").read_text()
    assert "reply gap (val)" in md
    # one table per persona: its own figures at every grid point, the point its export came from marked once
    chosen = next(p for p in report["grid"] if p.get("chosen"))
    for persona in ("introvert", "extravert"):
        table = md.split(f"### {persona}\n")[1].split("###")[0].split("![pareto]")[0]
        rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert len(rows) == sum(not p.get("combined") for p in report["grid"])
        marked = [row for row in rows if "**chosen**" in row]
        assert len(marked) == 1 and f"{chosen['personas'][persona]['shift']:+.3f}" in marked[0]
    # the test split is scored without the validation prompts
    assert "val-prompts.txt" not in json.dumps(report["test"])

    # a bound that no point can meet (below dense) leaves nothing to choose, and says why; the grid's figures,
    # which cost the run its time, are written all the same, and nothing is evaluated on the test items
    strict = _with_replies(tmp_path, recipe, max_repeated=-0.5)
    with pytest.raises(RecipeError, match=r"repeated 4-grams within dense \+ -0.5.*strict/report.md"):
        from exporter.workflows.tune import tune

        tune(load_recipe(strict), tmp_path / "strict")
    kept = json.loads((tmp_path / "strict" / "report.json").read_text())
    assert kept["chosen"] is None and kept["test"] is None
    assert [p["setting"] for p in kept["grid"]] == [p["setting"] for p in report["grid"] if not p.get("combined")]
    assert "No point is within the bounds" in (tmp_path / "strict" / "report.md").read_text()
    assert not (tmp_path / "strict" / "recipe.yaml").exists()


def test_best_first_replies_choose_what_decoding_every_point_chooses(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Replies only bound the repetition, so tune decodes them from the largest shift down until a point is
    within every bound: the chosen setting and its test figures are those of decoding every point, at fewer
    decodes; a point left undecoded says so in report.md."""
    from exporter.workflows.tune import tune

    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    base = _recipe(tmp_path, tiny_llama_dir, validation, sparsity=[0.0, 0.1, 0.25], steer=[0.0, 1.0, 2.0])
    reports = {}
    for mode in ("every", "best-first"):
        recipe = _with_replies(tmp_path, base, max_repeated=1.0, replies=mode)
        tune(load_recipe(recipe), tmp_path / mode)
        reports[mode] = json.loads((tmp_path / mode / "report.json").read_text())
    every, best = reports["every"], reports["best-first"]
    assert best["chosen"] == every["chosen"] is not None
    assert best["test"] == every["test"]
    chosen = [next(p for p in r["grid"] if p.get("chosen")) for r in (every, best)]
    assert chosen[0] == chosen[1]  # the same figures, replies included
    points = sum(not p.get("combined") for p in every["grid"])
    assert every["cost"]["replies_scored"] == points == 9
    assert 1 <= best["cost"]["replies_scored"] < points
    undecoded = [p for p in best["grid"] if not p.get("combined") and p.get("reply_gap") is None]
    assert len(undecoded) == points - best["cost"]["replies_scored"]
    assert all(not p["feasible"] and not p.get("chosen") for p in undecoded)
    assert (
        "replies not decoded (a point of larger shift is within the bounds)"
        in (tmp_path / "best-first" / "report.md").read_text()
    )


def test_replies_before_shift_choose_what_decoding_every_point_chooses_scoring_fewer_answers(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tune.replies: before-shift` decodes every point's replies first and scores the answers only of the
    personas within the repetition bound: the same choice and test figures as decoding every point, and the
    shift scored exactly for the personas that `every` finds within both bounds."""
    from exporter.evaluation.replies import Replier
    from exporter.reports.evaluation import Degeneration
    from exporter.workflows.tune import tune

    decode = Replier.evaluate

    def repeating(self: Replier, masks: dict[str, Any], shipped: float = 1.0) -> dict[str, Any]:
        """The tiny model's greedy replies loop whatever the mask, so each export's repetition over the dense
        model's is set from its removal: 0.4 x the share of MLP neurons it removes."""
        out = {}
        for p, r in decode(self, masks, shipped).items():
            removed = masks[p].removed("mlp")
            share = sum(map(len, removed)) / (len(removed) * masks[p].geometry.units("mlp"))
            conds = dict(r.conditions)
            for key, value in (("dense", 0.0), ("export", round(0.4 * share, 6))):
                degeneration = Degeneration.model_validate(
                    conds[key].degeneration.model_dump() | {"repeated_4grams": value}
                )
                conds[key] = conds[key].model_copy(update={"degeneration": degeneration})
            out[p] = r.model_copy(update={"conditions": conds})
        return out

    monkeypatch.setattr(Replier, "evaluate", repeating)
    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    base = _recipe(tmp_path, tiny_llama_dir, validation, sparsity=[0.1, 0.5], steer=[0.0, 2.0])
    every = _with_replies(tmp_path, base, max_repeated=1.0, replies="every")
    tune(load_recipe(every), tmp_path / "every")
    figures = json.loads((tmp_path / "every" / "report.json").read_text())
    repeated = sorted(
        v["repeated_4grams_over_dense"]
        for p in figures["grid"]
        if not p.get("combined")
        for v in p["personas"].values()
    )
    assert repeated[0] < repeated[-1], repeated  # the tiny model's exports repeat differently: a bound can split them
    for bound in (1.0, (repeated[0] + repeated[-1]) / 2):
        reports = {}
        for mode in ("every", "before-shift"):
            recipe = _with_replies(tmp_path, base, max_repeated=bound, replies=mode)
            out = tmp_path / f"{mode}-{bound}"
            with contextlib.suppress(RecipeError):  # no point within the bounds: compared all the same
                tune(load_recipe(recipe), out)
            reports[mode] = json.loads((out / "report.json").read_text())
        full, first = reports["every"], reports["before-shift"]
        assert first["chosen"] == full["chosen"] and first["test"] == full["test"]
        within = sum(
            v["repeated_4grams_over_dense"] <= bound
            for p in full["grid"]
            if not p.get("combined")
            for v in p["personas"].values()
        )
        assert first["cost"]["shift_scored"] == within
        assert first["cost"]["replies_scored"] == sum(not p.get("combined") for p in first["grid"])
        for p in first["grid"]:  # every persona has its reply figure, and a shift only within the bound
            for v in p["personas"].values():
                assert v["repeated_4grams_over_dense"] is not None
                assert (v["shift"] is not None) == (v["repeated_4grams_over_dense"] <= bound)
        if bound < 1.0:
            assert within < full["cost"]["shift_scored"]  # the split bound saves answers


@pytest.mark.parametrize("section", ["eval", "validation"])
def test_items_that_do_not_fit_fail_before_the_grid(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, section: str
) -> None:
    """A test (or validation) item whose prompt fills eval.max_tokens fails before any grid point is scored,
    not after the grid's minutes."""
    from exporter.evaluation.scorer import MaskScorer
    from exporter.workflows.tune import tune

    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    data = yaml.safe_load(_recipe(tmp_path, tiny_llama_dir, validation).read_text())
    (data["eval"] if section == "eval" else data["tune"]["validation"])["max_tokens"] = 16
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    scored = []
    monkeypatch.setattr(MaskScorer, "perplexity", lambda self, masks: scored.append(masks))
    with pytest.raises(Exception, match=r"a prompt fills all 16 tokens \(eval.max_tokens\).*raise max_tokens"):
        tune(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out")
    assert not scored and not (tmp_path / "out").exists()


def test_tune_refuses_validation_items_that_are_reported(tmp_path: Path, tiny_llama_dir: Path) -> None:
    same_as_test = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=11)
    recipe = load_recipe(_recipe(tmp_path, tiny_llama_dir, same_as_test))
    from exporter.workflows.tune import tune

    with pytest.raises(RecipeError, match=r"tune.validation and eval share \d+ text"):
        tune(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_grid_covers_every_combination(tmp_path: Path, tiny_llama_dir: Path) -> None:
    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    recipe = load_recipe(
        _recipe(
            tmp_path,
            tiny_llama_dir,
            validation,
            compensate=["none", "personas"],
            gamma=[0.0, 0.5],
            amplify=[1.0, 2.0],
            steer_layers=[1.0, 0.5],
            steer_vector=["mlp", "residual"],
        )
    )
    settings = {
        (
            r.prune.mlp.sparsity,  # type: ignore[union-attr]
            r.method.steer,
            r.method.steer_layers,
            r.method.steer_vector,
            r.prune.mlp.compensate,  # type: ignore[union-attr]
            r.prune.mlp.gamma,  # type: ignore[union-attr]
            r.prune.mlp.amplify,  # type: ignore[union-attr]
        )
        for _, r in grid(recipe)
    }
    assert len(settings) == 128 and (0.25, 1.0, 0.5, "residual", "personas", 0.5, 2.0) in settings
    assert {s.for_persona("introvert").steer_vector for s, _ in grid(recipe)} == {"mlp", "residual"}
    # without tune.steer_vector the grid keeps the recipe's method.steer_vector
    recipe = recipe.model_copy(update={"tune": recipe.tune.model_copy(update={"steer_vector": None})})  # type: ignore[union-attr]
    assert {r.method.steer_vector for _, r in grid(recipe)} == {"mlp"}


# -- the tune section and --reuse-stats, checked before a model loads --


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _tune(tmp_path: Path, **validation: Any) -> dict[str, Any]:
    pairs = write_pair_data(tmp_path / "validation.jsonl", n=8, seed=5)
    paired = {
        "path": str(pairs),
        "prompt_field": "prompt",
        "responses": {"introvert": {"field": "introvert"}, "extravert": {"field": "extravert"}},
        "max_items": 4,
    }
    return {"sparsity": [0.0, 0.25], "steer": [0.0, 1.0], "validation": {"paired": paired} | validation}


TUNE_CASES: list[tuple[str, Callable[[dict[str, Any], Path], None], type[Exception], str]] = [
    (
        "unknown-persona",
        lambda d, t: d["tune"]["validation"].update(system_prompts={"ambivert": "hi"}),
        RecipeError,
        "tune.validation.system_prompts.ambivert: unknown persona",
    ),
    (
        "missing-file",
        lambda d, t: d["tune"]["validation"]["paired"].update(path=str(t / "gone.jsonl")),
        EvalDataError,
        "tune.validation.paired.path: file not found: ",
    ),
    (
        "not-utf8",
        lambda d, t: (
            _write(t / "bad.jsonl", b'{"prompt": "caf\xe9"}\n'),
            d["tune"]["validation"]["paired"].update(path=str(t / "bad.jsonl")),
        ),
        EvalDataError,
        "not UTF-8 text",
    ),
    (
        "folder",
        lambda d, t: ((t / "d.jsonl").mkdir(), d["tune"]["validation"]["paired"].update(path=str(t / "d.jsonl"))),
        EvalDataError,
        "is a folder, not a regular file",
    ),
]


@pytest.mark.parametrize("case", TUNE_CASES, ids=[c[0] for c in TUNE_CASES])
@pytest.mark.parametrize("command", ["validate", "tune"])
@pytest.mark.usefixtures("no_model_load")
def test_the_tune_section_is_checked_before_any_model_loads(
    case: tuple[str, Callable[[dict[str, Any], Path], None], type[Exception], str],
    command: str,
    tmp_path: Path,
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    _, change, error, message = case

    def edit(d: dict[str, Any], t: Path) -> None:
        with_eval()(d, t)
        d["tune"] = _tune(t, neutral=d["eval"]["neutral"])
        change(d, t)

    recipe = edited_recipe(tmp_path, tiny_llama_dir, edit)
    argv = [command, str(recipe), *(["--out", str(tmp_path / "out")] if command == "tune" else [])]
    expect(argv, error, message, capsys)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"not statistics", b""])
@pytest.mark.usefixtures("no_model_load")
def test_tune_refuses_a_corrupt_reuse_stats_file_before_loading(
    content: bytes, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    def edit(d: dict[str, Any], t: Path) -> None:
        with_eval()(d, t)
        d["tune"] = _tune(t, neutral=d["eval"]["neutral"])

    recipe = edited_recipe(tmp_path, tiny_llama_dir, edit)
    old = tmp_path / "old"
    (old / "stats").mkdir(parents=True)
    (old / "stats" / "introvert.safetensors").write_bytes(content)
    (old / "stats" / "introvert.json").write_text("{}")
    argv = ["tune", str(recipe), "--out", str(tmp_path / "out"), "--reuse-stats", str(old)]
    expect(argv, OutputError, "--reuse-stats", capsys)


def _point(
    steer: float,
    shifts: dict[str, float],
    ppl: dict[str, float],
    repeats: float = 0.0,
    sparsity: float = 0.01,
    amplify: float = 1.0,
) -> GridPoint:
    setting = Setting(sparsity=sparsity, steer=steer, steer_layers=1.0, compensate="none", amplify=amplify)
    per = {
        p: PersonaPoint(
            shift=shifts[p], perplexity_ratio=ppl[p], reply_score=shifts[p] / 10, repeated_4grams_over_dense=repeats
        )
        for p in shifts
    }
    return GridPoint(
        setting=setting,
        personas=per,
        min_shift=min(shifts.values()),
        max_perplexity_ratio=max(ppl.values()),
        prompt_only_reply_gap=0.01,
        removes=True,
        feasible=True,
    )


def _grid(amplify: float) -> list[GridPoint]:
    return [
        _point(1.0, {"a": 0.30, "b": 0.15}, {"a": 1.08, "b": 1.05}, amplify=amplify),
        _point(1.5, {"a": 0.40, "b": 0.22}, {"a": 1.20, "b": 1.10}, amplify=amplify),  # a over the ppl bound
        _point(2.0, {"a": 0.50, "b": 0.28}, {"a": 1.30, "b": 1.12}, repeats=0.2, amplify=amplify),  # repeats
        _point(1.0, {"a": 0.1, "b": 0.25}, {"a": 1.0, "b": 1.14}, sparsity=0.02, amplify=amplify),
    ]


BOUNDS = Bounds(max_perplexity_ratio=1.15, max_repeated=0.05)


def test_sparsity_and_steering_are_chosen_per_persona_within_the_bounds() -> None:
    scored = _grid(amplify=1.0)
    candidates = [(load_recipe_stub(), {"a": f"mask-a{i}", "b": f"mask-b{i}"}) for i in range(len(scored))]
    out = per_persona_points(load_recipe_stub(), scored, candidates, BOUNDS, True)  # type: ignore[arg-type]
    assert len(out) == 1
    point, (recipe, masks) = out[0]
    # a: its largest shift within the bounds is the first point; b: the point with sparsity 0.02
    assert point.setting.sparsity == {"a": 0.01, "b": 0.02} and point.combined
    assert point.setting.steer == {"a": 1.0, "b": 1.0} and point.min_shift == 0.25
    assert point.setting.steer_layers == {"a": 1.0, "b": 1.0}
    assert point.max_perplexity_ratio == 1.14 and point.feasible
    assert masks == {"a": "mask-a0", "b": "mask-b3"} and recipe.method.steer == {"a": 1.0, "b": 1.0}
    assert recipe.prune.mlp.fraction("a") == 0.01 and recipe.prune.mlp.fraction("b") == 0.02
    assert point.reply_gap == pytest.approx(0.030 + 0.025)


def test_with_amplify_a_persona_keeps_the_common_sparsity_and_chooses_only_its_steering() -> None:
    # amplify scales a persona's own units, which its partner's mask selects: its export depends on the
    # partner's sparsity, so points of different sparsity are not combined
    scored = _grid(amplify=2.0)
    candidates = [(load_recipe_stub(), {"a": f"mask-a{i}", "b": f"mask-b{i}"}) for i in range(len(scored))]
    out = per_persona_points(load_recipe_stub(), scored, candidates, BOUNDS, True)  # type: ignore[arg-type]
    assert len(out) == 1  # the 0.02 group has a single alpha: nothing to combine
    point, (recipe, masks) = out[0]
    assert point.setting.sparsity == 0.01 and point.setting.steer == {"a": 1.0, "b": 1.5}
    assert masks == {"a": "mask-a0", "b": "mask-b1"} and recipe.prune.mlp.sparsity == 0.01
    assert recipe.method.depth("b") == 1.0 and point.min_shift == 0.22


def test_a_persona_with_no_point_within_the_bounds_is_left_out_and_the_others_still_chosen() -> None:
    """b is over the perplexity bound everywhere: the combined point keeps a's best export alone, exports only a,
    and ranks below any point that keeps both personas."""
    from exporter.recipe.composites import MixSpec
    from exporter.reports.tune import TuneReport, tune_markdown
    from exporter.workflows.tune import rank

    scored = [
        _point(1.0, {"a": 0.30, "b": 0.15}, {"a": 1.08, "b": 1.20}),
        _point(1.5, {"a": 0.40, "b": 0.22}, {"a": 1.10, "b": 1.30}),
    ]
    candidates = [(load_recipe_stub(), {"a": f"mask-a{i}", "b": f"mask-b{i}"}) for i in range(len(scored))]
    stub = load_recipe_stub()
    # the run also exports a composite mixing b and another pole c: what is left out is b and what needs it
    stub.exported, stub.composites = ["a", "b", "c", "bc"], {"bc": MixSpec(mix={"b": 1, "c": 1})}
    ((point, (recipe, masks)),) = per_persona_points(stub, scored, candidates, BOUNDS, True)  # type: ignore[arg-type]
    assert point.left_out == ["b"] and set(point.personas) == {"a"} and point.feasible
    assert point.setting.steer == {"a": 1.5} and point.min_shift == 0.40
    assert masks == {"a": "mask-a1"} and recipe.output.personas == ["a", "c"]
    assert point.reply_gap is None and point.prompt_only_reply_gap is None  # one persona has no pair gap
    whole = _point(1.0, {"a": 0.02, "b": 0.01}, {"a": 1.0, "b": 1.0})  # weak, but keeps both
    assert rank(whole) > rank(point)
    # report.md of such a grid: no point has both personas' replies, so no prompt-only gap to print
    report = TuneReport.model_construct(
        recipe="r",
        selection="s",
        max_perplexity_ratio=1.15,
        max_repeated_4grams_over_dense=0.05,
        grid=[*(q.model_copy(update={"prompt_only_reply_gap": None}) for q in scored), point],
        chosen=None,
        test=None,
        cost=None,
    )
    assert "| " in tune_markdown(report) and "Prompt-only reply gap" not in tune_markdown(report)
    # leaving b out leaves nothing the run exports: no point
    stub.exported = ["b"]
    assert per_persona_points(stub, scored, candidates, BOUNDS, True) == []  # type: ignore[arg-type]
    # nobody within the bounds: no point at all
    over = [
        _point(1.0, {"a": 0.3, "b": 0.2}, {"a": 1.2, "b": 1.2}),
        _point(2.0, {"a": 0.3, "b": 0.2}, {"a": 2, "b": 2}),
    ]
    assert per_persona_points(load_recipe_stub(), over, candidates, BOUNDS, True) == []  # type: ignore[arg-type]


def test_tune_ships_the_personas_within_the_bounds_and_names_the_one_left_out(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end: the extravert is over the perplexity bound at every point (its ratio raised), so tune chooses
    the introvert's setting alone; report, recipe.yaml, report.md and the terminal say who was left out."""
    from exporter.evaluation.scorer import MaskScorer

    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    path = _recipe(tmp_path, tiny_llama_dir, validation, sparsity=[0.25], steer=[0.0, 1.0], per_persona=True)
    ratios = MaskScorer.perplexity_ratios

    def raised(self: MaskScorer, known: dict[str, Any]) -> dict[str, float]:
        out = ratios(self, known)
        return {p: 2000.0 if p == "extravert" else r for p, r in out.items()}

    monkeypatch.setattr(MaskScorer, "perplexity_ratios", raised)
    out = tmp_path / "tune"
    assert main(["tune", str(path), "--out", str(out)]) == 0
    assert "left out (no setting within the bounds): extravert" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    chosen = next(p for p in report["grid"] if p.get("chosen"))
    assert chosen["combined"] and chosen["left_out"] == ["extravert"] and set(chosen["personas"]) == {"introvert"}
    assert chosen["min_shift"] == max(
        p["personas"]["introvert"]["shift"] for p in report["grid"] if not p.get("combined")
    )
    assert not any(p["feasible"] for p in report["grid"] if not p.get("combined"))  # no whole point is
    assert set(report["test"]) == {"introvert"}
    text = (out / "recipe.yaml").read_text()
    assert "# left out (no setting within the bounds): extravert" in text
    assert yaml.safe_load(text)["output"]["personas"] == ["introvert"]
    assert load_recipe(out / "recipe.yaml").exported == ["introvert"]  # the written recipe loads as it says
    md = (out / "report.md").read_text()
    assert "**Left out: extravert.**" in md
    assert "**Left out** of the chosen recipe" in md.split("### extravert\n")[1]


def test_a_tie_of_the_weaker_persona_goes_to_the_point_where_the_other_is_stronger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The E/I case: the introvert's best export is the same in the plain point and in the per-persona one,
    which also takes the extravert's stronger export; the weaker shifts tie, and the per-persona point wins."""
    from exporter.reports.tune import TuneReport
    from exporter.workflows import tune as tune_module

    scored = [
        _point(2.0, {"a": 0.32, "b": 0.35}, {"a": 1.12, "b": 1.09}),
        _point(2.5, {"a": 0.30, "b": 0.41}, {"a": 1.10, "b": 1.13}),  # a weaker here: b takes its export from it
    ]
    candidates = [(load_recipe_stub(), {"a": f"mask-a{i}", "b": f"mask-b{i}"}) for i in range(len(scored))]
    ((combined, candidate),) = per_persona_points(load_recipe_stub(), scored, candidates, BOUNDS, True)  # type: ignore[arg-type]
    assert combined.min_shift == scored[0].min_shift == 0.32  # a tie of the weaker persona
    report = TuneReport.model_construct(grid=[*scored, combined], chosen=None, test=None)
    evaluated = []

    class Scorer:
        def __init__(self, *args: Any) -> None:
            pass

        def evaluate(self, masks: dict[str, Any]) -> dict[str, Any]:
            evaluated.append(masks)
            return {}

    monkeypatch.setattr(tune_module, "MaskScorer", Scorer)
    model = type("M", (), {"model": None, "tokenizer": None, "adapter": None})()
    out = tune_module.chosen_on_test(report, [*candidates, candidate], None, None, model)  # type: ignore[arg-type]
    assert out.chosen == combined.setting and evaluated == [{"a": "mask-a0", "b": "mask-b1"}]
    assert tune_module.rank(combined) > tune_module.rank(scored[0])


def load_recipe_stub() -> Any:
    from exporter.recipe.schema import MethodSpec, MlpPrune, OutputSpec, PruneSpec

    class Stub:
        method = MethodSpec(score="contrastive-wanda", steer=1.0)
        prune = PruneSpec(mlp=MlpPrune(sparsity=0.01))
        output = OutputSpec()

        def __init__(self) -> None:
            self.exported: list[str] = ["a", "b"]
            self.composites: dict[str, Any] = {}

        def model_copy(self, update: dict[str, Any]) -> Any:
            new = Stub()
            new.method = update.get("method", self.method)
            new.prune = update.get("prune", self.prune)
            new.output = update.get("output", self.output)
            new.exported, new.composites = self.exported, self.composites
            return new

    return Stub()


def test_points_over_the_perplexity_bound_are_never_scored_for_shift_or_replies(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Early rejection: each persona's perplexity first; answers and replies only for those within the bound
    (every call is counted); the cost record says how many were scored and rejected, and how long each took."""
    from exporter.evaluation.replies import Replier
    from exporter.evaluation.scorer import MaskScorer
    from exporter.workflows.tune import tune

    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    (tmp_path / "everyday.txt").write_text("quiet book walk\nloud party crowd\nmusic dance team\n")
    replies = {"path": str(tmp_path / "everyday.txt"), "max_new_tokens": 4, "exclude_calibration": False}
    bound = 1.0001  # most of this grid's persona exports break it on the tiny model
    path = _recipe(
        tmp_path, tiny_llama_dir, validation, sparsity=[0.0, 0.25], steer=[0.0, 8.0], max_perplexity_ratio=bound
    )
    data = yaml.safe_load(path.read_text())
    data["tune"]["validation"]["replies"] = replies
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    calls = {"answers": 0, "replies": 0}
    evaluate, reply = MaskScorer.evaluate, Replier.evaluate

    def counted_evaluate(self: MaskScorer, masks: dict[str, Any], **kw: Any) -> Any:
        if kw.get("known") is not None:  # a grid point (the chosen point's test evaluation has none)
            ratios = self.perplexity_ratios({k: v for k, v in kw["known"].items() if k[5:] in masks})
            assert set(ratios) == set(masks) and all(r <= bound for r in ratios.values()), ratios
            calls["answers"] += len(masks)
        return evaluate(self, masks, **kw)

    def counted_replies(self: Replier, masks: dict[str, Any], *args: Any) -> Any:
        calls["replies"] += 1
        return reply(self, masks, *args)

    monkeypatch.setattr(MaskScorer, "evaluate", counted_evaluate)
    monkeypatch.setattr(Replier, "evaluate", counted_replies)
    with contextlib.suppress(RecipeError):  # no point within the bounds: the grid's figures are still written
        tune(recipe, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cost = report["cost"]
    grid_points = [p for p in report["grid"] if not p.get("combined")]
    rejected = [(p, v) for p in grid_points for p, v in p["personas"].items() if v["shift"] is None]
    assert cost["points"] == len(grid_points) == 4 and cost["perplexity_scored"] == 8
    assert cost["rejected_on_perplexity"] == len(rejected) > 0  # alpha 8 breaks the bound
    assert all(v["perplexity_ratio"] > bound for _, v in rejected)
    assert calls["answers"] == cost["shift_scored"] == 8 - len(rejected)
    every = sum(all(v["shift"] is not None for v in p["personas"].values()) for p in grid_points)
    assert cost["replies_scored"] <= every < 4  # best shift first: at most the points within the bound
    assert calls["replies"] == cost["replies_scored"] + (
        report["chosen"] is not None
    )  # + the chosen point's test replies
    assert set(cost["seconds"]) == {"statistics", "masks", "perplexity", "shift", "replies", "test"}
    assert "rejected there (never scored for shift or replies)" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("mode", ["every", "best-first"])
def test_a_persona_within_the_bound_is_decoded_where_its_partner_is_not(
    tmp_path: Path, tiny_llama_dir: Path, mode: str
) -> None:
    """Per persona, a point where only one persona keeps perplexity within the bound can still give that
    persona its export: its replies are decoded there (with its partner's, for the gap) and bound its
    repetition; the partner stays rejected and the point itself is never feasible."""
    from exporter.workflows.tune import tune

    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    path = _recipe(tmp_path, tiny_llama_dir, validation, sparsity=[0.25], steer=[0.0, 2.0, 4.0, 8.0])
    recipe = _with_replies(tmp_path, path, max_repeated=1.0, replies=mode)
    data = yaml.safe_load(recipe.read_text())
    # a bound between the two personas' perplexities at some point: the tiny model's own figures decide it
    tune(load_recipe(recipe), tmp_path / "probe")
    probe = json.loads((tmp_path / "probe" / "report.json").read_text())
    pairs = [
        sorted(v["perplexity_ratio"] for v in p["personas"].values()) for p in probe["grid"] if not p.get("combined")
    ]
    low, high = next((a, b) for a, b in pairs if b - a > 1e-6)
    data["tune"]["max_perplexity_ratio"] = (low + high) / 2
    recipe.write_text(yaml.safe_dump(data))
    with contextlib.suppress(RecipeError):  # no point may be within the bounds: the grid's figures are written
        tune(load_recipe(recipe), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    partial = [
        p
        for p in report["grid"]
        if not p.get("combined") and sorted(v.get("shift") is None for v in p["personas"].values()) == [False, True]
    ]
    assert partial  # the bound splits the pair at one point at least
    for point in report["grid"]:
        for v in point["personas"].values():
            if v.get("shift") is None:  # rejected on perplexity: never decoded
                assert v.get("repeated_4grams_over_dense") is None and v["perplexity_ratio"] > (low + high) / 2
    for point in partial:
        assert not point["feasible"] and point.get("min_shift") is None
    if mode == "every":  # every persona within the bound is decoded, also where its partner is not
        assert all(
            v.get("repeated_4grams_over_dense") is not None
            for p in partial
            for v in p["personas"].values()
            if v.get("shift") is not None
        )


# -- tune.mix_scale: the composites' weights, each composite its own factor --


POLES = ("thinking", "feeling")


def _tf_items(path: Path, seed: int) -> dict[str, Any]:
    """Paired thinking / feeling items of their own (words and prompts apart from the calibration's) and the
    eval section reading them."""
    rng = random.Random(seed)
    rows = [
        {"prompt": f"tf item {seed} {i}", **{p: " ".join(rng.choices(WORDS[k::2], k=8)) for k, p in enumerate(POLES)}}
        for i in range(6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    responses = {p: {"field": p} for p in POLES}
    paired = {"path": str(path), "prompt_field": "prompt", "responses": responses, "max_items": 6}
    return {"name": "T/F", "paired": paired}


def _mix_tune_recipe(tmp_path: Path, model_dir: Path, **tune: Any) -> Path:
    """write_mix_recipe (composites IT = introvert 1 + thinking 1, mostly-E = extravert 0.7 + feeling 0.3) with
    E/I and T/F items for validation and for test, and a tune section scaling the composites' weights."""
    (tmp_path / "neutral.txt").write_text(NEUTRAL)
    neutral = {"path": str(tmp_path / "neutral.txt"), "window": 24}
    ei_val = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    ei_test = write_pair_data(tmp_path / "test-pairs.jsonl", n=8, seed=11)
    validation = {"paired": _paired(ei_val), "sets": [_tf_items(tmp_path / "tf-val.jsonl", 1)], "neutral": neutral}
    section = {"mix_scale": [0.5, 1.0], "per_persona": True, "max_perplexity_ratio": 1000.0}
    test = {"paired": _paired(ei_test), "sets": [_tf_items(tmp_path / "tf-test.jsonl", 2)], "neutral": neutral}
    return write_mix_recipe(
        tmp_path,
        model_dir,
        method={"score": "contrastive-wanda", "steer": {"introvert": 1.0, "thinking": 2.0, "feeling": 1.0}},
        output={"personas": ["IT", "mostly-E"]},
        eval=test | {"bootstrap": 200, "baselines": []},
        tune=section | {"validation": validation} | tune,
    )


def test_tune_scales_each_composites_weights_by_its_weakest_axis(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _mix_tune_recipe(tmp_path, tiny_llama_dir)
    out = tmp_path / "tune"
    assert main(["tune", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    grid_points = [p for p in report["grid"] if not p.get("combined")]
    # the exported composites are scored, the poles are their ingredients only; the poles keep the recipe's settings
    assert [p["setting"]["mix_scale"] for p in grid_points] == [0.5, 1.0]
    assert all(set(p["personas"]) == {"IT", "mostly-E"} for p in report["grid"])
    assert {json.dumps(p["setting"]["steer"], sort_keys=True) for p in report["grid"]} == {
        json.dumps({"introvert": 1.0, "thinking": 2.0, "feeling": 1.0}, sort_keys=True)
    }
    # each composite takes the factor of its largest weakest-axis shift (every point is within the bound here)
    best = {
        c: max(grid_points, key=lambda p: p["personas"][c]["shift"])["setting"]["mix_scale"] for c in ("IT", "mostly-E")
    }
    chosen = report["chosen"]["mix_scale"]
    assert (chosen if isinstance(chosen, dict) else dict.fromkeys(best, chosen)) == best
    # a composite's shift is its weakest own axis: on test, its E/I and T/F shifts are both reported
    test_it = PersonaEvaluation.model_validate(report["test"]["IT"])
    assert len(test_it.own_shifts()) == 2 and test_it.switch_success is not None
    md = (out / "report.md").read_text()
    assert "own axes' shifts" in md and "mix scale" in md and "a composite's shift: its weakest own axis's" in md
    # the chosen recipe carries each composite's factor as its scale, the weights as written (so a tune section
    # put back tunes it from them again); its method is the recipe's
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert written["personas"]["IT"]["mix"] == {"introvert": 1.0, "thinking": 1.0}
    assert written["personas"]["mostly-E"]["mix"] == {"extravert": 0.7, "feeling": 0.3}
    assert {c: written["personas"][c]["scale"] for c in best} == best
    assert written["method"]["steer"] == {"introvert": 1.0, "thinking": 2.0, "feeling": 1.0} and "tune" not in written
    # a run of the chosen recipe exports what tune reported on: the same composites, proven exact
    assert main(["run", str(out / "recipe.yaml"), "--out", str(tmp_path / "run"), "eval=null"]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["personas"] == {"IT": "passed", "mostly-E": "passed"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steer": [1.0, 2.0]}, "tune.mix_scale tunes composites with their poles at the recipe's method and prune "),
        ({"sparsity": [0.1]}, "remove tune.sparsity (tune the poles first"),
    ],
)
@pytest.mark.usefixtures("no_model_load")
def test_mix_scale_refuses_a_grid_over_the_poles(
    change: dict[str, Any], message: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = _mix_tune_recipe(tmp_path, tiny_llama_dir, **change)
    expect(["tune", str(recipe), "--out", str(tmp_path / "out")], RecipeError, message, capsys)
    assert not (tmp_path / "out").exists()


def test_mix_scale_sets_each_composites_scale_so_a_tuned_recipe_tunes_again_from_its_weights(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """The factor replaces `scale` (it does not multiply what an earlier tune chose); a composite a per-persona
    factor does not name keeps its own."""
    path = _mix_tune_recipe(tmp_path, tiny_llama_dir)
    data = yaml.safe_load(path.read_text())
    data["personas"]["IT"]["scale"] = 0.4  # as a tuned recipe ships it
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    assert recipe.composites["IT"].weights == {"introvert": 0.4, "thinking": 0.4}
    base = Setting(sparsity=0.01, steer=1.0, compensate="none")
    again = base.model_copy(update={"mix_scale": 0.5}).applied(recipe).composites
    assert again["IT"].weights == {"introvert": 0.5, "thinking": 0.5}  # 0.5 of the weights, not of 0.4 of them
    assert again["mostly-E"].weights == {"extravert": 0.35, "feeling": 0.15}
    only_e = base.model_copy(update={"mix_scale": {"mostly-E": 2.0}}).applied(recipe).composites
    assert only_e["IT"].scale == 0.4 and only_e["mostly-E"].weights == {"extravert": 1.4, "feeling": 0.6}
    # a scale must be a finite positive number: refused with its key path
    for bad in (0, -1, float("inf")):
        data["personas"]["IT"]["scale"] = bad
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(RecipeError, match=r"personas\.IT.*scale"):
            load_recipe(path)


@pytest.mark.usefixtures("no_model_load")
def test_mix_scale_refuses_a_run_that_exports_no_composite(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = _mix_tune_recipe(tmp_path, tiny_llama_dir)
    argv = ["tune", str(recipe), "--out", str(tmp_path / "out"), "output.personas=[introvert]"]
    expect(argv, RecipeError, "tune.mix_scale: scales composite personas' weights, but the run exports none", capsys)


@pytest.mark.usefixtures("no_model_load")
def test_a_tune_grid_without_mix_scale_needs_sparsities(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    recipe = _recipe(tmp_path, tiny_llama_dir, validation)
    data = yaml.safe_load(recipe.read_text())
    del data["tune"]["sparsity"]
    recipe.write_text(yaml.safe_dump(data))
    expect(["tune", str(recipe), "--out", str(tmp_path / "out")], RecipeError, "tune.sparsity: give the MLP", capsys)


def test_tune_bounds_each_composites_repetition_decoding_it_beside_its_mirror_only(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With validation replies, a composite's repetition bounds its factor as a pole's does; its replies are
    decoded beside its mirror's (the reply gap needs both) and no other composite's; the chosen point's test
    replies tell each type from its mirror."""
    from exporter.evaluation.replies import Replier

    recipe = _mix_tune_recipe(tmp_path, tiny_llama_dir)
    data = yaml.safe_load(recipe.read_text())
    data["personas"] |= {"IF": {"mix": {"introvert": 1, "feeling": 1}}, "ET": {"mix": {"extravert": 1, "thinking": 1}}}
    data["output"]["personas"] = ["IT", "mostly-E", "IF", "ET"]
    recipe.write_text(yaml.safe_dump(data))
    recipe = _with_replies(tmp_path, recipe, max_repeated=1.0, replies="best-first")
    data = yaml.safe_load(recipe.read_text())
    (tmp_path / "test-prompts.txt").write_text("what do you cook\nwhere do you walk\nwho do you call\n")
    data["eval"]["replies"] = {"path": str(tmp_path / "test-prompts.txt"), "max_new_tokens": 12}
    recipe.write_text(yaml.safe_dump(data))
    decoded: list[set[str]] = []
    evaluate = Replier.evaluate

    def recorded(self: Replier, masks: dict[str, Any], *args: Any) -> Any:
        decoded.append(set(masks))
        return evaluate(self, masks, *args)

    monkeypatch.setattr(Replier, "evaluate", recorded)
    out = tmp_path / "tune"
    assert main(["tune", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    *grid_calls, test_call = decoded
    assert test_call == {"IT", "mostly-E", "IF", "ET"}  # the chosen point on test: every export at once
    assert grid_calls and all(call in ({"IT", "mostly-E"}, {"IF", "ET"}) for call in grid_calls)
    assert 1 <= report["cost"]["replies_scored"] <= 2  # grid points with replies decoded (of 2)
    chosen = next(p for p in report["grid"] if p.get("chosen"))
    assert all(v["repeated_4grams_over_dense"] is not None for v in chosen["personas"].values())
    assert chosen.get("reply_gap") is None  # four composites have no one gap
    assert chosen["max_repeated_4grams_over_dense"] is not None  # but a worst repetition
    for name, mirror in (("IT", "mostly-E"), ("IF", "ET")):
        test = PersonaEvaluation.model_validate(report["test"][name])
        assert test.replies is not None and test.replies.opposite == mirror
        assert "export" in test.replies.gap and test.replies.conditions["export"].degeneration is not None
    # a bound no reply meets: no factor is admitted, and the grid's figures say why
    strict = yaml.safe_load(recipe.read_text())
    strict["tune"]["validation"]["acceptance"] = {"max_repeated_4grams_over_dense": -2.0}
    recipe.write_text(yaml.safe_dump(strict))
    with pytest.raises(RecipeError, match="repeated 4-grams within dense"):
        dispatch(["tune", str(recipe), "--out", str(tmp_path / "strict")])
    md = (tmp_path / "strict" / "report.md").read_text()
    assert "repeats itself more than the bound" in md


@pytest.mark.parametrize(
    ("personas", "message"),
    [
        (
            ["IT"],
            "IT's replies are told apart from its mirror's (each part's opposite pole), mostly-E, which the run "
            "does not export: add mostly-E to output.personas",
        ),
        (
            ["IT", "mostly-E", "IF"],
            "IF's replies are told apart from its mirror's (each part's opposite pole), and "
            "the recipe declares none: declare one (mix: {",
        ),
    ],
)
@pytest.mark.usefixtures("no_model_load")
def test_composite_replies_in_tune_need_each_mirror_exported(
    personas: list[str], message: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = _with_replies(tmp_path, _mix_tune_recipe(tmp_path, tiny_llama_dir), max_repeated=1.0)
    data = yaml.safe_load(recipe.read_text())
    data["personas"]["IF"] = {"mix": {"introvert": 1, "feeling": 1}}
    recipe.write_text(yaml.safe_dump(data))
    argv = ["tune", str(recipe), "--out", str(tmp_path / "out"), f"output.personas=[{','.join(personas)}]"]
    expect(argv, RecipeError, message, capsys)
    assert not (tmp_path / "out").exists()
