"""A loopback stand-in for the Hugging Face Hub, serving checkpoint directories.

It answers exactly the endpoints huggingface_hub 2.x calls for a model repo:
``GET /api/models/{repo}/revision/{rev}`` (HfApi.model_info: ``id``, ``sha``, ``siblings``),
``GET /api/models/{repo}/tree/{rev}`` (HfApi.list_repo_tree: ``type``, ``path``, ``size``,
``oid``), and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` (hf_hub_download and Range
reads: ``X-Repo-Commit``, ``ETag``, ``Content-Length``, ``Accept-Ranges``, 206 with
``Content-Range``). Errors carry the ``X-Error-Code`` header huggingface_hub maps to its
exception types (RepoNotFound, RevisionNotFound, EntryNotFound).

It counts body bytes sent per file, and can be told to answer 5xx or to drop the connection
part-way through a body for the next N ranged GETs.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, Path] = field(default_factory=dict)  # sha -> directory
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha


@dataclass
class Fault:
    kind: str  # "status" or "drop"
    count: int
    status: int = 503
    after: int = 0  # for "drop": body bytes sent before the connection is cut
    min_length: int = 0  # only ranged GETs asking for at least this many bytes (to aim at big tensors)


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer (after a 5xx it does not read, or an injected drop) is
    normal traffic for the Hub; the stock server prints a traceback for it to stderr, which
    CliRunner captures into the command's output."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.sent = Counter()  # file path -> body bytes sent by GET /resolve
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.authorizations: list[str | None] = []  # Authorization header of each request
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        # Like the Hub: with cdn on, a ranged GET on /resolve is redirected to a signed URL on
        # another origin (here another port), which goes stale when expire_cdn() is called.
        self.cdn = False
        self.latency = 0.0  # seconds added before every answer (a benchmark's stand-in for distance)
        self.in_flight = 0  # requests being answered now
        self.max_in_flight = 0  # the most answered at once since reset_counts
        self.cdn_generation = 0
        self._servers = [_QuietServer(("127.0.0.1", 0), _handler(self)) for _ in range(2)]
        self._server, self._cdn_server = self._servers
        for srv in self._servers:
            srv.daemon_threads = True
        self._threads = [threading.Thread(target=srv.serve_forever, daemon=True) for srv in self._servers]

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_endpoint(self) -> str:
        host, port = self._cdn_server.server_address[:2]
        return f"http://{host}:{port}"

    def expire_cdn(self) -> None:
        with self._lock:
            self.cdn_generation += 1

    def __enter__(self) -> FakeHub:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()

    # -- repo content ------------------------------------------------------------------

    def add(self, repo_id: str, directory: Path, branch: str = "main") -> str:
        """Publish ``directory`` as a new commit of ``repo_id`` on ``branch``; returns its sha."""
        h = hashlib.sha1(repo_id.encode())
        for p in sorted(Path(directory).rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(directory)).encode())
                h.update(hashlib.sha1(p.read_bytes()).digest())
        sha = h.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[sha] = Path(directory)
        repo.refs[branch] = sha
        return sha

    def fail(self, kind: str, count: int, *, status: int = 503, after: int = 0, min_length: int = 0) -> None:
        """The next ``count`` ranged GETs (of at least ``min_length`` bytes) answer ``status``
        (kind "status") or break after ``after`` body bytes (kind "drop"). Faults queue in order."""
        with self._lock:
            self.faults.append(Fault(kind, count, status, after, min_length))

    def take_fault(self, length: int) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.count > 0 and length >= f.min_length:
                    f.count -= 1
                    return f
            return None

    def total_sent(self) -> int:
        return sum(self.sent.values())

    def reset_counts(self) -> None:
        with self._lock:
            self.sent.clear()
            self.requests.clear()
            self.authorizations.clear()
            self.max_in_flight = 0


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes; with Nagle on, each response waits
        # ~40 ms for the client's delayed ACK.
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        # -- helpers -------------------------------------------------------------------

        def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, head: bool = False, extra: dict | None = None):
            body = json.dumps({"error": code}).encode()
            self._reply(status, body, {"X-Error-Code": code, "Content-Type": "application/json", **(extra or {})}, head)

        def _json(self, obj):
            self._reply(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, rev: str, head: bool = False) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", head)
                return None
            sha = repo.refs.get(rev, rev if rev in repo.commits else None)
            if sha is None:
                self._error(404, "RevisionNotFound", head)
                return None
            return repo, sha

        # -- routes --------------------------------------------------------------------

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def _route(self, head: bool):
            with hub._lock:
                hub.in_flight += 1
                hub.max_in_flight = max(hub.max_in_flight, hub.in_flight)
            try:
                self._answer(head)
            finally:
                with hub._lock:
                    hub.in_flight -= 1

        def _answer(self, head: bool):
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            if hub.latency:
                time.sleep(hub.latency)
            with hub._lock:
                hub.requests.append((self.command, url.path, self.headers.get("Range")))
                hub.authorizations.append(self.headers.get("Authorization"))
            if parts[:2] == ["api", "models"] and (len(parts) == 4 or (len(parts) >= 6 and parts[4] in ("revision", "tree"))):
                # model_info without a revision asks /api/models/{repo}: the default branch.
                repo_id = f"{parts[2]}/{parts[3]}"
                kind, rev = (parts[4], "/".join(parts[5:])) if len(parts) > 4 else ("revision", "main")
                if (r := self._resolve(repo_id, rev, head)) is None:
                    return
                repo, sha = r
                files = sorted(p for p in repo.commits[sha].rglob("*") if p.is_file())
                rels = [str(p.relative_to(repo.commits[sha])) for p in files]
                if kind == "revision":
                    return self._json({"id": repo_id, "sha": sha, "siblings": [{"rfilename": r} for r in rels]})
                return self._json(
                    [
                        {"type": "file", "path": r, "size": p.stat().st_size, "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                        for r, p in zip(rels, files)
                    ]
                )
            if len(parts) >= 5 and parts[2] == "resolve":
                # hf_hub_url quotes the revision whole (refs/pr/1 -> refs%2Fpr%2F1), so it is one segment here.
                repo_id, rev, rel = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                if (r := self._resolve(repo_id, rev, head)) is None:
                    return
                repo, sha = r
                path = repo.commits[sha] / rel
                if not path.is_file():
                    return self._error(404, "EntryNotFound", head, {"X-Repo-Commit": sha})
                if hub.cdn and not head and "Range" in self.headers:
                    target = f"{hub.cdn_endpoint}/cdn/{repo_id}/{sha}/{rel}?generation={hub.cdn_generation}"
                    return self._reply(302, b"", {"Location": target, "X-Repo-Commit": sha})
                return self._file(path, rel, sha, head)
            if len(parts) >= 5 and parts[0] == "cdn":
                repo_id, sha, rel = f"{parts[1]}/{parts[2]}", parts[3], "/".join(parts[4:])
                repo = hub.repos.get(repo_id)
                if repo is None or sha not in repo.commits or url.query != f"generation={hub.cdn_generation}":
                    return self._reply(403, b"expired", {})
                return self._file(repo.commits[sha] / rel, rel, sha, head)
            self._error(404, "RepoNotFound", head)

        def _file(self, path: Path, rel: str, sha: str, head: bool):
            size = path.stat().st_size
            headers = {
                "X-Repo-Commit": sha,
                "ETag": f'"{_etag(path)}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            rng = self.headers.get("Range")
            if head or rng is None:
                return self._send_body(200, b"" if head else path.read_bytes(), headers, head, rel, size)
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            start = int(start_s)
            end = min(int(end_s) if end_s else size - 1, size - 1)
            if start >= size or end < start:
                return self._reply(416, b"", {"Content-Range": f"bytes */{size}"})
            fault = hub.take_fault(end + 1 - start)
            if fault is not None and fault.kind == "status":
                return self._error(fault.status, "ServerError")
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            with open(path, "rb") as f:
                f.seek(start)
                body = f.read(end + 1 - start)
            if fault is not None and fault.kind == "drop":
                self.send_response(206)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = body[: fault.after]
                with hub._lock:  # counted before sending, so a client that has the bytes sees the count
                    hub.sent[rel] += len(cut)
                self.wfile.write(cut)
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._send_body(206, body, headers, False, rel)

        def _send_body(self, status, body, headers, head, rel, size=None):
            if head:
                # A HEAD answers the size of the body a GET would send, without sending it.
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                return
            with hub._lock:  # counted before sending, so a client that has the bytes sees the count
                hub.sent[rel] += len(body)
            self._reply(status, body, headers)

    return Handler


def _etag(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
