"""A checkpoint on the Hugging Face Hub, read by byte ranges.

Kimi-K2 is about 1 TB; a reduced model keeps a few percent of it. safetensors shards are
self-describing, so the reader needs each shard's header (one 64 KiB range request) and then
only the byte ranges of the tensors it keeps. Everything goes through huggingface_hub so
its conventions hold: ``HF_ENDPOINT``, ``HF_TOKEN`` / the stored token, ``HF_HOME`` /
``HF_HUB_CACHE`` for the small files, ``HF_HUB_OFFLINE``.

The revision is resolved once to a commit sha and every later request names that sha: a
branch that moves mid-run cannot give us a config from one commit and tensors from another.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from k2mini.checkpoint.source import LocalSource, Source, check_relative
from k2mini.errors import CheckpointError, UsageError
from k2mini.sizes import parse_size

# ``org/name`` or ``org/name@revision`` (a revision may itself contain slashes: refs/pr/3).
_REPO_LOCATION = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>\S+))?$")
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT = (httpx2.TransportError,)
# First backoff wait in seconds, doubled per consecutive failure up to MAX_WAIT (the same
# schedule as huggingface_hub's http_backoff). Module-level so tests can shorten it.
RETRY_WAIT = 1.0
MAX_WAIT = 8.0
# The Hub answers a resolve URL with a redirect to a signed CDN URL (two round trips per
# range). The signed URL is reused for this long, then resolved again; signatures last longer.
LOCATION_TTL = 300.0
# A stale signed URL answers one of these; the range is then asked of the resolve URL again.
_EXPIRED_STATUS = frozenset({401, 403, 404, 410})
# Range requests in flight at once. A ranged GET mostly waits: one round trip before the
# first byte (two without a cached CDN location), and one TCP stream rarely fills the link.
# K2's weight scoring alone asks for ~27k scale grids of 3.6 KB each (24 layers x 384
# experts x 3), about 23 minutes of round trips at 50 ms one after another.
CONNECTIONS = 8
# A range longer than this is fetched as pieces of this size in parallel (K2's embedding and
# lm_head are 2.3 GB each; an expert's FP8 weight, 14.7 MB, stays one request).
PIECE_BYTES = 32 << 20


def parse_repo_location(location: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``location`` reads as a Hub repo id, else None."""
    m = _REPO_LOCATION.match(location)
    if m is None or m.group("repo").startswith(".") or ".." in m.group("repo"):
        return None
    return m.group("repo"), m.group("rev")


def open_source(location: str | os.PathLike) -> Source:
    """An existing local path stays local; ``org/name[@revision]`` that is not one is a Hub repo.

    ``K2MINI_CACHE_DIR`` (and ``K2MINI_CACHE_SIZE``, default 50GiB, a size as k2mini/sizes.py reads it) keep the
    tensor ranges a Hub run fetched, so that a convert after an analyze of the same commit reads them locally.
    """
    text = os.fspath(location)
    if not Path(text).exists():
        parsed = parse_repo_location(text)
        if parsed is not None:
            cache_dir = os.environ.get("K2MINI_CACHE_DIR")
            cache = RangeCache(cache_dir, parse_size(os.environ.get("K2MINI_CACHE_SIZE", "50GiB"), flag="K2MINI_CACHE_SIZE", minimum=0)) if cache_dir else None
            return HubSource(*parsed, cache=cache, concurrency=connections_from_env())
    return LocalSource(text)


def connections_from_env() -> int:
    """``K2MINI_HUB_CONNECTIONS``: Range requests in flight at once (default 8, at most 64)."""
    text = os.environ.get("K2MINI_HUB_CONNECTIONS", str(CONNECTIONS))
    if not text.strip().isdigit() or not 1 <= int(text) <= 64:
        raise UsageError(f"K2MINI_HUB_CONNECTIONS={text!r}: expected a whole number from 1 to 64")
    return int(text)


class RangeCache:
    """Byte ranges fetched from the Hub, on local disk, least recently used dropped past ``max_bytes``.

    Keyed by commit sha, file, offset and length: the reader asks for the same per-tensor
    ranges in every command, so exact keys hit, and a pinned sha can never serve bytes of
    another commit. Entries are written to a temporary name and renamed, so an interrupted
    run leaves no short entry; a size mismatch on read is treated as a miss.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.hit_bytes = 0
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cache directory {root}: {e.strerror}") from None
        # One scan at start; afterwards the LRU order is kept in memory.
        found = [(p.stat().st_mtime_ns, p) for p in self.root.rglob("*.bin")]
        self._lru: OrderedDict[Path, int] = OrderedDict((p, p.stat().st_size) for _, p in sorted(found))
        self._total = sum(self._lru.values())

    def _path(self, sha: str, rel: str, offset: int, n: int) -> Path:
        return self.root / sha / rel / f"{offset}-{n}.bin"

    def get(self, sha: str, rel: str, offset: int, out: memoryview) -> bool:
        p = self._path(sha, rel, offset, len(out))
        try:
            with open(p, "rb") as f:
                if f.readinto(out) != len(out) or f.read(1):
                    return False
        except OSError:
            return False
        with self._lock:
            if p in self._lru:
                self._lru.move_to_end(p)
            self.hit_bytes += len(out)
        try:
            os.utime(p)  # the order a later run starts from
        except OSError:
            pass
        return True

    def put(self, sha: str, rel: str, offset: int, data: memoryview) -> None:
        n = len(data)
        if n > self.max_bytes:
            return
        p = self._path(sha, rel, offset, n)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except OSError:
            # A full or read-only cache disk must not fail the run: the bytes are in memory.
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._total += n - self._lru.pop(p, 0)
            self._lru[p] = n
            while self._total > self.max_bytes and self._lru:
                old, size = self._lru.popitem(last=False)
                old.unlink(missing_ok=True)
                self._total -= size


class _Transient(Exception):
    """A failure worth retrying: a 5xx/429 answer or a connection that broke."""


class HubSource:
    """A Hub model repository pinned to one commit, read by HTTP Range requests.

    ``bytes_read`` counts body bytes actually received (a retried range counts the part
    that arrived before it broke, the resumed rest counts once more), so it is what the
    network carried, not what the reader asked for.
    """

    def __init__(
        self,
        repo_id: str,
        revision: str | None = None,
        *,
        endpoint: str | None = None,
        token: str | bool | None = None,
        max_retries: int = 5,
        retry_wait: float | None = None,
        max_wait: float | None = None,
        timeout: float = 60.0,
        cache: RangeCache | None = None,
        concurrency: int = CONNECTIONS,
    ):
        self.repo_id = repo_id
        self.requested_revision = revision
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token
        self.max_retries = max_retries
        self.retry_wait = RETRY_WAIT if retry_wait is None else retry_wait
        self.max_wait = MAX_WAIT if max_wait is None else max_wait
        self.timeout = timeout
        self.cache = cache
        self.concurrency = concurrency
        self.bytes_read = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._piece_pool: ThreadPoolExecutor | None = None
        # Whoever reads (read-ahead threads, parallel pieces, read_many), at most this many
        # Range requests are open at once.
        self._slots = threading.BoundedSemaphore(concurrency)
        rev_text = f"@{revision}" if revision else ""
        self.description = f"{repo_id}{rev_text}"
        api = HfApi(endpoint=self.endpoint, token=token)
        info = self._call(lambda: api.model_info(repo_id, revision=revision), what="resolving the revision")
        if not info.sha:
            raise CheckpointError(f"{self.endpoint} gave no commit sha for this revision", path=self.description)
        self.commit_sha: str = info.sha
        # The listing is taken at the pinned sha, not at the branch name, for the same reason.
        entries = self._call(
            lambda: list(api.list_repo_tree(repo_id, revision=self.commit_sha, recursive=True)), what="listing files"
        )
        self._sizes: dict[str, int] = {e.path: int(e.size) for e in entries if isinstance(e, RepoFile)}
        self.description = f"{repo_id}@{self.commit_sha}"
        self._headers = build_hf_headers(token=token)
        # Exact byte counts: a compressed body would not match the Range we asked for.
        self._headers["Accept-Encoding"] = "identity"
        self._locations: dict[str, tuple[str, float]] = {}  # rel -> (signed CDN URL, when resolved)

    # -- error mapping -----------------------------------------------------------------

    def _call(self, fn, *, what: str, rel: str | None = None):
        """Run one huggingface_hub call with retries on transient failures; map errors to one line."""
        where = f"{self.description}/{rel}" if rel else self.description
        failures = 0
        while True:
            try:
                return fn()
            except OfflineModeIsEnabled:
                raise CheckpointError(
                    "HF_HUB_OFFLINE is set, so a Hub repo cannot be read; unset it or pass a local directory", path=where
                ) from None
            except RevisionNotFoundError:
                raise CheckpointError(
                    f"revision {self.requested_revision!r} does not exist on {self.endpoint}", path=self.repo_id
                ) from None
            except GatedRepoError:
                raise CheckpointError(
                    f"the repo is gated on {self.endpoint}: accept its terms and set HF_TOKEN", path=self.repo_id
                ) from None
            except RepositoryNotFoundError:
                raise CheckpointError(
                    f"no local directory of that name, and no such repo on {self.endpoint} "
                    "(or it is private: set HF_TOKEN)",
                    path=self.repo_id,
                ) from None
            except EntryNotFoundError:
                raise CheckpointError("file is missing from the repo", path=where) from None
            except (HfHubHTTPError, *_TRANSIENT, LocalEntryNotFoundError) as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                transient = isinstance(e, (*_TRANSIENT, LocalEntryNotFoundError)) or status in _RETRY_STATUS
                failures += 1
                if not transient or failures > self.max_retries:
                    reason = f"HTTP {status}" if status else type(e).__name__
                    # Before the revision is resolved the name may as well have been a mistyped path.
                    hint = "no local directory of that name, and " if not hasattr(self, "commit_sha") else ""
                    raise CheckpointError(f"{hint}{what} failed on {self.endpoint}: {reason}", path=where) from None
                self._sleep(failures)

    def _sleep(self, failures: int) -> None:
        time.sleep(min(self.max_wait, self.retry_wait * 2 ** (failures - 1)))

    # -- Source protocol ---------------------------------------------------------------

    def _known(self, rel: str) -> int:
        check_relative(rel, where=self.description)
        size = self._sizes.get(rel)
        if size is None:
            raise CheckpointError("file is missing from the repo", path=f"{self.description}/{rel}")
        return size

    def exists(self, rel: str) -> bool:
        check_relative(rel, where=self.description)
        return rel in self._sizes

    def size(self, rel: str) -> int:
        return self._known(rel)

    def list_files(self) -> list[str]:
        return sorted(self._sizes)

    def url(self, rel: str) -> str:
        return hf_hub_url(self.repo_id, rel, revision=self.commit_sha, endpoint=self.endpoint)

    def read_bytes(self, rel: str) -> bytes:
        """A small file whole, through the Hub cache (config, index, tokenizer files)."""
        self._known(rel)
        cached = try_to_load_from_cache(self.repo_id, rel, revision=self.commit_sha)
        path = self._call(
            lambda: hf_hub_download(
                self.repo_id, rel, revision=self.commit_sha, endpoint=self.endpoint, token=self.token
            ),
            what=f"downloading {rel}",
            rel=rel,
        )
        data = Path(path).read_bytes()
        if not isinstance(cached, str):
            with self._lock:
                self.bytes_read += len(data)
        return data

    def read_into(self, rel: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``rel`` at ``offset``: one Range request, or pieces of ``PIECE_BYTES``
        in parallel for a long range; each resumed where it breaks."""
        out = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        n = len(out)
        size = self._known(rel)
        where = f"{self.description}/{rel}"
        if offset < 0 or offset + n > size:
            raise CheckpointError(f"truncated: wanted {n} bytes at offset {offset}, file has {size}", path=where)
        if n == 0:
            return
        if self.cache is not None and self.cache.get(self.commit_sha, rel, offset, out):
            return
        url = self.url(rel)
        if n <= PIECE_BYTES or self.concurrency < 2:
            self._fetch_range(url, rel, offset, out)
        else:
            with self._lock:
                if self._piece_pool is None:
                    self._piece_pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="k2mini-hub")
            futures = [
                self._piece_pool.submit(self._fetch_range, url, rel, offset + a, out[a : a + PIECE_BYTES])
                for a in range(0, n, PIECE_BYTES)
            ]
            # Every piece has ended (written or failed) before the caller gets its buffer back.
            wait(futures)
            for f in futures:
                f.result()
        if self.cache is not None:
            self.cache.put(self.commit_sha, rel, offset, out)

    def _fetch_range(self, url: str, rel: str, offset: int, out: memoryview) -> None:
        """One Range request for ``out``, resumed where it breaks.

        huggingface_hub's http_stream_backoff retries a request that fails to start, but a
        body that breaks mid-stream surfaces in the caller's loop and cannot be resumed there,
        so one loop here handles both and asks again only for the bytes still missing.
        """
        n = len(out)
        progress = [0]  # bytes of out filled; survives a broken attempt so the next resumes there
        failures = 0
        while progress[0] < n:
            before = progress[0]
            try:
                self._fetch(url, rel, offset, n, progress, out)
            except _Transient as e:
                # Consecutive failures without progress count; a long read that keeps
                # moving forward may break more than max_retries times in all.
                failures = 0 if progress[0] > before else failures + 1
                if failures > self.max_retries:
                    raise CheckpointError(
                        f"reading bytes {offset + progress[0]}-{offset + n - 1} failed after {self.max_retries} retries: {e}",
                        path=f"{self.description}/{rel}",
                    ) from None
                if failures:
                    self._sleep(failures)

    def _location(self, rel: str) -> str | None:
        with self._lock:
            hit = self._locations.get(rel)
        return hit[0] if hit is not None and time.monotonic() - hit[1] < LOCATION_TTL else None

    def _fetch(self, url: str, rel: str, offset: int, n: int, progress: list[int], out: memoryview) -> None:
        start, end = offset + progress[0], offset + n - 1
        headers = {**self._headers, "Range": f"bytes={start}-{end}"}
        where = f"{self.description}/{rel}"
        cdn = self._location(rel)
        if cdn is not None:
            url = cdn
            if httpx2.URL(cdn).origin != httpx2.URL(self.endpoint).origin:
                headers.pop("authorization", None)  # the token is for the Hub only, as httpx does on redirects
        with self._lock:
            self.requests += 1
        try:
            with self._slots, get_session().stream("GET", url, headers=headers, timeout=self.timeout) as r:
                if cdn is not None and r.status_code in _EXPIRED_STATUS:
                    with self._lock:
                        self._locations.pop(rel, None)
                    raise _Transient(f"signed URL answered HTTP {r.status_code}")
                if r.status_code in _RETRY_STATUS:
                    raise _Transient(f"HTTP {r.status_code}")
                if r.status_code >= 400:
                    try:
                        r.read()
                        hf_raise_for_status(r)
                    except EntryNotFoundError:
                        raise CheckpointError("file is missing from the repo", path=where) from None
                    except HfHubHTTPError:
                        raise CheckpointError(f"HTTP {r.status_code} for bytes {start}-{end}", path=where) from None
                if r.status_code == 200:
                    # A server that ignores Range sends the whole file; accept that only
                    # when the whole file is what we asked for.
                    if start != 0 or end != self._sizes[rel] - 1:
                        raise CheckpointError("the server ignored the Range request (HTTP 200)", path=where)
                elif r.status_code == 206:
                    got = _content_range_start(r.headers.get("Content-Range"))
                    if got != start:
                        raise CheckpointError(
                            f"asked for bytes from {start}, server sent Content-Range {r.headers.get('Content-Range')!r}",
                            path=where,
                        )
                else:
                    raise CheckpointError(f"unexpected HTTP {r.status_code} for a Range request", path=where)
                if cdn is None and r.history:
                    with self._lock:
                        self._locations[rel] = (str(r.url), time.monotonic())
                try:
                    for chunk in r.iter_raw():
                        k = len(chunk)
                        with self._lock:
                            self.bytes_read += k
                        done = progress[0]
                        if done + k > n:
                            raise CheckpointError(f"server sent more than the {end - start + 1} bytes asked for", path=where)
                        out[done : done + k] = chunk
                        progress[0] = done + k
                except _TRANSIENT as e:
                    raise _Transient(f"connection broke after {progress[0]} of {n} bytes ({type(e).__name__})") from None
        except _TRANSIENT as e:
            raise _Transient(type(e).__name__) from None
        except OfflineModeIsEnabled:
            raise CheckpointError("HF_HUB_OFFLINE is set, so a Hub repo cannot be read", path=where) from None
        if progress[0] < n:
            raise _Transient(f"body ended after {progress[0]} of {n} bytes")


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(m.group(1)) if m else None
