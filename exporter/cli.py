"""Command line: `persona-export run|validate|...`. Parses arguments and hands typed values to the library."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from exporter import __version__
from exporter.errors import PersonaExportError
from exporter.recipe.formats import ADDED, FORMATS

EXPORT_FORMATS = list(ADDED)  # formats made from a persona's checkpoint
# the runtimes that run an export: onnxruntime or onnxruntime-genai on a format's folder, torch on hf/
BACKENDS = [n for n, f in FORMATS.items() if f.family in ("onnxruntime", "onnxruntime-genai")] + ["torch"]
EXPORT_HELP = (
    "a persona folder (RUN_DIR/PERSONA), one of its format folders (hf/, onnx/, genai/, ...), a folder downloaded "
    "from the Hub, or a .gguf file"
)
FORMAT_HELP = (
    f"a format of the export: {', '.join(BACKENDS)} (torch: the checkpoint), or the name of another ONNX folder "
    "in it; default: onnx, else onnx-genai, else torch"
)


def cmd_validate(args: argparse.Namespace) -> int:
    from exporter.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.set)  # before the heavy imports: a bad recipe is refused at once
    from exporter.workflows.validate import validate_recipe

    print("\n".join(validate_recipe(recipe)))
    print(f"{args.recipe}: valid (recipe sha256 {recipe.digest()})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from exporter.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    from exporter.workflows.run import run

    summary = run(recipe, Path(args.out), overwrite=args.overwrite, reuse=args.reuse_stats, use_cache=not args.no_cache)
    from exporter.reports.markdown import depth_text, verdict
    from exporter.reports.terminal import quality_lines, summary_table

    print(summary_table(summary["reports"]))
    for report in summary["reports"].values():
        for line in quality_lines(report):
            print(f"{report.persona}: {line}")
    first = Path(args.out) / next(iter(summary["reports"]))
    files = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in first.iterdir()))
    run_files = ", ".join(n for n in ("report.md", "report.json", "eval.png") if (Path(args.out) / n).is_file())
    print(f"\nwritten: {args.out}  ({run_files + '; ' if run_files else ''}per persona: {files})")
    print("\n" + "\n".join(verdict(summary["reports"], Path(args.out))))
    evaluated = [r.evaluation for r in summary["reports"].values() if r.evaluation is not None]
    if evaluated:
        print(f"evaluation depth: {depth_text(evaluated[0]).replace('RUN_DIR', args.out)}")
    failed = [n for n, s in summary["personas"].items() if s != "passed"]
    if failed:
        print(f"error: verification failed for {', '.join(failed)}; see report.json", file=sys.stderr)
        return 3
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from exporter.workflows.add_formats import add_formats

    report = add_formats(
        Path(args.persona_dir), [args.format], overwrite=args.overwrite, genai_precision=args.precision
    )
    from exporter.reports.terminal import quality_lines, summary_table

    print(summary_table({report.persona: report}))
    for line in quality_lines(report):
        print(line)
    if not report.passed:
        print("error: verification failed; see report.json", file=sys.stderr)
        return 3
    return 0


CUT = " [... cut at --max-new-tokens {n}]"


def _sampling(args: argparse.Namespace, persona: Any) -> Any:
    """The command line's sampling; without --repetition-penalty, the one the persona's format folder ships
    (the base model runs side by side with the persona's)."""
    from exporter.runtime.sampling import Sampling

    penalty = persona.repetition_penalty if args.repetition_penalty is None else args.repetition_penalty
    return Sampling(args.temperature, args.top_p, penalty, args.seed)


def _reply(runner: Any, messages: list[dict[str, str]], args: argparse.Namespace, sampling: Any) -> str:
    """Stream one reply to stdout; mark it when it was cut at --max-new-tokens (or by Ctrl-C)."""
    pieces = []
    try:
        for piece in runner.stream(messages, args.max_new_tokens, sampling):
            print(piece, end="", flush=True)
            pieces.append(piece)
    except KeyboardInterrupt as exc:
        if not pieces:
            raise
        print(flush=True)  # end the streamed line; the message follows on stderr
        raise Stopped(getattr(exc, "signum", signal.SIGINT), "the reply above was cut there") from None
    print(CUT.format(n=args.max_new_tokens) if runner.truncated else "")
    return "".join(pieces)


def _run_dir(path: Path) -> Path:
    """The run folder a persona (or one of its format folders) belongs to, for --base."""
    for folder in (path, *path.resolve().parents[:2]):
        if (folder / "recipe.json").is_file() and (folder / "run.json").is_file():
            return folder
    raise PersonaExportError(f"--base runs the dense model of a run: {path} is not inside a run folder")


def _runners(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from exporter.runtime.runner import Runner, base_model_runner

    path = Path(args.path)
    runner = Runner(path, args.backend)
    runners = [(runner.name, runner)]
    if args.base:  # side by side: the dense model the persona was cut from
        runners.append(("base", base_model_runner(_run_dir(path))))
    return runners


def _start(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def cmd_generate(args: argparse.Namespace) -> int:
    messages = [*_start(args), {"role": "user", "content": args.prompt}]
    runners = _runners(args)
    sampling = _sampling(args, runners[0][1])
    for name, runner in runners:
        if len(runners) > 1:
            print(f"{name}> ", end="", flush=True)
        _reply(runner, messages, args, sampling)
    return 0


CHAT_COMMANDS = ("/reset", "/exit")


def _lines(typed: bool) -> Any:
    """The user's lines: read with a `you> ` prompt at a terminal; piped in, each is echoed as a turn."""
    while True:
        try:
            line = input("you> " if typed else "").strip()
        except EOFError:
            return
        if not typed and line and line not in CHAT_COMMANDS:
            print(f"you> {line}")
        yield line


def cmd_chat(args: argparse.Namespace) -> int:
    runners = _runners(args)
    sampling = _sampling(args, runners[0][1])
    history = {name: _start(args) for name, _ in runners}  # with --base each model keeps its own conversation
    names = " and ".join(f"{n} ({r.backend})" for n, r in runners)
    how = f"repetition penalty {sampling.repetition_penalty:g}" if sampling.repetition_penalty != 1 else "no penalty"
    print(f"chatting with {names}, {how}; /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    for line in _lines(sys.stdin.isatty()):
        if line == "/exit":
            break
        if line == "/reset":
            history = {name: _start(args) for name, _ in runners}
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line:
            continue
        for name, runner in runners:
            messages = history[name]
            messages.append({"role": "user", "content": line})
            print("bot> " if len(runners) == 1 else f"{name}> ", end="", flush=True)
            messages.append({"role": "assistant", "content": _reply(runner, messages, args, sampling)})
        print()  # a blank line between turns
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from exporter.serve.server import Limits
    from exporter.workflows.serve import serve_path

    limits = Limits(args.max_batch, args.max_queue, args.max_body, args.threads)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn has shut down gracefully and passes the signal on
        serve_path(Path(args.path), args.format, args.host, args.port, limits, args.api_key, base=args.base)
    print("stopped", file=sys.stderr)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from exporter.publish.hub import PushOptions, describe, push_persona

    options = PushOptions(
        repo_id=args.repo_id,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        onnx=args.onnx,
        onnx_repo_id=args.onnx_repo_id,
        below_floor=args.below_floor,
    )
    results = push_persona(Path(args.persona_dir), options, dry_run=args.dry_run)
    print(describe(results, dry_run=args.dry_run))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from exporter.reports.markdown import depth_text
    from exporter.workflows.evaluate import evaluate_run_dir

    overrides = [*args.set, *(["eval.depth=full"] if args.full else [])]
    evaluations = evaluate_run_dir(Path(args.run_dir), args.recipe, overrides)
    print(f"written: {Path(args.run_dir) / 'report.md'} (and each persona's report.json, report.md)")
    first = next(iter(evaluations.values()), None)
    if first is not None:
        print(f"depth: {depth_text(first).replace('RUN_DIR', args.run_dir)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from exporter.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    from exporter.workflows.tune import tune

    report = tune(recipe, Path(args.out), overwrite=args.overwrite, reuse=args.reuse_stats)
    chosen = report.chosen.model_dump() if report.chosen else None
    print(f"chosen on the validation items: {chosen}")
    if report.left_out:
        print(f"left out (no setting within the bounds): {', '.join(report.left_out)}")
    print(f"written: {Path(args.out) / 'report.md'} (test figures), report.json, pareto.png, recipe.yaml")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from exporter.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    from exporter.workflows.sweep import parse_sparsities, sweep

    values = parse_sparsities(args.sparsity)
    sweep(recipe, values, Path(args.out), unit=args.unit, overwrite=args.overwrite, reuse=args.reuse_stats)
    print(f"written: {Path(args.out) / 'report.md'}, report.json, sweep.png")
    return 0


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (an ArgumentTypeError is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give 1 or more, e.g. 128") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{value} is outside the valid range: 1 or more (the number of tokens to generate, e.g. 128)"
        )
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of at least 0."""
    if text.strip() == "0":
        return 0
    return positive_int(text)


def sampling_setting(name: str) -> Any:
    """argparse type of a sampling option: a number in the range exporter/runtime/sampling.py gives `name`."""
    from exporter.runtime.sampling import RANGES, setting_problem

    whole = isinstance(RANGES[name][0], int)

    def parse(text: str) -> float:
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {RANGES[name][3]}") from None
        problem = setting_problem(name, value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def prompt_text(text: str) -> str:
    """argparse type of --prompt: some text besides spaces."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty; give some text, e.g. --prompt 'Plan my Saturday.'")
    return text


DESCRIPTION = """Find persona subnetworks in a causal language model and export each one as a smaller,
standalone model (Hugging Face safetensors, ONNX, GGUF), proven equal to the masked model."""
EXAMPLES = """examples:
  persona-export run recipes/smollm2-introvert-extravert.yaml --out runs/demo
  persona-export run recipes/smollm2-introvert-extravert.yaml --out runs/s5 prune.mlp.sparsity=0.05
  persona-export generate runs/demo/extravert --prompt "Plan my Saturday." --base
  persona-export chat runs/demo/introvert --backend torch --temperature 0.7
  persona-export serve runs/demo --port 8000
  persona-export eval runs/demo --full

-q/--quiet and -v/--verbose may come before or after the command."""


def _verbosity(p: argparse.ArgumentParser, top: bool) -> None:
    """-q/-v on the main parser and on every command; a command's copy only sets them when given."""
    default: Any = False if top else argparse.SUPPRESS
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default, help="only errors and the final table")
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="everything, libraries' too")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _command(sub: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
    """A command with the help formatter and its own -q/-v."""
    p: argparse.ArgumentParser = sub.add_parser(name, formatter_class=_Help, **kw)
    _verbosity(p, top=False)
    return p


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("set", nargs="*", metavar="KEY.PATH=VALUE", help="recipe overrides, e.g. prune.mlp.sparsity=0.1")


def _add_validate(sub: Any) -> None:
    p = _command(sub, "validate", help="check a recipe and its data files without loading a model")
    p.add_argument("recipe")
    _overrides(p)
    p.set_defaults(func=cmd_validate)


def _add_run(sub: Any) -> None:
    p = _command(sub, "run", help="calibrate, mask, prune, export and verify every persona of a recipe")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="run folder to create (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--reuse-stats", type=Path, metavar="RUN_DIR", help="reuse still-valid statistics of an earlier run")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    _overrides(p)
    p.set_defaults(func=cmd_run)


def _add_export(sub: Any) -> None:
    p = _command(sub, "export", help="add an export format to an existing persona of a run")
    p.add_argument("persona_dir", metavar="RUN_DIR/PERSONA")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="formats already there are reused")
    p.add_argument("--overwrite", action="store_true", help="replace this format's folder if it exists")
    p.add_argument(
        "--precision",
        choices=["int4", "int8", "fp32"],
        help="onnx-genai: weight precision (default: the run's output.genai_precision, int4 unless set)",
    )
    p.set_defaults(func=cmd_export)


def _add_generation(sub: Any) -> None:
    """`generate` and `chat`: the same runtime and sampling options."""
    for name, func, text in (
        (
            "generate",
            cmd_generate,
            "generate a reply to one prompt (streamed; greedy with the export's repetition penalty unless "
            "--temperature / --repetition-penalty)",
        ),
        ("chat", cmd_chat, "chat with an export in the terminal (or from piped lines); /reset, /exit"),
    ):
        p = _command(sub, name, help=text)
        p.add_argument("path", metavar="EXPORT", help=EXPORT_HELP)
        if name == "generate":
            p.add_argument("--prompt", required=True, type=prompt_text, help="the user's message (not empty)")
        p.add_argument("--backend", metavar="FORMAT", help=FORMAT_HELP)
        p.add_argument(
            "--max-new-tokens", type=positive_int, default=128, help="at least 1; a reply cut here is marked"
        )
        p.add_argument("--system", metavar="TEXT", help="a system prompt")
        p.add_argument("--temperature", type=sampling_setting("temperature"), default=0.0, help="0 = greedy; >= 0")
        p.add_argument(
            "--top-p",
            type=sampling_setting("top_p"),
            default=1.0,
            help="nucleus sampling (with --temperature > 0); in (0, 1]",
        )
        p.add_argument(
            "--repetition-penalty",
            type=sampling_setting("repetition_penalty"),
            metavar="P",
            help="> 0; >1 discourages tokens already in the chat, 1 = none; default: what the export ships (the "
            "format folder's generation_config.json, genai_config.json for onnx-genai; the recipe's "
            "output.generation), also used for --base",
        )
        p.add_argument("--seed", type=sampling_setting("seed"), default=0, help="seed of the sampler; >= 0")
        p.add_argument("--base", action="store_true", help="also run the run's dense base model (torch), side by side")
        p.set_defaults(func=func)


def _add_serve(sub: Any) -> None:
    p = _command(
        sub, "serve", help="serve a run's personas (or one export) with an OpenAI-compatible chat-completions API"
    )
    p.add_argument("path", metavar="RUN_DIR|EXPORT", help="a run folder (every persona), or " + EXPORT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--format", metavar="FORMAT", help=FORMAT_HELP)
    p.add_argument(
        "--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (or set PERSONA_EXPORT_API_KEY)"
    )
    p.add_argument(
        "--base",
        action="store_true",
        help="also serve the run's dense model as 'base' (exported into RUN_DIR/base once, about a minute)",
    )
    p.add_argument(
        "--max-batch", type=positive_int, default=8, help="requests decoded together; 1 serves them one by one"
    )
    p.add_argument("--max-queue", type=non_negative_int, default=16, help="requests waiting beyond those; more get 503")
    p.add_argument("--max-body", type=positive_int, default=1_000_000, help="bytes of a request body; larger get 413")
    p.add_argument("--threads", type=positive_int, help="onnxruntime threads per model (default: one per core)")
    p.set_defaults(func=cmd_serve)


def _add_push(sub: Any) -> None:
    p = _command(sub, "push", help="publish a verified persona export to the Hugging Face Hub")
    p.add_argument("persona_dir", metavar="RUN_DIR/PERSONA", help="a persona folder of a run")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="model repo (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", metavar="BRANCH", help="branch, created when missing; default main")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", metavar="TEXT", help="default: persona, base model, version")
    p.add_argument(
        "--onnx",
        choices=["same-repo", "separate-repo", "none"],
        default="same-repo",
        help="where an ONNX export goes: an onnx/ subfolder (default), a repo of its own, or nowhere",
    )
    p.add_argument("--onnx-repo-id", metavar="OWNER/NAME", help="default: REPO_ID-onnx")
    p.add_argument(
        "--below-floor", action="store_true", help="also push quantized formats measured below their quality floor"
    )
    p.add_argument("--dry-run", action="store_true", help="list the files and sizes to upload; send nothing")
    p.set_defaults(func=cmd_push)


def _add_eval(sub: Any) -> None:
    p = _command(
        sub,
        "eval",
        help="evaluate a run's persona masks against baselines; rewrites the run's report.md/json (at the "
        "recipe's eval.depth, the verdict depth unless set; --full: about 15 minutes for the demo)",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--recipe", help="take the eval section from this recipe instead of the run's own")
    p.add_argument(
        "--full",
        action="store_true",
        help="the full depth (eval.depth=full): every ablation, the eval section's random seeds (3) and every "
        "reply prompt, where the run's own evaluation holds what the verdict needs",
    )
    p.add_argument(
        "set",
        nargs="*",
        metavar="eval.KEY=VALUE",
        help="eval-section overrides, e.g. eval.baselines=all (every ablation)",
    )
    p.set_defaults(func=cmd_eval)


def _add_sweep(sub: Any) -> None:
    p = _command(sub, "sweep", help="evaluate a recipe's masks at several sparsities (table and plot)")
    p.add_argument("recipe")
    p.add_argument("--sparsity", required=True, help="comma-separated values, e.g. 0.01,0.02,0.05,0.1")
    p.add_argument("--unit", choices=["mlp", "attention"], default="mlp", help="which sparsity to vary")
    p.add_argument("--out", required=True, help="folder to create for report.md, report.json, sweep.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--reuse-stats", type=Path, metavar="RUN_DIR", help="reuse valid statistics of a run")
    _overrides(p)
    p.set_defaults(func=cmd_sweep)


def _add_tune(sub: Any) -> None:
    p = _command(
        sub, "tune", help="search the recipe's tune grid on validation items, report the chosen setting on test items"
    )
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="folder to create for report.md, report.json, pareto.png, recipe.yaml")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--reuse-stats", type=Path, metavar="RUN_DIR", help="reuse valid statistics of a run")
    _overrides(p)
    p.set_defaults(func=cmd_tune)


COMMANDS = (
    _add_validate,
    _add_run,
    _add_export,
    _add_generation,
    _add_serve,
    _add_push,
    _add_eval,
    _add_sweep,
    _add_tune,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persona-export",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


class Stopped(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: unwinds like KeyboardInterrupt, so that staging folders are removed; the
    command exits with 128 + the signal's number and says what the interruption left."""

    def __init__(self, signum: int, left: str | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.left = left


def _terminate(signum: int, frame: Any) -> None:
    raise Stopped(signum)


# what an interruption leaves, by command (the others write their output atomically)
LEFT = {
    "generate": "nothing was written",
    "chat": "nothing was written",
    "push": "the persona folder is unchanged; a repo the Hub had already committed to keeps that commit",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    if any("\0" in a for a in (sys.argv[1:] if argv is None else argv)):  # no path or text can hold one
        parser.error("an argument holds a NUL byte; remove it")
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options (`run R --out D a.b=1`): argparse leaves those in `extra`
    if extra and (not hasattr(args, "set") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.set = [*args.set, *extra]
    return args


def dispatch(argv: list[str] | None = None) -> int:
    """Run a command; the project's errors propagate (main() turns them into messages and exit codes)."""
    return _run(parse(argv))


def _run(args: argparse.Namespace) -> int:
    from exporter.quiet import set_verbosity

    set_verbosity("quiet" if args.quiet else "verbose" if args.verbose else "normal")
    return int(args.func(args))


def _tolerant_output() -> None:
    """Paths from the command line may hold bytes that are not UTF-8 (kept as surrogates): print them escaped
    instead of failing on them."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            continue


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C: staging folders are removed
    _tolerant_output()
    command = None
    try:
        args = parse(argv)
        command = args.command
        return _run(args)
    except PersonaExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        left = getattr(exc, "left", None) or LEFT.get(command or "", "no partial output was left")
        name = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        print(f"{name}: {left}", file=sys.stderr)
        return 128 + int(signum)
    except Exception as exc:  # not a case the checks foresaw: still a message, the traceback only with -v
        if "-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv):
            traceback.print_exc()
        print(
            f"error: unexpected {type(exc).__name__}: {exc}; no partial output was left. Run again with -v for the "
            "traceback, and report it with the command line",
            file=sys.stderr,
        )
        return 1
