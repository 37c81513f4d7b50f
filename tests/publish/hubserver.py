"""A small Hub-compatible HTTP server for offline push tests (stdlib only, 127.0.0.1, a free port).

It answers the routes `create_repo`, `create_branch` and `upload_folder` use: repo creation, branch
creation, README metadata validation, pre-upload (regular vs LFS), the LFS batch API with basic PUT
uploads, and NDJSON commits. Like the Hub, `*.safetensors`/`*.onnx` and files of 10 MiB or more go
through LFS, so big weights are streamed to disk, never base64-encoded into a commit. Commits are atomic.

It is bounded: it stops by itself after `lifetime` seconds or `max_requests` requests. `fail_next` makes
the next N requests (optionally of one route) answer 401 or 500, or drop the connection unanswered.
A 401 echoes the Authorization header it got, so that tests can check that callers redact tokens.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".data", ".bin", ".pt", ".gguf")
LFS_THRESHOLD = 10 * 1024 * 1024
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<route>preupload|commit|branch)/(?P<rev>.+)$")
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_PUT = re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, str]] = field(default_factory=lambda: {"main": {}})  # ref -> path -> sha256
    commits: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Failure:
    count: int
    mode: str  # "401" | "500" | "drop"
    route: str | None


class FakeHub:
    """Use as a context manager; `url` is the endpoint to put in HF_ENDPOINT."""

    def __init__(self, root: Path, token: str, *, lifetime: float = 300.0, max_requests: int = 500) -> None:
        self.root, self.token = Path(root), token
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, route name)
        self.auth_headers: list[str] = []
        self.max_requests = max_requests
        self._failures: list[Failure] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, count: int, mode: str, route: str | None = None) -> None:
        """The next `count` requests (of `route`, e.g. "commit", if given) fail with `mode`."""
        assert mode in ("401", "500", "drop"), mode
        with self._lock:
            self._failures.append(Failure(count, mode, route))

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        """Path -> content of a branch or PR ref (`refs/pr/1`)."""
        tree = self.repos[repo_id].branches[ref]
        return {path: (self.root / "blobs" / oid).read_bytes() for path, oid in tree.items()}

    def export(self, repo_id: str, dest: Path, ref: str = "main") -> Path:
        """Write a ref's tree into `dest`, as a download of the repo would."""
        for path, oid in self.repos[repo_id].branches[ref].items():
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.root / "blobs" / oid, dest / path)
        return dest

    def routes(self) -> list[str]:
        return [route for _, route in self.requests]

    def take_failure(self, route: str) -> str | None:
        with self._lock:
            for failure in self._failures:
                if failure.count > 0 and failure.route in (None, route):
                    failure.count -= 1
                    return failure.mode
        return None

    def store_blob(self, data: bytes) -> str:
        oid = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / oid).write_bytes(data)
        return oid


def _route_name(method: str, path: str) -> str:
    if path == "/api/repos/create":
        return "create"
    if path == "/api/validate-yaml":
        return "validate-yaml"
    if m := _API.match(path):
        return m["route"]
    if _LFS_BATCH.match(path):
        return "lfs-batch"
    if method == "PUT" and _LFS_PUT.match(path):
        return "lfs-upload"
    return "unknown"


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: a dropped one affects only itself

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            route = _route_name(method, url.path)
            with hub._lock:
                hub.requests.append((method, route))
                over = len(hub.requests) > hub.max_requests
            if over:
                self._json(503, {"error": "fake hub: request budget spent"})
                threading.Thread(target=hub.stop).start()
                return
            auth = self.headers.get("Authorization", "")
            if route != "lfs-upload":  # presigned storage URLs carry no token, as on the Hub
                hub.auth_headers.append(auth)
            failure = hub.take_failure(route)
            if failure == "drop":
                self._read_body()
                self.close_connection = True
                return
            if failure == "500":
                self._read_body()
                self._json(500, {"error": "fake hub: internal error"})
                return
            if failure == "401" or (route != "lfs-upload" and auth != f"Bearer {hub.token}"):
                self._read_body()
                self._json(401, {"error": f"Invalid credentials (got Authorization: {auth})"})
                return
            try:
                if route == "lfs-upload":
                    self._lfs_put(_LFS_PUT.match(url.path)["oid"])  # type: ignore[index]
                    return
                body = self._read_body()
                status, payload = self._answer(route, path, query, body)
            except (ValueError, KeyError, TypeError) as e:
                status, payload = 400, {"error": f"fake hub: bad request: {e}"}
            self._json(status, payload)

        def _answer(self, route: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
            if route == "create":
                data = json.loads(body)
                repo_id = f"{data['organization']}/{data['name']}"
                with hub._lock:
                    if repo_id in hub.repos:
                        return 409, {
                            "error": "You already created this model repo",
                            "url": self._url(repo_id),
                        }
                    hub.repos[repo_id] = Repo(private=bool(data.get("private", False)))
                return 200, {"url": self._url(repo_id)}
            if route == "validate-yaml":
                return _validate_yaml(json.loads(body)["content"])
            if route in ("lfs-batch", "preupload", "commit", "branch"):
                m = (_LFS_BATCH if route == "lfs-batch" else _API).match(path)
                assert m is not None
                repo = hub.repos.get(m["repo"])
                if repo is None:
                    return 404, {"error": f"Repository {m['repo']} not found"}
                if route == "lfs-batch":
                    return 200, self._lfs_batch(json.loads(body))
                rev, create_pr = m["rev"], query.get("create_pr") == ["1"]
                if route == "branch":
                    if rev in repo.branches:
                        return 409, {"error": f"Reference {rev} already exists"}
                    repo.branches[rev] = dict(repo.branches["main"])
                    return 200, {}
                if rev not in repo.branches:
                    return 404, {"error": f"Invalid rev id: {rev}"}
                if route == "preupload":
                    return 200, {"files": [_upload_mode(f) for f in json.loads(body)["files"]]}
                return self._commit(m["repo"], repo, rev, create_pr, body)
            return 404, {"error": f"fake hub: no route for {path}"}

        def _commit(self, repo_id: str, repo: Repo, rev: str, create_pr: bool, body: bytes) -> tuple[int, Any]:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header, ops = lines[0], lines[1:]
            if header["key"] != "header":
                raise ValueError("the first NDJSON line must be the header")
            tree = dict(repo.branches[rev])
            for op in ops:
                value = op["value"]
                if op["key"] == "file":
                    tree[value["path"]] = hub.store_blob(base64.b64decode(value["content"]))
                elif op["key"] == "lfsFile":
                    if not (hub.root / "blobs" / value["oid"]).is_file():
                        return 400, {"error": f"LFS object {value['oid']} of {value['path']} was not uploaded"}
                    tree[value["path"]] = value["oid"]
                elif op["key"] == "deletedFile":
                    tree.pop(value["path"])
                else:
                    raise ValueError(f"unsupported commit operation {op['key']!r}")
            oid = hashlib.sha1(json.dumps([header, sorted(tree.items())]).encode()).hexdigest()
            with hub._lock:
                repo.commits.append({"oid": oid, "ref": rev, "summary": header["value"]["summary"]})
                pr_url = None
                if create_pr:
                    number = sum(ref.startswith("refs/pr/") for ref in repo.branches) + 1
                    repo.branches[f"refs/pr/{number}"] = tree
                    pr_url = f"{self._url(repo_id)}/discussions/{number}"
                else:
                    repo.branches[rev] = tree
            return 200, {
                "commitUrl": f"{self._url(repo_id)}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": pr_url,
            }

        def _lfs_batch(self, data: dict[str, Any]) -> dict[str, Any]:
            objects = []
            for obj in data["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if not (hub.root / "blobs" / obj["oid"]).is_file():  # already stored: no upload action
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            return {"transfer": "basic", "objects": objects}

        def _lfs_put(self, oid: str) -> None:
            """Stream the body to disk while hashing it; keep it only if its sha256 is the announced oid."""
            length, digest = int(self.headers.get("Content-Length", "0")), hashlib.sha256()
            partial = hub.root / "blobs" / f".{oid}.partial"
            with partial.open("wb") as f:
                while length > 0:
                    chunk = self.rfile.read(min(length, 1 << 20))
                    if not chunk:
                        break
                    digest.update(chunk)
                    f.write(chunk)
                    length -= len(chunk)
            if digest.hexdigest() != oid:
                partial.unlink()
                self._json(400, {"error": "fake hub: uploaded content does not match its oid"})
                return
            partial.replace(hub.root / "blobs" / oid)
            self._json(200, {})

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(parts)
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def _url(self, repo_id: str) -> str:
            return f"{hub.url}/{repo_id}"

        def _json(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _upload_mode(file: dict[str, Any]) -> dict[str, Any]:
    lfs = file["path"].endswith(LFS_SUFFIXES) or int(file["size"]) >= LFS_THRESHOLD
    return {"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}


def _validate_yaml(content: str) -> tuple[int, dict[str, Any]]:
    """Like the Hub: the README's front matter must be a YAML mapping with well-typed known fields."""
    m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
    if m is None:
        return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
    try:
        meta = yaml.safe_load(m[1])
    except yaml.YAMLError as e:
        return 400, {"errors": [{"message": f"invalid YAML: {e}"}]}
    if not isinstance(meta, dict):
        return 400, {"errors": [{"message": "metadata must be a YAML mapping"}]}
    errors = [
        {"message": f"{key} must be a string"}
        for key in ("license", "library_name", "pipeline_tag")
        if key in meta and not isinstance(meta[key], str)
    ]
    if not isinstance(meta.get("tags", []), list):
        errors.append({"message": "tags must be a list"})
    return (400 if errors else 200), {"errors": errors, "warnings": []}
