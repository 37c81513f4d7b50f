"""Publishing persona exports to the Hugging Face Hub (`persona-export push`, and a recipe's `push:`).

Only proven exports leave the machine: a persona is pushed only when its report.json says verification
passed, for the checkpoint and for every ONNX folder that goes along. The run folder is never modified:
each repo's upload folder is staged in a temporary directory (hard links or copies of hf/ and the ONNX
folders, plus a generated README.md). The token comes from HF_TOKEN or the saved login; it is never
printed, logged or written, and error text is redacted anyway because a server may echo what it got.
Longer than most modules because the checks, the staging and the upload are one guarded path, kept in one
place so that nothing reaches the network before every check passed.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from exporter import __version__
from exporter.errors import ExportFolderError, HubError
from exporter.folders.run_folder import PersonaFolder
from exporter.inputs import folder_problem, path_kind
from exporter.publish.modelcard import CardContext, render_card
from exporter.recipe.formats import ADDED, FORMATS
from exporter.recipe.push import OnnxMode, PushSpec, branch_problem, fill, onnx_repo_problem, repo_id_problem
from exporter.reports.checks import Check, GgufCheck, Measured
from exporter.reports.persona import PersonaReport, load_report

log = logging.getLogger(__name__)
ONNX_FORMATS = ADDED  # pushed as subfolders (FORMATS[name].folder) of the checkpoint, or to their own repo
NOT_SENT = "nothing was sent"


@dataclass(frozen=True)
class PushOptions:
    repo_id: str
    private: bool = False
    revision: str | None = None  # a branch, created when missing; None is main
    create_pr: bool = False
    commit_message: str | None = None
    onnx: OnnxMode = "same-repo"
    onnx_repo_id: str | None = None  # separate-repo only; default "<repo_id>-onnx"
    below_floor: bool = False  # also push quantized formats whose measured quality is below their floor

    @classmethod
    def from_spec(cls, spec: PushSpec, persona: str) -> PushOptions:
        return cls(
            repo_id=fill(spec.repo_id, persona),
            private=spec.private,
            revision=spec.revision,
            create_pr=spec.create_pr,
            commit_message=fill(spec.commit_message, persona) if spec.commit_message else None,
            onnx=spec.onnx,
            onnx_repo_id=fill(spec.onnx_repo_id, persona) if spec.onnx_repo_id else None,
            below_floor=spec.below_floor,
        )

    @property
    def separate_onnx_repo(self) -> str:
        return self.onnx_repo_id or f"{self.repo_id}-onnx"


@dataclass(frozen=True)
class PersonaExport:
    """A persona folder that passed every check: its report, hf/config.json and the ONNX folders to push."""

    folder: Path
    report: PersonaReport
    config: dict[str, Any]
    onnx_folders: tuple[str, ...]
    left_out: tuple[str, ...] = ()  # files inside those folders that are not pushed (GGUF files below the floor)


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    files: dict[str, int]  # path in the repo -> bytes
    commit_url: str | None  # None for a dry run
    pr_url: str | None = None


def check_options(options: PushOptions) -> None:
    """Repo ids and branch, before anything is read or sent."""
    problems = [f"--repo-id: {p}" for p in [repo_id_problem(options.repo_id)] if p]
    if options.onnx == "separate-repo":
        problems += [f"ONNX repo id: {p}" for p in [repo_id_problem(options.separate_onnx_repo)] if p]
    problems += [p for p in [onnx_repo_problem(options.repo_id, options.onnx, options.onnx_repo_id, "--onnx")] if p]
    if options.revision is not None and (problem := branch_problem(options.revision)):
        problems.append(f"--revision: {problem}")
    if problems:
        raise HubError("; ".join(problems) + f"; {NOT_SENT}")


def load_export(folder: Path, onnx: OnnxMode = "same-repo", below_floor: bool = False) -> PersonaExport:
    """Refuse anything that is not a complete persona export whose verification passed. Quantized formats
    below their quality floor are left out unless `below_floor`."""
    folder = Path(folder)
    if (problem := folder_problem(folder)) is not None:
        raise HubError(f"{problem}; pass a persona folder RUN_DIR/<persona>")
    folder = folder.resolve()  # the persona folder itself; nothing outside it is read, whatever links say
    inside_only(folder, ("report.json", "hf", *(FORMATS[n].folder for n in ONNX_FORMATS)))
    if (folder / "run.json").is_file():
        personas = sorted(p.parent.name for p in folder.glob("*/report.json"))
        raise HubError(
            f"{str(folder)!r} is a run folder; pass one persona folder: " + ", ".join(str(folder / p) for p in personas)
        )
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise HubError(f"{str(folder)!r} is not a persona export (no report.json); pass RUN_DIR/<persona>")
    persona = PersonaFolder(folder, HubError, "re-run the export")
    if not (folder / "hf" / "config.json").exists():
        raise HubError(f"{str(folder)!r} has no hf/config.json: not a complete persona export")
    config = persona.config()
    if not any((folder / "hf").glob("*.safetensors")):
        raise HubError(f"{str(folder / 'hf')!r} holds no *.safetensors weights: not a complete export")
    try:
        report = persona.report()
    except ExportFolderError as e:
        raise HubError(f"{e}; only verified exports are pushed") from None
    hf = report.verification.get("hf")
    if hf is None:
        raise HubError(f"{report_path} has no verification result; only verified exports are pushed")
    failed = HubError(
        f"verification of {report.persona!r} failed (status {report.status!r}); only proven "
        f"exports are pushed: see verification in {report_path}, fix the cause and re-run"
    )
    if not hf.passed:
        raise failed
    present = tuple(f for f in ONNX_FORMATS if (folder / FORMATS[f].folder).is_dir()) if onnx != "none" else ()
    for name in present:
        result = report.verification.get(name)
        if result is None or not result.passed:
            state = "is missing" if result is None else "failed"
            raise HubError(
                f"{FORMATS[name].folder}/ is present in {str(folder)!r} but its verification {state}; only proven "
                "exports are pushed: re-run the export, or pass --onnx none to push only the checkpoint"
            )
    if not report.passed:  # a format that is not pushed failed: the persona's status is "failed"
        raise failed
    low = [n for n in present if _below_floor(report.verification[n])]
    left_out = () if below_floor or "gguf" not in present else _low_gguf_files(report)
    if (low or left_out) and not below_floor:
        log.warning("not pushing %s: measured below the quality floor (see report.json; --below-floor pushes it)",
                    low + list(left_out))  # fmt: skip
    gguf_files = {f"{FORMATS['gguf'].folder}/{p.name}" for p in (folder / FORMATS["gguf"].folder).glob("*.gguf")}
    low += ["gguf"] if left_out and gguf_files <= set(left_out) else []  # nothing of the folder would be pushed
    folders = tuple(FORMATS[n].folder for n in present if below_floor or n not in low)
    return PersonaExport(folder, report, config, folders, left_out)


def _below_floor(check: Check) -> bool:
    """A quantized format measured below its floor (its whole folder is not pushed unless asked)."""
    return isinstance(check, Measured) and check.below_floor is True


def _low_gguf_files(report: PersonaReport) -> tuple[str, ...]:
    """The GGUF files (repo paths) measured below their quality floor: one folder holds every quant type."""
    gguf = report.check("gguf", GgufCheck)
    files = gguf.files.values() if gguf else ()
    return tuple(f"{FORMATS['gguf'].folder}/{f.file}" for f in files if f.below_floor is True)


def inside_only(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """The regular files of `folder/name` (files or folders) for each name that exists, links not followed.

    A symlink anywhere (even one pointing inside), a named pipe or a device refuses the push: what leaves the
    machine is exactly the persona folder's own files.
    """
    problems: list[str] = []
    files: list[Path] = []

    def check(path: Path) -> None:
        if path.is_symlink():
            problems.append(f"{path} is a symlink (to {os.readlink(path)!r})")
        elif path.is_file():
            files.append(path)
        elif not path.is_dir():
            problems.append(f"{path} is {path_kind(path)}")

    for name in names:
        top = folder / name
        if not top.exists() and not top.is_symlink():
            continue
        check(top)
        if top.is_dir() and not top.is_symlink():
            for root, dirs, names_ in os.walk(top, followlinks=False):
                for entry in sorted(dirs + names_):
                    check(Path(root) / entry)
    if problems:
        raise HubError(
            f"{len(problems)} entr{'y' if len(problems) == 1 else 'ies'} in {str(folder)!r} would read outside "
            f"its own files: {'; '.join(problems[:5])}. Links are never followed and only regular files are "
            f"pushed: replace them with the files themselves (or re-run the export); {NOT_SENT}"
        )
    return sorted(files)


def require_token() -> str:
    """The user's token (HF_TOKEN or saved login); checked together with offline mode and the endpoint."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubError(
            "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: huggingface_hub then sends no request, "
            f"not even to a local HF_ENDPOINT; unset it to push ({NOT_SENT})"
        )
    env = os.environ.get("HF_ENDPOINT", "").rstrip("/")
    if env and env != constants.ENDPOINT:
        raise HubError(
            f"HF_ENDPOINT is {env!r} but huggingface_hub was imported with {constants.ENDPOINT!r}; set "
            f"HF_ENDPOINT before Python starts ({NOT_SENT})"
        )
    token = get_token()
    if not token:
        raise HubError(f"no Hugging Face token: set HF_TOKEN or run `huggingface-cli login` ({NOT_SENT})")
    return token


def token_source() -> str:
    """Where the token would come from, without showing it."""
    from huggingface_hub import get_token

    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    return "the saved login" if get_token() else "none found: set HF_TOKEN or run `huggingface-cli login`"


def stage(export: PersonaExport, options: PushOptions, dest: Path) -> list[tuple[str, Path]]:
    """Build each repo's upload folder under `dest`; (repo id, folder) in push order."""
    main = dest / "checkpoint"
    _link_tree(export.folder / "hf", main)
    same = options.onnx == "same-repo"
    onnx_repo = options.separate_onnx_repo if export.onnx_folders and not same else None
    ctx = CardContext(
        repo_id=options.repo_id,
        hf_repo_id=options.repo_id,
        onnx_folders=export.onnx_folders if same else (),
        onnx_repo_id=onnx_repo,
        revision=None if options.revision in (None, "main") else options.revision,
        chat_template=(main / "chat_template.jinja").is_file() or _has_chat_template(main),
        head_dim_fix=_head_dim_differs(export.config),
        left_out=export.left_out,
    )
    uploads = [(options.repo_id, main)]
    if onnx_repo:
        uploads.append((onnx_repo, dest / "onnx-repo"))
    for repo_id, folder in uploads:
        if repo_id == onnx_repo or same:
            for name in export.onnx_folders:
                _link_tree(export.folder / name, folder / name, skip=export.left_out)
        card_ctx = ctx if repo_id == options.repo_id else replace(ctx, repo_id=repo_id, onnx_repo_id=None)
        card_ctx = replace(card_ctx, onnx_folders=export.onnx_folders) if repo_id == onnx_repo else card_ctx
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "README.md").write_text(str(render_card(export.report, card_ctx)), encoding="utf-8")
    return uploads


def push_persona(folder: Path, options: PushOptions, *, dry_run: bool = False) -> list[PushResult]:
    """Check, stage and push one persona folder; with `dry_run` only report what would be uploaded."""
    check_options(options)
    export = load_export(folder, options.onnx, options.below_floor)
    token = None if dry_run else require_token()
    with tempfile.TemporaryDirectory(prefix="persona-push-") as tmp:
        uploads = stage(export, options, Path(tmp))
        if token is None:
            return [PushResult(repo_id, _files(path), None) for repo_id, path in uploads]
        return [_send(repo_id, path, export, options, token) for repo_id, path in uploads]


def push_run(run_dir: Path, spec: PushSpec) -> dict[str, list[PushResult]]:
    """Push every persona of a finished run whose status is "passed" (the recipe's `push:` section)."""
    run_dir = Path(run_dir)
    statuses = {}
    for report in sorted(run_dir.glob("[!.]*/report.json")):  # not the hidden staging folders
        if report.parent.is_symlink():
            raise HubError(f"{report.parent} is a symlink; push reads only the run folder's own files ({NOT_SENT})")
        inside_only(report.parent, ("report.json",))  # before it is read
        try:
            statuses[report.parent.name] = load_report(report).status
        except ExportFolderError as e:
            raise HubError(f"{e}, or push the other personas one by one with `persona-export push`") from None
    for name, status in statuses.items():
        if status != "passed":
            log.warning("%s: not pushed: verification status is %r (see its report.json)", name, status)
    options = {n: PushOptions.from_spec(spec, n) for n, s in statuses.items() if s == "passed"}
    repos = [o.repo_id for o in options.values()]
    repos += [o.separate_onnx_repo for o in options.values() if o.onnx == "separate-repo"]
    if len(set(repos)) != len(repos):
        raise HubError(f"push: several personas would share a repo ({repos}); put '{{persona}}' in repo ids")
    for name, opts in options.items():  # every check before the first byte is sent
        check_options(opts)
        load_export(run_dir / name, opts.onnx, opts.below_floor)
    results: dict[str, list[PushResult]] = {}
    for name, opts in options.items():
        try:
            results[name] = push_persona(run_dir / name, opts)
            urls = [str(r.pr_url or r.commit_url) for r in results[name]]
            log.info("%s: pushed to %s", name, ", ".join(urls))
        except HubError as e:
            done = ", ".join(results) or "none"
            raise HubError(
                f"{e}\nThe run folder {run_dir} is complete (pushed: {done}); retry with "
                f"`{retry_command(run_dir / name, opts)}`"
            ) from None
    return results


def retry_command(folder: Path, o: PushOptions) -> str:
    """The `persona-export push` command line that repeats a push."""
    flags = [f"--repo-id {o.repo_id}", f"--onnx {o.onnx}"] + (["--private"] if o.private else [])
    flags += [f"--revision {o.revision}"] if o.revision else []
    flags += ["--create-pr"] if o.create_pr else []
    flags += ["--below-floor"] if o.below_floor else []
    flags += [f"--onnx-repo-id {o.onnx_repo_id}"] if o.onnx_repo_id else []
    flags += [f"--commit-message {shlex.quote(o.commit_message)}"] if o.commit_message else []
    return f"persona-export push {shlex.quote(str(folder))} " + " ".join(flags)


def describe(results: list[PushResult], *, dry_run: bool) -> str:
    """What the CLI prints: per repo, each file and its size (dry run) or the commit / pull request URL."""
    from huggingface_hub import constants

    lines = []
    for r in results:
        total = sum(r.files.values())
        if dry_run:
            lines.append(f"would upload to {r.repo_id} on {constants.ENDPOINT}:")
            width = max(len(f) for f in r.files)
            lines += [f"  {f.ljust(width)}  {n:>14,} bytes" for f, n in r.files.items()]
            lines.append(f"  {len(r.files)} files, {total:,} bytes")
        else:
            where = f"pull request {r.pr_url}" if r.pr_url else r.commit_url
            lines.append(f"pushed {len(r.files)} files ({total:,} bytes) to {r.repo_id}: {where}")
    if dry_run:
        lines.append(f"dry run: nothing was sent (token: {token_source()})")
    return "\n".join(lines)


def _send(repo_id: str, folder: Path, export: PersonaExport, options: PushOptions, token: str) -> PushResult:
    from huggingface_hub import HfApi, constants

    api = HfApi(token=token)
    persona, base = export.report.persona, export.report.base_model.name
    message = options.commit_message or f"Add the {persona} persona of {base} (persona-export {__version__})"
    files = _files(folder)
    log.info("pushing %d files (%.1f MB) to %s", len(files), sum(files.values()) / 1e6, repo_id)
    step = "creating the repo"
    try:
        api.create_repo(repo_id, private=options.private, exist_ok=True)
        if options.revision not in (None, "main"):
            step = f"creating branch {options.revision!r}"
            api.create_branch(repo_id, branch=options.revision, exist_ok=True)
        step = "uploading and committing the files"
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=options.revision,
            create_pr=options.create_pr,
            commit_message=message,
        )
    except Exception as e:
        log.debug("push to %s failed: %s", repo_id, _redact(repr(e), token))
        raise HubError(_redact(_explain(e, repo_id, step, constants.ENDPOINT), token)) from None
    return PushResult(repo_id, files, info.commit_url, info.pr_url)


def _explain(e: Exception, repo_id: str, step: str, endpoint: str) -> str:
    """A message naming the problem and the fix, for an exception raised while pushing."""
    import requests
    from huggingface_hub.errors import HfHubHTTPError

    retry = "run the same command again to retry (repeating a push is safe)"
    cause = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ else e  # LFS upload wrapper
    response = getattr(cause, "response", None)
    status = getattr(response, "status_code", None)
    if status == 401:
        return f"the Hub refused the token (401) while {step}; run `huggingface-cli login` or set HF_TOKEN"
    if status == 403:
        return f"the token may not write to {repo_id} (403) while {step}; use a token with write access"
    if status == 404:
        return f"{repo_id} or its revision was not found (404) while {step}; check --repo-id and --revision"
    if status is not None and status >= 500:
        return f"the Hub at {endpoint} failed ({status}) while {step}; {retry}"
    if isinstance(cause, requests.RequestException):
        kind = "timed out" if isinstance(cause, requests.Timeout) else "dropped or refused the connection"
        return f"the Hub at {endpoint} {kind} while {step}; check the network and HF_ENDPOINT; {retry}"
    if isinstance(cause, HfHubHTTPError):
        return f"the Hub answered {status} while {step}: {cause}"
    if isinstance(cause, ValueError):
        return f"the Hub rejected the upload to {repo_id} while {step}: {cause}"
    return f"pushing to {repo_id} failed while {step}: {type(cause).__name__}: {cause}; {retry}"


def _redact(text: str, token: str) -> str:
    return text.replace(token, "<token>") if token else text


def _head_dim_differs(config: dict[str, Any]) -> bool:
    """optimum-onnx 0.1.0 sizes its KV cache as hidden_size // heads (see exporter/runtime/onnx.py)."""
    head_dim, hidden, heads = (config.get(k) for k in ("head_dim", "hidden_size", "num_attention_heads"))
    return bool(head_dim and hidden and heads and head_dim != hidden // heads)


def _has_chat_template(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _link_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Hard-link (or copy, across file systems) the regular files of `src` into `dst`, links never followed;
    README.md is left out (it is generated), and so are hidden files and the paths in `skip` (relative to
    `src`'s parent, as in the repo)."""
    for path in inside_only(src.parent, (src.name,)):
        rel = path.relative_to(src)
        if rel.name == "README.md" or any(p.startswith(".") for p in rel.parts):
            continue
        if path.relative_to(src.parent).as_posix() in skip:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target, follow_symlinks=False)
        except OSError:
            shutil.copyfile(path, target, follow_symlinks=False)


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
