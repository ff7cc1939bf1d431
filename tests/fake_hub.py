"""A real HTTP server on 127.0.0.1 speaking the subset of the Hugging Face Hub API that `push_to_hub` / `upload_folder`
and `from_pretrained` use. Files are kept in memory; every commit is recorded.

Endpoints: create repo, validate YAML, preupload (always "regular" uploads, no LFS), NDJSON commit, repo / revision
info, and `resolve` downloads (GET / HEAD with ETag and X-Repo-Commit headers, 404 with X-Error-Code).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class FakeRepo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)
    private: bool = False

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


@dataclass
class FakeHubState:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    fail_commits: int = 0  # answer the next N commit requests with HTTP 500
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (method, path, headers)


class _Handler(BaseHTTPRequestHandler):
    state: FakeHubState
    endpoint: str

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

    # ------------------------------------------------------------------ helpers
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, payload: object, status: int = 200, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._json({"error": message}, status=status, headers={"X-Error-Code": code, "X-Error-Message": message})

    def _record(self) -> None:
        self.state.requests.append((self.command, self.path, dict(self.headers)))

    # ------------------------------------------------------------------ routes
    def do_POST(self) -> None:
        self._record()
        path = urlparse(self.path).path
        body = self._body()
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            private = request.get("visibility") == "private" or bool(request.get("private"))
            self.state.repos.setdefault(repo_id, FakeRepo(private=private))
            return self._json({"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if match := re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path):
            files = json.loads(body)["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self._json({"files": answer})
        if match := re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path):
            repo = self.state.repos.get(unquote(match[1]))
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if self.state.fail_commits > 0:
                self.state.fail_commits -= 1
                return self._error(500, "InternalError", "storage backend unavailable")
            staged, summary = {}, ""
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    summary = item["value"]["summary"]
                elif item["key"] == "file":
                    staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo.files.update(staged)
            oid = hashlib.sha1(repr((len(repo.commits), sorted(staged))).encode()).hexdigest()
            repo.commits.append({"oid": oid, "summary": summary, "files": sorted(staged)})
            commit_url = f"{self.endpoint}/{unquote(match[1])}/commit/{oid}"
            return self._json({"commitUrl": commit_url, "commitOid": oid, "pullRequestUrl": None})
        return self._error(404, "EntryNotFound", f"no route for POST {path}")

    def _info(self, repo_id: str) -> None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.files.items())]
        return self._json(
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.sha,
                "private": repo.private,
                "siblings": siblings,
                "tags": [],
                "cardData": {},
            }
        )

    def _resolve(self, head: bool) -> None:
        self._record()
        path = urlparse(self.path).path
        if match := re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path):
            return self._info(unquote(match[1]))
        match = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", path)
        if not match:
            return self._error(404, "EntryNotFound", f"no route for {path}")
        repo = self.state.repos.get(unquote(match[1]))
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        name = unquote(match[3])
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist")
        data = repo.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._resolve(head=False)

    def do_HEAD(self) -> None:
        self._resolve(head=True)


class FakeHub:
    """Start with `FakeHub()`, use `.endpoint`, `.state`; stop with `.close()`."""

    def __init__(self) -> None:
        self.state = FakeHubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        handler.endpoint = self.endpoint
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
