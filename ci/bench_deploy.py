"""CPU deployment benchmark (printed, not asserted): decode tokens/s and prefill latency of every ONNX format,
dense against a persona export, in one run; the persona's onnxruntime-genai folder at int4, int8 and fp32
(each made and measured by `persona-export export --format onnx-genai --precision P`) and its `onnx-q4` folder
(onnxruntime-genai's graph on the checkpoint's own Q4_1 blocks, the dense model's too); plus llama.cpp on the
dense Q4_1 GGUF and on the persona's `gguf/` files when llama-cpp-python is importable (here, or in the
interpreter given by --llama-python). llama.cpp's greedy tokens on each persona file are compared with the fp32
ONNX export's: the first step where they differ is printed (none: llama.cpp computes what was proven).

Every model gets the same chat prompt and decodes 64 greedy tokens (end of turn ignored) on `--threads`
threads; figures are medians of `--repeats` rounds that interleave the models, so drift on a shared machine
hits all of them alike. The closing line is the goal of issue 13: the persona's fastest format within its
quality floor, divided by llama.cpp's tok/s on the dense GGUF.

  python ci/bench_deploy.py                      # builds dense + demo persona exports in a temp folder
  python ci/bench_deploy.py --persona RUN/extravert --dense DIR   # reuse exports (DIR holds onnx/, ort-int*/)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from exporter.recipe.formats import FORMATS as DECLARED  # noqa: E402
from exporter.runtime.onnx import OnnxCausalLM  # noqa: E402
from exporter.verify.genai import GenaiModel  # noqa: E402
from exporter.verify.hf import first_divergence  # noqa: E402

RECIPE = REPO / "recipes" / "smollm2-introvert-extravert.yaml"
PROMPT = "Describe your ideal weekend, and say what makes it restful or exciting for you, in a few sentences."
NEW_TOKENS = 64
FORMATS = ("onnx", "onnx-int8", "onnx-int4")
GENAI = ("int4", "int8", "fp32")
LLAMA_CHILD = """
import sys, time, json
import numpy as np
from llama_cpp import Llama
path, threads, ids, new = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3].split(",")], int(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, logits_all=False, verbose=False)
out = []
for _ in range(int(sys.argv[5])):
    llm.reset()
    t = time.perf_counter(); llm.eval(ids); prefill = time.perf_counter() - t
    tokens = []
    t = time.perf_counter()
    for _ in range(new):
        # the last position's logits (llm.scores holds them only with logits_all)
        token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
        tokens.append(token)
        llm.eval([token])
    out.append((new / (time.perf_counter() - t), prefill))
print(json.dumps({"runs": out, "tokens": tokens}))
"""

LLAMA_ARGMAX = """
import sys, json
import numpy as np
from llama_cpp import Llama
path, threads, ids = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3].split(",")]
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, logits_all=True, verbose=False)
llm.eval(ids)
print(json.dumps(np.asarray(llm.scores[: len(ids)]).argmax(-1).tolist()))
"""
AGREEMENT_TOKENS = 512  # neutral-text positions on which llama.cpp's next-token argmax is compared


def neutral_ids(tok: object) -> np.ndarray:
    """The first AGREEMENT_TOKENS tokens of the demo's neutral test text."""
    text = (REPO / "recipes" / "data" / "neutral-corpus.txt").read_text(encoding="utf-8")
    return np.array([tok(text)["input_ids"][:AGREEMENT_TOKENS]])  # type: ignore[operator]


def llama_cpp_agreement(python: str, path: Path, ids: np.ndarray, reference: np.ndarray, threads: int) -> float:
    """Fraction of positions of `ids` where llama.cpp's next-token argmax on `path` equals `reference`'s."""
    child = [python, "-c", LLAMA_ARGMAX, str(path), str(threads), ",".join(map(str, ids[0]))]
    argmax = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
    return float(np.mean(np.array(argmax) == reference))


def llama_cpp(python: str, path: Path, ids: np.ndarray, threads: int) -> tuple[float, float, list[int]]:
    """(decode tok/s, prefill seconds, greedy tokens) of llama.cpp on one GGUF file, in a child process."""
    child = [python, "-c", LLAMA_CHILD, str(path), str(threads), ",".join(map(str, ids[0])), str(NEW_TOKENS), "2"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = json.loads(subprocess.run(child, capture_output=True, text=True, check=True, env=env).stdout)
    rate, prefill = out["runs"][-1]  # the first of the two is its warm-up
    return rate, prefill, out["tokens"]


def decode(model: OnnxCausalLM, ids: np.ndarray) -> tuple[float, float, list[int]]:
    """(decode tok/s over NEW_TOKENS greedy steps, prefill seconds, the greedy tokens; end of turn ignored)."""
    mask = np.ones_like(ids)
    tokens: list[int] = []
    t = time.perf_counter()
    logits, past = model.forward(ids, mask)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(NEW_TOKENS):
        token = logits[:, -1].argmax(-1)
        tokens.append(int(token[0]))
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        logits, past = model.forward(token[:, None], mask, past)
    return NEW_TOKENS / (time.perf_counter() - t), prefill, tokens


class Genai:
    """An onnxruntime-genai folder, timed like the others (its own generator, KV cache and greedy search)."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)

    def decode(self, ids: np.ndarray) -> tuple[float, float]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + NEW_TOKENS + 1, min_length=ids.shape[1] + NEW_TOKENS)
        generator = self.og.Generator(self.model, params)
        t = time.perf_counter()
        generator.append_tokens(ids[0].astype(np.int32))
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(NEW_TOKENS):
            generator.generate_next_token()
        return NEW_TOKENS / (time.perf_counter() - t), prefill


def genai_variants(persona: Path, tmp: Path) -> dict[str, tuple[Path, dict]]:
    """{precision: (folder, figures)}: the persona's genai/ rebuilt at each precision, kept in `tmp`."""
    import shutil

    from exporter.workflows.add_formats import add_formats

    out = {}
    for precision in GENAI:
        report = add_formats(persona, ["onnx-genai"], overwrite=True, genai_precision=precision)
        figures = report.verification["onnx-genai"].model_dump(mode="json", exclude_none=True)
        shutil.copytree(persona / DECLARED["onnx-genai"].folder, tmp / f"genai-{precision}")
        out[precision] = (tmp / f"genai-{precision}", figures)
    return out


def build(tmp: Path) -> tuple[Path, Path]:
    """Dense exports (all formats) and the demo recipe's extravert persona with all formats, made here."""
    from exporter.export.genai import build_q4_genai
    from exporter.export.onnx import export_onnx
    from exporter.export.quantize import quantize_weights
    from exporter.model.sources import load_model
    from exporter.recipe.load import load_recipe
    from exporter.workflows.add_formats import add_formats
    from exporter.workflows.run import run

    recipe = load_recipe(RECIPE, ["eval=null", "output.formats=[hf, onnx]"])
    m = load_model(recipe)
    dense = tmp / "dense"
    m.model.save_pretrained(dense / "hf")
    m.export_tokenizer.save_pretrained(dense / "hf")
    export_onnx(dense / "hf", dense / "onnx")
    quantized = [f for f in DECLARED.values() if f.quantization is not None]
    for fmt in quantized:
        assert fmt.quantization is not None
        q = fmt.quantization
        quantize_weights(dense / "onnx", dense / fmt.folder, q.bits, accuracy_level=q.accuracy_level)
    del m
    run(recipe, tmp / "run")  # without the evaluation (minutes); its neutral text and pairs are added below
    recipe_file = tmp / "run" / "recipe.json"
    saved = json.loads(recipe_file.read_text())
    saved["eval"] = load_recipe(RECIPE).model_dump(mode="json")["eval"]
    recipe_file.write_text(json.dumps(saved))
    persona = tmp / "run" / "extravert"
    add_formats(persona, [*(f.name for f in quantized), "gguf", "onnx-q4"])  # quality as a run has it
    build_q4_genai(dense / "hf", dense / DECLARED["onnx-q4"].folder)
    return dense, persona


def gguf_file() -> Path | None:
    from exporter.model.sources import EMBEDDED

    info = EMBEDDED["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(info["package"])
    return Path(spec.origin).parent / info["file"] if spec and spec.origin else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persona", type=Path, help="a persona folder holding onnx/ and ort-int*/")
    parser.add_argument("--dense", type=Path, help="a folder holding the dense model's onnx/ and ort-int*/")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-python", default=sys.executable, help="interpreter with llama-cpp-python")
    parser.add_argument("--no-genai", action="store_true", help="leave out onnxruntime-genai (it rewrites genai/)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dense, persona = (args.dense, args.persona) if args.persona and args.dense else build(Path(tmp))
        genai = genai_variants(persona, Path(tmp)) if not args.no_genai else {}
        return bench(dense, persona, genai, args)


def bench(dense: Path, persona: Path, genai: dict[str, tuple[Path, dict]], args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(persona / "hf")
    ids = np.array([tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)])
    report = json.loads((persona / "report.json").read_text())
    models = {
        (who, fmt): OnnxCausalLM.from_dir(folder / DECLARED[fmt].folder, threads=args.threads)
        for who, folder in (("dense", dense), ("persona", persona))
        for fmt in FORMATS
        if (folder / DECLARED[fmt].folder).is_dir()
    }
    runners: dict[tuple[str, str], Callable[[np.ndarray], tuple[float, float]]] = {
        k: (lambda ids, m=m: decode(m, ids)[:2]) for k, m in models.items()
    }
    quality = {("persona", f): report["verification"].get(f, {}) for f in FORMATS}
    genai_folders: dict[tuple[str, str], Path] = {}
    for precision, (folder, figures) in genai.items():
        genai_folders[("persona", f"onnxruntime-genai {precision}")] = folder
        quality[("persona", f"onnxruntime-genai {precision}")] = figures
    for who, folder in (("dense", dense), ("persona", persona)):
        if (folder / DECLARED["onnx-q4"].folder).is_dir():
            genai_folders[(who, "onnx-q4")] = folder / DECLARED["onnx-q4"].folder
    quality[("persona", "onnx-q4")] = report["verification"].get("onnx-q4", {})
    for key, folder in genai_folders.items():
        runners[key] = Genai(folder, args.threads).decode
    gguf = gguf_file()
    probe = [args.llama_python, "-c", "import llama_cpp"]
    has_llama = gguf is not None and subprocess.run(probe, capture_output=True).returncode == 0
    files: dict[tuple[str, str], Path] = {("dense", "llama.cpp Q4_1 GGUF"): gguf} if gguf else {}
    for qtype, figures in report["verification"].get("gguf", {}).items():
        if isinstance(figures, dict) and "file" in figures:
            files[("persona", f"llama.cpp {qtype} GGUF")] = persona / DECLARED["gguf"].folder / figures["file"]
            quality[("persona", f"llama.cpp {qtype} GGUF")] = figures
    reference = decode(models[("persona", "onnx")], ids)[2] if ("persona", "onnx") in models else None
    agreement: dict[tuple[str, str], float] = {}  # llama.cpp's top-1 agreement with the fp32 ONNX of its model
    llama_tokens: dict[tuple[str, str], list[int]] = {}  # llama.cpp's greedy tokens (first timed round)
    text = neutral_ids(tok)
    for key, folder in genai_folders.items():  # on the positions llama.cpp is measured on
        fp32 = models.get((key[0], "onnx"))
        if fp32 is not None:
            argmax = fp32.forward(text, np.ones_like(text))[0][0].argmax(-1)
            ours = GenaiModel(folder).run(text[0].tolist(), 0)[0].argmax(-1)
            agreement[key] = float(np.mean(ours == argmax))
    if has_llama:
        for key, path in files.items():
            fp32 = models.get((key[0], "onnx"))
            if fp32 is not None:
                argmax = fp32.forward(text, np.ones_like(text))[0][0].argmax(-1)
                agreement[key] = llama_cpp_agreement(args.llama_python, path, text, argmax, args.threads)
    rates: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
    prefills: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
    for runner in runners.values():  # warm-up
        runner(ids)
    for round_ in range(args.repeats):
        for key, runner in runners.items():
            rate, prefill = runner(ids)
            rates[key].append(rate)
            prefills[key].append(prefill)
        order = list(files.items()) if has_llama else []
        for key, path in order[round_ % max(len(order), 1) :] + order[: round_ % max(len(order), 1)]:  # rotated
            rate, prefill, tokens = llama_cpp(args.llama_python, path, ids, args.threads)
            rates.setdefault(key, []).append(rate)
            prefills.setdefault(key, []).append(prefill)
            llama_tokens.setdefault(key, tokens)

    load = os.getloadavg()[0]
    print(
        f"\n## CPU decode, {ids.shape[1]}-token chat prompt, {NEW_TOKENS} greedy tokens, {args.threads} threads, "
        f"median of {args.repeats} interleaved rounds (load average {load:.1f} on {os.cpu_count()} cores)"
    )
    print(f"{'model':8s} {'format':26s} {'tok/s':>7s} {'prefill ms':>10s} {'x dense fp32':>12s} {'quality':>48s}")
    base = statistics.median(rates[("dense", "onnx")])
    for (who, fmt), values in rates.items():
        q = quality.get((who, fmt), {})
        measured = ""
        if q.get("parity_target") and "max_abs_logit_diff" in q:
            measured = f"{'proven' if q.get('passed') else 'FAILED'}, max|dlogit| {q['max_abs_logit_diff']:.1e}"
        if q.get("top1_agreement") is not None:
            measured += ", " if measured else ""
            measured += f"top-1 {100 * q['top1_agreement']:.1f} %, ppl x{q['ppl_ratio']:.3f}"
            measured += f", margin {q['persona_shift']:+.3f}" if q.get("persona_shift") is not None else ""
            measured += " BELOW FLOOR" if q.get("below_floor") else ""
        notes = [f"top-1 {100 * agreement[(who, fmt)]:.1f} % vs its fp32 ONNX"] if (who, fmt) in agreement else []
        runtime = "llama.cpp " if fmt.startswith("llama.cpp") else f"{AGREEMENT_TOKENS} positions: "
        if who == "persona" and (who, fmt) in llama_tokens and reference is not None:
            step = first_divergence(llama_tokens[(who, fmt)], reference)
            notes.append("greedy = fp32 ONNX" if step is None else f"greedy differs at step {step}")
        measured = "; ".join(filter(None, [measured, runtime + ", ".join(notes) if notes else ""]))
        rate = statistics.median(values)
        prefill = 1000 * statistics.median(prefills[(who, fmt)])
        print(f"{who:8s} {fmt:26s} {rate:7.1f} {prefill:10.1f} {rate / base:12.2f} {measured:>48s}")

    def usable(key: tuple[str, str]) -> bool:
        """A persona format that is proven (fp32) or measured within its quality floor."""
        q = quality.get(key, {})
        if q.get("parity_target") is True:
            return q.get("passed") is True
        return key == ("persona", "onnx") or q.get("below_floor") is False

    within = [(statistics.median(v), key[1]) for key, v in rates.items() if key[0] == "persona" and usable(key)]
    best_rate, best = max(within)
    if has_llama:
        llama = statistics.median(rates[("dense", "llama.cpp Q4_1 GGUF")])
        print(f"\npersona's fastest format within its floor: {best} {best_rate:.1f} tok/s; llama.cpp {llama:.1f} tok/s")
        print(f"ratio (goal >= 1): {best_rate / llama:.2f}")
    else:
        print(f"\npersona's fastest format within its floor: {best} {best_rate:.1f} tok/s; llama.cpp not measured")
        print("(llama-cpp-python is optional: CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
