"""Model cards for pushed personas: YAML metadata through huggingface_hub's `ModelCardData`, and a body
written from report.json (what was removed and how, calibration data, parity, evaluation, usage)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from exporter.recipe.formats import FORMATS, folder_format
from exporter.recipe.schema import steered_layers
from exporter.reports.checks import (
    CheckpointCheck,
    Divergence,
    GenaiCheck,
    GgufCheck,
    OnnxCheck,
    Parity,
    QuantizedCheck,
)
from exporter.reports.evaluation import PersonaEvaluation
from exporter.reports.markdown import evaluation_markdown, md_table
from exporter.reports.persona import BaseModelInfo, PersonaReport

PROMPT = "Describe your ideal weekend in a few sentences."
UNIT_NAMES = {"mlp": "MLP neurons", "head": "query heads", "group": "KV groups"}
GEOMETRY_FIELDS = {"mlp": "intermediate", "head": "heads", "group": "kv_heads"}


@dataclass(frozen=True)
class CardContext:
    """What the card says about where things are: this repo, its ONNX subfolders, the companion repo."""

    repo_id: str
    hf_repo_id: str  # where the transformers checkpoint is (this repo, or the companion of an ONNX repo)
    onnx_folders: tuple[str, ...]  # subfolders of this repo, e.g. ("onnx", "ort-int4")
    onnx_repo_id: str | None = None  # a separate ONNX repo, linked from the checkpoint's card
    revision: str | None = None
    chat_template: bool = True
    head_dim_fix: bool = False  # head_dim != hidden_size / num_attention_heads (heads were removed)
    left_out: tuple[str, ...] = ()  # repo paths inside those subfolders that are not pushed (below their floor)


def render_card(report: PersonaReport, ctx: CardContext) -> ModelCard:
    """The README.md of the uploaded folder."""
    persona, base = report.persona, report.base_model
    is_onnx_repo = ctx.repo_id != ctx.hf_repo_id
    families = {FORMATS[n].family for n in _formats(ctx.onnx_folders)}
    tags = [persona, "pruned", "persona-export"]
    tags += ["onnx"] if families & {"onnxruntime", "onnxruntime-genai"} else []
    tags += ["gguf"] if "llama.cpp" in families else []
    tags += ["onnxruntime-genai"] if "onnxruntime-genai" in families else []
    data = ModelCardData(
        base_model=hub_id(base.name),
        library_name="onnx" if is_onnx_repo else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        license=base.license or None,
    )
    sections = [
        _intro(report, ctx),
        _removed(report),
        _calibration(report),
        _parity(report),
        _evaluation(report.persona, report.evaluation),
        _usage(ctx, report),
        _provenance(report),
    ]
    body = "\n\n".join(s for s in sections if s)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _intro(report: PersonaReport, ctx: CardContext) -> str:
    base, params = report.base_model, report.parameters
    name = hub_id(base.name)
    source = f"[{name}](https://huggingface.co/{name})" if name else f"a local model (`{_local_name(base)}`)"
    lines = [
        f"# {ctx.repo_id.split('/')[-1]}",
        "",
        f"The **{report.persona}** persona of {source}, "
        "found as a subnetwork by persona-export and physically pruned: the removed units are gone from "
        f"the weights, not masked. {_count(params.pruned)} of {_count(params.dense)} "
        f"parameters remain ({params.ratio:.1%}).",
    ]
    if report.description:
        lines += ["", f"Persona: {report.description}"]
    if ctx.repo_id != ctx.hf_repo_id:
        lines += ["", f"This repo holds the ONNX export; the transformers checkpoint is `{ctx.hf_repo_id}`."]
    elif ctx.onnx_repo_id:
        lines += ["", f"The ONNX export is in a separate repo: `{ctx.onnx_repo_id}`."]
    if not base.license:
        lines += ["", "The base model's license is not known to persona-export; check it before use."]
    return "\n".join(lines)


def _removed(report: PersonaReport) -> str:
    method, prune = report.method, report.prune
    how = f"Unit scores: `{method.score}`"
    if method.contrastive:
        how += f" (phi {method.phi}, tau {method.tau})"
        how += f", against the `{report.partner}` persona"
    lines = ["## What was removed, and how", "", how + "."]
    if prune.mlp:
        lines.append(f"MLP: {prune.mlp.fraction(report.persona):.0%} of the intermediate neurons of every layer.")
    if (alpha := method.alpha(report.persona)) > 0:
        n = len(report.removed_per_layer["mlp"])
        k = steered_layers(n, method.depth(report.persona))
        if method.vector(report.persona) == "residual":
            where, what = f"the `down_proj` bias of layer {k - 1} (of 0-{n - 1})", "residual-stream"
        else:
            where, what = f"the `down_proj` biases of the first {k} of {n} layers", "MLP-output"
        lines.append(
            f"Steering: a constant bias toward this persona in {where} ({alpha:g} x the mean {what} difference "
            f"between this persona's and `{report.partner}`'s calibration answers; `mlp_bias: true`)."
        )
    if prune.mlp and prune.mlp.compensate != "none":
        lines.append(
            f"Compensation: the removed neurons' mean output ({prune.mlp.compensate} calibration data) is kept as a "
            "`down_proj` bias."
        )
    if prune.attention:
        att = prune.attention
        lines.append(f"Attention: {att.fraction(report.persona):.0%} of the {att.unit} units of every layer.")
    dense, pruned = report.geometry.dense, report.geometry.pruned
    rows = [["unit", "per layer, dense -> pruned", "layers", "removed in total"]]
    for kind, removed in report.removed_per_layer.items():
        total = sum(len(layer) for layer in removed)
        if total:
            field = GEOMETRY_FIELDS[kind]
            rows.append([UNIT_NAMES[kind], f"{dense[field]} -> {pruned[field]}", str(len(removed)), str(total)])
    if len(rows) > 1:
        lines += ["", md_table(rows[0], rows[1:])]
    params, size = report.parameters, report.bytes
    lines += [
        "",
        f"Parameters: {params.dense:,} -> {params.pruned:,}. "
        f"Weights ({report.dtype}): {size.dense_weights / 1e6:.1f} MB -> "
        f"{size.pruned_weights_on_disk / 1e6:.1f} MB.",
    ]
    return "\n".join(lines)


def _calibration(report: PersonaReport) -> str:
    cal = report.calibration
    counted = "response tokens" if cal.tokens == "response" else "tokens"
    lines = [
        "## Calibration data",
        "",
        f"- data: the {report.persona} texts of `{os.path.basename(cal.path)}`",
        f"- size: {cal.samples} samples, {cal.tokens_counted:,} {counted} counted",
        f"- sha256 of the samples used: `{cal.data_sha256}`",
        f"- statistic: {cal.statistic}",
    ]
    return "\n".join(lines)


def _parity(report: PersonaReport) -> str:
    rows = [["export", "max abs logit diff", "mean abs logit diff", "greedy continuations", "passed"]]
    hf = report.check("hf", CheckpointCheck)
    assert hf is not None, "a report always holds its checkpoint's check"
    for dtype, parity in (("fp64", hf.fp64), ("fp32", hf.fp32)):
        if parity is not None:
            rows.append([f"transformers, {dtype}", *_figures(parity), _yes(hf.passed)])
    if hf.fp64_layers is not None:
        layers = hf.fp64_layers
        diff = f"{layers.max_abs_layer_output_diff:.1e} (layer outputs)"
        rows.append(["transformers, fp64, layer by layer", diff, "-", "-", _yes(layers.passed)])
    others = {name: check for name, check in report.verification.items() if name != "hf"}
    for name, check in others.items():
        if isinstance(check, OnnxCheck | GenaiCheck):  # compared by its logits and continuations
            rows.append([name, *_figures(check), _yes(check.passed)])
    lines = [
        "## Parity",
        "",
        "Each export, reloaded from disk, is compared with the dense base model with the persona's mask "
        "applied (the same units zeroed), on fixed prompts: next-token logits and greedy continuations.",
        "",
        md_table(rows[0], rows[1:]),
    ]
    for name, check in others.items():
        if not isinstance(check, OnnxCheck | GenaiCheck):  # measured, or a folder of files: its figures
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in check.model_dump().items() if _scalar(v))
            lines += ["", f"{name}: {shown}"]
    return "\n".join(lines)


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def _figures(f: Parity | OnnxCheck | GenaiCheck) -> list[str]:
    first = f.greedy_first_divergence
    at = first.model_dump() if isinstance(first, Divergence) else first
    greedy = "identical" if f.greedy_identical else f"differ at {at}"
    return [f"{f.max_abs_logit_diff:.1e}", f"{f.mean_abs_logit_diff:.1e}", greedy]


def _evaluation(persona: str, ev: PersonaEvaluation | None) -> str:
    """The evaluation as `persona-export eval` reports it (exporter/reports/markdown.py)."""
    return evaluation_markdown(persona, ev).rstrip() if ev else ""


def _formats(folders: tuple[str, ...]) -> list[str]:
    """The formats of a repo's subfolders, in their order."""
    return [n for f in folders if (n := folder_format(f)) is not None]


def _usage(ctx: CardContext, report: PersonaReport) -> str:
    """How to run what the repo holds: one section per runtime family of its folders."""
    parts = ["## Usage"]
    if ctx.repo_id == ctx.hf_repo_id:
        parts.append(_transformers_usage(ctx))
    names = _formats(ctx.onnx_folders)
    onnx = [n for n in names if FORMATS[n].family == "onnxruntime"]
    if onnx:
        parts += _onnx_usage(ctx, onnx, report)
    if any(FORMATS[n].family == "llama.cpp" for n in names):
        parts.append(_gguf_usage(ctx, report.check("gguf", GgufCheck)))
    for name in (n for n in names if FORMATS[n].family == "onnxruntime-genai"):
        parts.append(_genai_usage(ctx.repo_id, name, report.check(name, GenaiCheck)))
    return "\n\n".join(parts) if len(parts) > 1 else ""


def _revision(ctx: CardContext) -> str:
    return f', revision="{ctx.revision}"' if ctx.revision else ""


def _chat_and_generate(ctx: CardContext) -> str:
    """The Python lines that encode the prompt (as a chat when the tokenizer has a template) and print a reply."""
    chat = (
        f'messages = [{{"role": "user", "content": "{PROMPT}"}}]\n'
        "inputs = tokenizer.apply_chat_template(\n"
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True\n'
        ")\n"
        if ctx.chat_template
        else f'inputs = tokenizer("{PROMPT}", return_tensors="pt")\n'
    )
    return chat + (
        "output = model.generate(\n"
        '    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],\n'
        "    max_new_tokens=64, do_sample=False,\n"
        ")\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))\n'
    )


def _transformers_usage(ctx: CardContext) -> str:
    rev = _revision(ctx)
    return (
        "With transformers:\n\n```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'repo = "{ctx.hf_repo_id}"\n'
        f"tokenizer = AutoTokenizer.from_pretrained(repo{rev})\n"
        f"model = AutoModelForCausalLM.from_pretrained(repo{rev})\n\n" + _chat_and_generate(ctx) + "```"
    )


def _onnx_usage(ctx: CardContext, names: list[str], report: PersonaReport) -> list[str]:
    """optimum's ORTModelForCausalLM on the first ONNX folder; the quantized folders' measured quality."""
    rev, folder = _revision(ctx), FORMATS[names[0]].folder
    fix = (
        "model.embed_size_per_head = model.config.head_dim  # heads were removed; see the note below\n"
        if ctx.head_dim_fix
        else ""
    )
    parts = [
        "With onnxruntime (through optimum: `pip install optimum-onnx[onnxruntime]`):\n\n```python\n"
        "from optimum.onnxruntime import ORTModelForCausalLM\n"
        "from transformers import AutoTokenizer\n\n"
        f'repo = "{ctx.repo_id}"\n'
        f'tokenizer = AutoTokenizer.from_pretrained(repo, subfolder="{folder}"{rev})\n'
        f'model = ORTModelForCausalLM.from_pretrained(repo, subfolder="{folder}"{rev})\n'
        + fix
        + "\n"
        + _chat_and_generate(ctx)
        + "```"
    ]
    quantized = [_quantized_line(n, report) for n in names[1:]]
    if quantized:
        parts.append(
            "Weight-only quantized exports (onnxruntime `MatMulNBits`) load the same way with their "
            "`subfolder`; quality measured against the fp32 `onnx/` export on neutral text:\n\n" + "\n".join(quantized)
        )
    if ctx.head_dim_fix:
        parts.append(
            "Note: optimum-onnx 0.1.0 sizes the empty first-step KV cache as hidden_size / "
            "num_attention_heads, which no longer equals head_dim once heads are removed; the "
            "`embed_size_per_head` line sets it from the config."
        )
    return parts


def _gguf_usage(ctx: CardContext, check: GgufCheck | None) -> str:
    """llama-cpp-python on the best GGUF file pushed: a quantized one within its floor, else F16."""
    folder = FORMATS["gguf"].folder
    files = {q: f for q, f in (check.files if check else {}).items() if f"{folder}/{f.file}" not in ctx.left_out}
    usable = [q for q in ("Q4_1", "Q8_0") if q in files and files[q].passed and not files[q].below_floor]
    name = files[usable[0]].file if usable else files["F16"].file if "F16" in files else "model-f16.gguf"
    listed = ", ".join(f"`{f.file}`" for f in files.values())
    return (
        "With llama.cpp (through llama-cpp-python: `pip install llama-cpp-python`), from the "
        f"`{folder}/` folder ({listed}):\n\n```python\n"
        "from llama_cpp import Llama\n\n"
        f'llm = Llama.from_pretrained("{ctx.repo_id}", filename="{folder}/{name}", verbose=False)\n'
        f'out = llm.create_chat_completion([{{"role": "user", "content": "{PROMPT}"}}], max_tokens=64)\n'
        'print(out["choices"][0]["message"]["content"])\n```'
    )


def _genai_usage(repo_id: str, name: str, check: GenaiCheck | None) -> str:
    """How to run the folder of the onnxruntime-genai format `name` (`genai/`, `q4-genai/`) with
    onnxruntime-genai, and what was measured of it."""
    folder, precision = FORMATS[name].folder, check.precision if check else "int4"
    if check is not None and not check.parity_target and check.top1_agreement is not None and check.ppl_ratio:
        mark = " (below its quality floor)" if check.below_floor else ""
        measured = (
            f"{precision} weights: top-1 next-token agreement {100 * check.top1_agreement:.1f} %, perplexity "
            f"x{check.ppl_ratio:.3f}{check.margin_text()} against the masked model{mark}"
        )
    else:
        measured = f"{precision} weights, proven against the masked model (max |logit difference| "
        measured += f"{check.max_abs_logit_diff if check else float('nan'):.1e})"
    return (
        f"With onnxruntime-genai (`pip install onnxruntime-genai`), from the `{folder}/` folder ({measured}):\n\n"
        "```python\n"
        "import onnxruntime_genai as og\n"
        "from huggingface_hub import snapshot_download\n\n"
        f'path = snapshot_download("{repo_id}", allow_patterns=["{folder}/*"]) + "/{folder}"\n'
        "model = og.Model(path)\n"
        "tokenizer = og.Tokenizer(model)\n"
        f'prompt = tokenizer.apply_chat_template(\'[{{"role": "user", "content": "{PROMPT}"}}]\', add_generation_prompt=True)\n'
        "ids = tokenizer.encode(prompt)\n"
        "params = og.GeneratorParams(model)\n"
        "params.set_search_options(max_length=len(ids) + 128)  # greedy unless do_sample=True\n"
        "generator = og.Generator(model, params)\n"
        "generator.append_tokens(ids)\n"
        "while not generator.is_done():  # ends at the end of the turn\n"
        "    generator.generate_next_token()\n"
        "print(tokenizer.decode(generator.get_sequence(0)[len(ids) :]))\n```"
    )


def _quantized_line(name: str, report: PersonaReport) -> str:
    folder = FORMATS[name].folder
    q = report.verification.get(name)
    if not isinstance(q, QuantizedCheck):
        return f"- `{folder}`"
    mark = " (below its quality floor)" if q.below_floor else ""
    return (
        f"- `{folder}`: {q.bits}-bit weights, {q.mb_quantized:.0f} MB; top-1 next-token agreement "
        f"{100 * (q.top1_agreement or 0):.1f} %, perplexity x{q.ppl_ratio or 0:.3f}{q.margin_text()}{mark}"
    )


def _provenance(report: PersonaReport) -> str:
    base, recipe = report.base_model, report.recipe
    lines = ["## Provenance", "", f"- base model: `{hub_id(base.name) or _local_name(base)}`"]
    if base.sha256:
        lines.append(f"- sha256 of the base weight files used: `{base.sha256}`")
    if base.weights:
        lines.append(f"- base weights read from: {base.weights}")
    lines.append(f"- recipe: `{recipe.name}` (sha256 `{recipe.sha256}`, as `persona-export validate` prints it)")
    versions = report.versions
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def hub_id(name: str) -> str | None:
    """`name` when it can be a Hub model id; None for a local folder (never published as a path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", ".", "~")) or os.path.isabs(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _local_name(base: BaseModelInfo) -> str:
    return os.path.basename(base.name.rstrip("/\\"))


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")
