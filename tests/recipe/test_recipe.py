from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from exporter.errors import RecipeError
from exporter.recipe.load import load_recipe
from tests.helpers import RECIPE_CASES, REPO, SHARED_DATA, Case, eval_section, write_recipe

SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_recipes_are_shipped() -> None:
    assert any(p.name == "smollm2-introvert-extravert.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.poles
    for persona in recipe.poles.values():
        assert Path(persona.calibration.path).is_file()


CATALOG = {
    "smollm2-sensing-intuitive.yaml": ("sensing", "intuitive", "unpaired"),
    "smollm2-thinking-feeling.yaml": ("thinking", "feeling", "paired"),
    "smollm2-judging-perceiving.yaml": ("judging", "perceiving", "unpaired"),
    "smollm2-power-seeking.yaml": ("power-seeking", "power-averse", "choices"),
    "smollm2-wealth-seeking.yaml": ("wealth-seeking", "wealth-averse", "choices"),
}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_with_and_without_its_evaluation(path: Path) -> None:
    """What `persona-export validate` checks (items read, leak check, tune's validation items disjoint from the
    eval items), and the quick export's `eval=null` override."""
    from exporter.workflows.validate import validate_recipe

    if "../shared/" in path.read_text() and not SHARED_DATA.is_dir():
        pytest.skip("reads ../shared/data, which is not present")
    lines = validate_recipe(load_recipe(path))
    assert any("calibration samples" in line for line in lines)
    quick = load_recipe(path, ["eval=null"])
    assert quick.eval is None and validate_recipe(quick)


def test_the_mbti_recipe_scores_every_pole_on_every_axis() -> None:
    from exporter.workflows.validate import validate_recipe

    recipe = load_recipe(REPO / "recipes" / "smollm2-mbti.yaml")
    assert recipe.eval is not None and len(recipe.poles) == 8 and len(recipe.personas) == 24 and len(recipe.pairs) == 4
    axes = [set(recipe.eval.paired.responses)] if recipe.eval.paired else []
    axes += [set(s.personas) for s in recipe.eval.sets]
    assert sorted(map(sorted, axes)) == sorted(map(sorted, (set(p) for p in recipe.pairs)))
    lines = validate_recipe(recipe)
    assert any(line.startswith("  eval J/P: 64 unpaired perceiving answers") for line in lines), lines
    # a type's weights as written and its scale
    assert "  ISTJ: a composite of introvert 1, sensing 1, thinking 1, judging 1, all x scale 0.2 " in "\n".join(lines)
    # its tune section scales the types' weights, on validation items of all four axes that the test items do not share
    assert recipe.tune is not None and recipe.tune.mix_scale and recipe.tune.per_persona
    assert recipe.tune.validation.paired is not None and len(recipe.tune.validation.sets) == 3
    from exporter.evaluation.items import check_disjoint_splits, prepare
    from exporter.recipe.tune import tune_validation

    check_disjoint_splits(prepare(recipe, tune_validation(recipe.tune)), prepare(recipe))
    # each type's replies are told apart from its mirror's: every letter flipped, whatever either type's weights
    flip = dict(zip("EISNTFJP", "IENSFTPJ", strict=True))
    for name in recipe.composites:
        assert recipe.opposite(name) == "".join(flip[c] for c in name)
    assert recipe.opposite("introvert") == "extravert" and recipe.opposite("perceiving") == "judging"


def test_a_composites_opposite_is_its_mirror_the_one_of_equal_weights_among_several(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    from tests.helpers import write_mix_recipe

    path = write_mix_recipe(tmp_path, tiny_llama_dir)
    recipe = load_recipe(path)
    assert recipe.opposite("IT") == "mostly-E" and recipe.opposite("mostly-E") == "IT"  # weights 1/1 against 0.7/0.3
    data = yaml.safe_load(path.read_text())
    data["personas"]["EF"] = {"mix": {"extravert": 1, "feeling": 1}}
    data["personas"]["IT-light"] = {"mix": {"introvert": 0.2, "thinking": 0.9}}
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    assert recipe.opposite("IT") == "EF" and recipe.opposite("EF") == "IT"  # equal weights decide among two
    assert recipe.opposite("mostly-E") is None and recipe.opposite("IT-light") is None  # still not one


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_catalog_recipes_evaluate_on_test_and_tune_on_validation(name: str) -> None:
    recipe = load_recipe(REPO / "recipes" / name)
    first, second, kind = CATALOG[name]
    assert list(recipe.personas) == [first, second] and recipe.pairs == [(first, second)]
    assert recipe.eval is not None and recipe.tune is not None
    sections = {"eval": recipe.eval, "tune": recipe.tune.validation}
    files = {}
    for where, spec in sections.items():
        section = getattr(spec, kind)
        assert section is not None and set(section.responses) == {first, second}, where
        paths = [src.path for src in section.responses.values() if getattr(src, "path", None)]
        files[where] = {Path(p).name for p in paths or [section.path]}
    assert all("-test." in f for f in files["eval"]) and all("-validation." in f for f in files["tune"])
    from exporter.evaluation.items import check_disjoint_splits, prepare
    from exporter.recipe.tune import tune_validation

    check_disjoint_splits(prepare(recipe, tune_validation(recipe.tune)), prepare(recipe))  # tune's own check
    # a search, not a hand-picked setting: several strengths, both vector kinds, two depths
    assert recipe.tune.steer_vector == ["mlp", "residual"] and len(recipe.tune.steer) >= 3
    assert len(recipe.tune.steer_layers) >= 2 and recipe.tune.per_persona
    text = (REPO / "recipes" / name).read_text()  # says whether its setting is a starting point or tune's choice
    assert "starting point" in text and ("not a chosen setting" in text or "chosen by `persona-export tune`" in text)


def _edit(tmp_path: Path, tiny_dir: Path, mutate) -> Path:  # type: ignore[no-untyped-def]
    path = write_recipe(tmp_path, tiny_dir)
    data = yaml.safe_load(path.read_text())
    mutate(data)
    path.write_text(yaml.safe_dump(data))
    return path


def test_misspelled_key_names_its_path(tmp_path: Path) -> None:
    path = _edit(tmp_path, tmp_path, lambda d: d["personas"]["introvert"]["calibration"].update(max_sample=3))
    with pytest.raises(RecipeError, match=r"personas\.introvert\.calibration\.max_sample: unknown key"):
        load_recipe(path)


def test_all_schema_problems_reported_at_once(tmp_path: Path) -> None:
    def mutate(d: dict) -> None:
        d["prune"]["mlp"]["sparsity"] = 1.0
        d["method"]["score"] = "magic"
        d["outptu"] = {}

    with pytest.raises(RecipeError) as err:
        load_recipe(_edit(tmp_path, tmp_path, mutate))
    text = str(err.value)
    assert "3 problem(s)" in text
    for key in ("prune.mlp.sparsity", "method.score", "outptu"):
        assert key in text


def test_a_value_or_per_persona_setting_reports_the_form_it_was_given_in(tmp_path: Path) -> None:
    def mutate(d: dict) -> None:
        d["prune"]["mlp"]["sparsity"] = {"introvert": 1.5}
        d["method"]["steer"] = -1
        d["method"]["steer_layers"] = "most"

    with pytest.raises(RecipeError) as err:
        load_recipe(_edit(tmp_path, tmp_path, mutate))
    lines = str(err.value).splitlines()[1:]
    assert lines == [
        "  method.steer: Input should be greater than or equal to 0 (got -1)",
        "  method.steer_layers: expected a number, got str 'most'",
        "  prune.mlp.sparsity.introvert: Input should be less than 1 (got 1.5)",
    ]


def test_sparsity_per_persona_names_known_personas(tmp_path: Path) -> None:
    path = _edit(tmp_path, tmp_path, lambda d: d["prune"]["mlp"].update(sparsity={"introvert": 0.1, "extrovert": 0.2}))
    with pytest.raises(RecipeError, match=r"prune\.mlp\.sparsity: unknown persona\(s\) \['extrovert'\]"):
        load_recipe(path)
    recipe = load_recipe(path, ["prune.mlp.sparsity={introvert: 0.1, extravert: 0.2}"])
    assert recipe.prune.mlp is not None
    assert (recipe.prune.mlp.fraction("introvert"), recipe.prune.mlp.fraction("extravert")) == (0.1, 0.2)


def test_a_run_folder_of_an_earlier_release_still_reads_its_tune_flag(tmp_path: Path) -> None:
    # run folders keep their recipe.json; earlier releases named tune.per_persona steer_per_persona
    shipped = REPO / "recipes" / "smollm2-introvert-extravert.yaml"
    data = yaml.safe_load(shipped.read_text())
    assert data["tune"].pop("per_persona") is True
    data["tune"]["steer_per_persona"] = True
    text = yaml.safe_dump(data).replace("path: data/", f"path: {shipped.parent}/data/")  # its data, from tmp
    assert "data/" in text and "path: data/" not in text
    (tmp_path / "old.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "old.yaml")
    assert recipe.tune is not None and recipe.tune.per_persona is True
    assert "steer_per_persona" not in json.dumps(recipe.model_dump(mode="json"))


def test_required_section_has_no_default(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"method: required key is missing"):
        load_recipe(_edit(tmp_path, tmp_path, lambda d: d.pop("method")))


@pytest.mark.parametrize("case", RECIPE_CASES, ids=lambda c: c.id)
def test_recipe_problems_name_their_key(case: Case, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tmp_path)
    if case.recipe is not None:
        data = yaml.safe_load(path.read_text())
        case.recipe(data, tmp_path)
        path.write_text(yaml.safe_dump(data))
    with pytest.raises(case.error) as err:
        load_recipe(path, list(case.overrides))
    assert case.message in str(err.value)


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tmp_path)
    recipe = load_recipe(path, ["prune.mlp.sparsity=0.5", "method.phi=relu"])
    assert recipe.prune.mlp is not None and recipe.prune.mlp.sparsity == 0.5
    assert recipe.method.phi == "relu"
    with pytest.raises(RecipeError, match=r"with prune\.mlp\.sparsty=0\.5: 1 problem(?s:.*)sparsty: unknown key"):
        load_recipe(path, ["prune.mlp.sparsty=0.5"])
    with pytest.raises(RecipeError, match=r"expected KEY\.PATH=VALUE"):
        load_recipe(path, ["prune.mlp.sparsity"])


def test_relative_data_paths_resolve_against_the_recipe(tmp_path: Path) -> None:
    path = _edit(tmp_path, tmp_path, lambda d: d["personas"]["introvert"]["calibration"].update(path="pairs.jsonl"))
    recipe = load_recipe(path)
    assert recipe.personas["introvert"].calibration.path == str(tmp_path / "pairs.jsonl")


def test_digest_is_stable_and_sensitive(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tmp_path)
    assert load_recipe(path).digest() == load_recipe(path).digest()
    assert load_recipe(path).digest() != load_recipe(path, ["prune.mlp.sparsity=0.3"]).digest()


def _copy(tmp_path: Path, name: str, eval_data: bool = True) -> Path:
    """The tiny recipe with relative data paths (calibration and eval), in a folder of its own, a model elsewhere."""
    folder = tmp_path / name
    folder.mkdir()
    path = write_recipe(folder, tmp_path / f"model-{name}")
    data = yaml.safe_load(path.read_text())
    for persona in data["personas"].values():
        persona["calibration"]["path"] = "pairs.jsonl"
    if eval_data:
        data["eval"] = eval_section(folder)
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_digest_is_the_same_wherever_the_files_sit(tmp_path: Path) -> None:
    """Data files count by their content, model.path not at all (its weights have a hash of their own)."""
    a, b = _copy(tmp_path, "here"), _copy(tmp_path, "there")
    ra, rb = load_recipe(a), load_recipe(b)
    assert ra.personas["introvert"].calibration.path != rb.personas["introvert"].calibration.path
    assert ra.model.path != rb.model.path
    assert ra.digest() == rb.digest() == load_recipe(a).digest()
    (b.parent / "neutral.txt").write_text((b.parent / "neutral.txt").read_text() + " one more word")
    assert load_recipe(b).digest() != ra.digest()  # an eval file's content changed
    (b.parent / "neutral.txt").write_text((a.parent / "neutral.txt").read_text())
    with (b.parent / "pairs.jsonl").open("a") as f:
        f.write("\n")
    assert load_recipe(b).digest() != ra.digest()  # a calibration file's bytes changed


def test_the_digest_is_what_the_docs_say(tmp_path: Path) -> None:
    """docs/robustness.md: sha256 of the validated recipe as JSON with sorted keys, each data file's path replaced
    by "sha256:" and the file's sha256, model.path by "<a local model folder>"."""
    recipe = load_recipe(_copy(tmp_path, "here"))
    data = recipe.model_dump(mode="json")
    files = {"pairs": tmp_path / "here" / "pairs.jsonl", "neutral": tmp_path / "here" / "neutral.txt"}
    hashed = {k: "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest() for k, f in files.items()}
    data["model"]["path"] = "<a local model folder>"
    for persona in data["personas"].values():
        persona["calibration"]["path"] = hashed["pairs"]
    data["eval"]["paired"]["path"], data["eval"]["neutral"]["path"] = hashed["pairs"], hashed["neutral"]
    assert recipe.digest() == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def test_not_yaml_or_missing(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="YAML mapping"):
        load_recipe(listy)


def test_new_item_files_are_resolved_and_hashed_like_every_data_file() -> None:
    """eval.unpaired, eval.choices and eval.sets name files: resolved against the recipe's folder and part of
    the recipe's hash (data_files lists what recipe_sha256 hashes)."""
    from exporter.recipe.paths import data_files

    mbti = data_files(load_recipe(REPO / "recipes" / "smollm2-mbti.yaml"))
    power = data_files(load_recipe(REPO / "recipes" / "smollm2-power-seeking.yaml"))
    sensing = mbti["eval.sets.0.unpaired.responses.sensing.path"]
    assert sensing == REPO / "recipes" / "data" / "machine-mindset-sensing-test.jsonl" and sensing.is_file()
    assert "eval.sets.1.paired.path" in mbti
    assert power["eval.choices.path"].name == "anthropic-power-seeking-test.jsonl"
    assert power["tune.validation.choices.path"].name == "anthropic-power-seeking-validation.jsonl"
    # tune.validation's item sets too (the MBTI recipe's grid over the types' weights reads them)
    judging = mbti["tune.validation.sets.2.unpaired.responses.judging.path"]
    assert judging == REPO / "recipes" / "data" / "machine-mindset-judging-validation.jsonl" and judging.is_file()
