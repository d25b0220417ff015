"""A fake Hugging Face Hub: a local HTTP server that the real `huggingface_hub` client (2.4.0) downloads from
when HF_ENDPOINT points at it. Stdlib only, binds 127.0.0.1 only.

What the client asks of a server (paths are in the huggingface_hub package):

- HEAD {endpoint}/{repo}/resolve/{rev}/{file} (file_download.py:get_hf_file_metadata) must carry X-Repo-Commit
  and an ETag (or X-Linked-Etag), else FileMetadataError; the size is X-Linked-Size or Content-Length.
  Redirects to the same origin are followed, a redirect to another origin ends the HEAD and its Location is
  where the GET goes (utils/_http.py:_httpx2_follow_hub_redirects_with_backoff). On the Hub an LFS file
  answers with a 302 to its CDN, another host; here the CDN is a second listener on another port, so the
  client takes the same path: one HEAD to the Hub, one GET to the CDN. No X-Xet-Hash header: plain HTTP.
- The GET (file_download.py:http_get) checks no hash, only that the byte count equals the HEAD's size
  (OSError "Consistency check failed"). After a dropped connection it asks again, 1 s later, for what it has
  not written, `Range: bytes=N-`; it writes by 10 MB chunks, so N is a multiple of 10 MB (0: no Range). It
  gives up after 5 tries that got no byte further. The bytes go to blobs/<etag>.<8 hex>.incomplete, renamed
  to blobs/<etag> when complete, deleted on failure. With revision=<sha> and the file in the cache,
  hf_hub_download makes no request at all.
- Errors (utils/_http.py:hf_raise_for_status) are told apart by the X-Error-Code header: RepoNotFound
  (the Hub answers 401 to anonymous clients), RevisionNotFound and EntryNotFound (404).
- API (hf_api.py): model_info/repo_info read /api/models/{repo}[/revision/{rev}]; list_repo_files and
  snapshot_download list /api/models/{repo}/tree/{sha}?recursive=true; get_paths_info POSTs a form to
  /api/models/{repo}/paths-info/{rev}. get_safetensors_metadata HEADs model.safetensors, then the index,
  downloads the index, and GETs each shard's /resolve URL with `Range: bytes=0-100000`, following the redirect.
  With telemetry on, a client fetches /api/agent-harnesses once a day per HF_HOME (utils/_detect_agent.py).

Node prefixes: HF_ENDPOINT may carry a path (http://127.0.0.1:PORT/node0); the client keeps it in every URL it
builds, and the CDN redirects keep it too, so that each request and byte served is counted per node.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub takes no larger file in git: it must go to LFS
CHUNK = 64 * 1024  # body write size, and the unit of the "slow" fault's delay
DATE = "2024-01-01T00:00:00.000Z"
FAULT_KINDS = ("missing", "error", "truncate", "short", "slow", "garbage", "norange")

_NODE = r"(?:/(?P<node>[^/]+))?"
_RESOLVE = re.compile(_NODE + r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")
_API = re.compile(_NODE + r"/api/models/(?P<repo>[^/]+/[^/]+)"
                  r"(?:/(?P<op>revision|tree|paths-info)/(?P<rev>[^/]+)(?:/(?P<path>.+))?)?")
_HARNESSES = re.compile(_NODE + r"/api/agent-harnesses")
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def _git_sha1(kind: str, data: bytes) -> str:
    return hashlib.sha1(b"%s %d\0" % (kind.encode(), len(data)) + data).hexdigest()


class _File:
    """One file of a commit. A git file is known by its git blob sha1. An LFS file is a pointer in git (the
    pointer's blob sha1 is its `oid`) and is known by the sha256 of its content."""

    def __init__(self, name: str, data: bytes):
        self.data, self.size = data, len(data)
        self.lfs = name.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_SIZE
        self.sha256 = hashlib.sha256(data).hexdigest() if self.lfs else None
        self.pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
                        .encode() if self.lfs else None)
        self.oid = _git_sha1("blob", self.pointer if self.lfs else data)

    def entry(self, path: str) -> dict:
        """The file as the tree and paths-info endpoints list it."""
        e = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.lfs:
            e["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return e


class _Repo:
    def __init__(self):
        self.commits: dict[str, dict[str, _File]] = {}  # sha -> {path: file}, never changed once made
        self.refs: dict[str, str] = {}  # branch or tag -> sha

    def resolve(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.commits else None)


class FakeHub:
    """`FakeHub(repos={"acme/tiny": "/dir"}, faults=[...], port=0)`; `with hub:` serves in threads, `hub.url("node0")`
    is an HF_ENDPOINT. Each directory becomes the first commit of its repo's `main`."""

    def __init__(self, repos: dict[str, str | Path] | None = None, faults: list[dict] = (), port: int = 0):
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._faults: list[dict] = []
        self._log: list[dict] = []
        self._active: list[dict] = []  # requests being served now (the log has them once answered)
        self._rate: float | None = None  # bytes/s of file bodies per node, all its connections together
        self._next_free: dict[str, float] = {}
        self._port = port
        self._servers: list[ThreadingHTTPServer] = []  # [hub, cdn] while started
        for repo_id, directory in (repos or {}).items():
            self.push(repo_id, directory)
        for fault in faults:
            self.add_fault(**fault)

    def push(self, repo_id: str, directory: str | Path, revision: str = "main") -> str:
        """A new commit of `directory`'s files (read now) on branch `revision`; returns its sha, which hashes the
        parent's sha and the listing of paths and blob ids."""
        root = Path(directory)
        files = {p.relative_to(root).as_posix(): _File(p.name, p.read_bytes()) for p in sorted(root.rglob("*"))
                 if p.is_file() and ".git" not in p.relative_to(root).parts}
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            listing = "".join(f"{path}\0{f.oid}\n" for path, f in sorted(files.items()))
            sha = hashlib.sha1(f"{repo.refs.get(revision, '')}\n{listing}".encode()).hexdigest()
            repo.commits[sha] = files
            repo.refs[revision] = sha
        return sha

    def create_ref(self, repo_id: str, name: str, revision: str = "main") -> str:
        """Point branch or tag `name` at what `revision` is now; returns the sha."""
        with self._lock:
            repo = self._repos[repo_id]
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            repo.refs[name] = sha
        return sha

    def add_fault(self, file: str, kind: str, *, repo: str | None = None, node: str | None = None,
                  times: int | None = None, after: int | None = None, delay: float = 0.05, status: int = 500):
        """Make downloads of `file` (of `repo` and through `node`, when given) go wrong, `times` times or for good:
        missing: HEAD/GET answer 404 EntryNotFound though listings still show the file;
        error: HEAD/GET answer `status`;
        truncate: a GET body stops at file offset `after` (default: half the file) and the connection closes
          short of its Content-Length, so that asking again gets no further;
        short: a GET body ends at offset `after` with a Content-Length to match, short of the HEAD's size;
        slow: a GET sleeps `delay` seconds before each 64 KiB chunk;
        garbage: a GET body has bytes 8..39 of the file (the start of a safetensors header's JSON) replaced by
          "~", as a broken proxy or disk might send them (same length, same status);
        norange: a GET with a Range is answered 200 with the whole file, as a server ignoring Range does.
        Missing and error count HEADs and GETs, the others GETs of the body."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r} is not one of {FAULT_KINDS}")
        with self._lock:
            self._faults.append(dict(file=file, kind=kind, repo=repo, node=node, times=times, after=after,
                                     delay=delay, status=status))

    def faults(self) -> list[dict]:
        with self._lock:
            return [dict(f) for f in self._faults]

    def limit_bandwidth(self, bytes_per_s: float | None):
        """Serve file bodies to each node (URL prefix) at most `bytes_per_s`, shared by all that node's
        connections, as a node's network link would (None: no limit)."""
        with self._lock:
            self._rate, self._next_free = bytes_per_s, {}

    def _throttle(self, node: str, nbytes: int):
        """Wait for `nbytes` of `node`'s bandwidth."""
        with self._lock:
            if not self._rate:
                return
            now = time.monotonic()
            start = max(now, self._next_free.get(node, now))
            self._next_free[node] = start + nbytes / self._rate
        time.sleep(max(0.0, start - now))

    def clear_faults(self):
        with self._lock:
            self._faults.clear()

    def _take_fault(self, node: str, repo_id: str, path: str, kinds: tuple[str, ...]) -> dict | None:
        with self._lock:
            for f in self._faults:
                if f["kind"] in kinds and f["file"] == path and f["repo"] in (None, repo_id) \
                        and f["node"] in (None, node):
                    if f["times"] is not None:
                        f["times"] -= 1
                        if f["times"] <= 0:
                            self._faults.remove(f)
                    return dict(f)
        return None

    def stats(self) -> dict:
        """{"requests": {node: {kind: count}}, "bytes": {node: {repo: {file: body bytes}}}, "log": [request, ...]}.
        The node is the URL's prefix segment ("" for none). Kinds: "head", "get" (no Range), "range", "api",
        "other". A log entry: node, method, path, kind, repo, file, status, bytes (of file body sent), cdn (bool).
        Control requests (/_...) are not counted."""
        with self._lock:
            log = [dict(r) for r in self._log]
        requests, served = {}, {}
        for r in log:
            requests.setdefault(r["node"], Counter())[r["kind"]] += 1
            if r["bytes"]:
                served.setdefault(r["node"], {}).setdefault(r["repo"], Counter())[r["file"]] += r["bytes"]
        return {"requests": requests, "bytes": served, "log": log}

    def reset(self):
        with self._lock:
            self._log.clear()

    def active(self) -> list[dict]:
        """The requests being answered now (a slow body still going out), as log entries so far."""
        with self._lock:
            return [dict(r) for r in self._active]

    def start(self) -> FakeHub:
        for port, cdn in ((self._port, False), (0, True)):
            server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
            server.hub, server.cdn = self, cdn
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown
            self._servers.append(server)
        return self

    def close(self):
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    __enter__ = start

    def __exit__(self, *exc):
        self.close()

    @property
    def port(self) -> int:
        return self._servers[0].server_address[1]

    def url(self, node: str | None = None) -> str:
        """An HF_ENDPOINT; requests through it are counted under `node`."""
        return f"http://127.0.0.1:{self.port}" + (f"/{node}" if node else "")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled connections expect

    def log_message(self, *args):
        pass  # the stats log replaces the access log on stderr

    def handle(self):
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):
            pass  # a client that closed its connection early (one reading a header, then stopping)

    def _handle(self):
        hub, cdn = self.server.hub, self.server.cdn
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not cdn and path.startswith("/_"):
            self.rec = None
            return self._control(hub, path, body)
        self.rec = dict(node="", method=self.command, path=path, kind="other", repo=None, file=None, status=None,
                        bytes=0, cdn=cdn)
        with hub._lock:
            hub._active.append(self.rec)
        try:
            if m := _RESOLVE.fullmatch(path):
                self._resolve(hub, m["node"] or "", m["repo"], unquote(m["rev"]), unquote(m["file"]))
            elif not cdn and (m := _HARNESSES.fullmatch(path)):
                self.rec.update(node=m["node"] or "", kind="api")
                self._json({"standardEnvVars": [], "harnesses": {}})  # the agent registry, empty
            elif not cdn and (m := _API.fullmatch(path)):
                self._api(hub, m, parse_qs(query), body)
            else:
                self._error(404, None, f"no route for {path}")
        finally:
            with hub._lock:
                hub._active.remove(self.rec)
                hub._log.append(self.rec)

    do_HEAD = do_GET = do_POST = _handle

    def _resolve(self, hub: FakeHub, node: str, repo_id: str, rev: str, path: str):
        """HEAD or GET of a file. The Hub serves git files and sends LFS files to the CDN with a 302 carrying
        X-Linked-Etag (sha256) and X-Linked-Size; the Location names the commit, as the Hub's signed CDN URL
        names the content, so the GET gets the version the HEAD saw. The CDN (same handler, other port) serves
        bodies. A GET of a git file goes to the URL the client was given: with revision "main", a push between
        its HEAD and GET would hand it the new content under the old ETag."""
        self.rec.update(node=node, repo=repo_id, file=path,
                        kind="head" if self.command == "HEAD" else "range" if "Range" in self.headers else "get")
        found = self._lookup(hub, repo_id, rev)
        if found is None:
            return
        sha, files = found
        f = files.get(path)
        fault = hub._take_fault(node, repo_id, path, ("missing", "error"))
        if f is None or (fault and fault["kind"] == "missing"):
            return self._error(404, "EntryNotFound", f"{path} does not exist at {sha}", [("X-Repo-Commit", sha)])
        if fault:
            return self._error(fault["status"], None, "injected error")
        headers = [("X-Repo-Commit", sha), ("ETag", f'"{f.sha256 if f.lfs and self.server.cdn else f.oid}"')]
        if f.lfs and not self.server.cdn:
            cdn = f"http://127.0.0.1:{hub._servers[1].server_address[1]}{self.path.partition('/resolve/')[0]}"
            headers += [("X-Linked-Etag", f'"{f.sha256}"'), ("X-Linked-Size", str(f.size)),
                        ("Location", f"{cdn}/resolve/{sha}/{quote(path)}")]  # same node prefix
            return self._send(302, headers)
        self._body(hub, node, repo_id, path, f.data, headers)

    def _body(self, hub: FakeHub, node: str, repo_id: str, path: str, data: bytes, headers: list):
        """A file body, whole (200) or one `Range: bytes=S-E | S- | -N` (206; E is clamped to the end: the
        client asks get_safetensors_metadata's headers with bytes=0-100000 whatever the size), faults applied."""
        size, start, end, status = len(data), 0, len(data), 200
        fault = hub._take_fault(node, repo_id, path, ("truncate", "short", "slow", "garbage", "norange")) \
            if self.command == "GET" else None
        kind = fault and fault["kind"]
        if kind == "garbage":
            data = data[:8] + b"~" * len(data[8:40]) + data[40:]
        if (rng := self.headers.get("Range")) and kind != "norange":
            m = _RANGE.fullmatch(rng)
            if m and m[1]:
                start, end = int(m[1]), min(size, int(m[2]) + 1) if m[2] else size
            elif m and m[2]:
                start = max(0, size - int(m[2]))
            if not m or start >= end:
                return self._error(416, None, f"range {rng} of {size} bytes", [("Content-Range", f"bytes */{size}")])
            status = 206
        cut = (size // 2 if fault["after"] is None else fault["after"]) if kind in ("truncate", "short") else end
        stop = max(start, min(end, cut))  # no byte at or past `cut` leaves the server
        if kind == "short":
            end = stop
        if status == 206:
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        self._send(status, headers + [("Accept-Ranges", "bytes")], length=end - start)
        if self.command == "HEAD":
            return
        pos = start
        try:
            while pos < stop:
                if kind == "slow":
                    time.sleep(fault["delay"])
                chunk = data[pos:min(pos + CHUNK, stop)]
                hub._throttle(node, len(chunk))
                self.wfile.write(chunk)
                pos += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.rec["bytes"] = pos - start
        if pos < end:
            self.close_connection = True  # short of Content-Length: the client sees the connection drop

    def _api(self, hub: FakeHub, m: re.Match, query: dict, body: bytes):
        """model_info: GET /api/models/{repo}[/revision/{rev}] (blobs=true adds size, blobId, lfs to siblings).
        list_repo_tree, list_repo_files, snapshot_download: GET .../tree/{rev}[/{dir}]?recursive=true|false, one
        page (the Hub pages by 1000 with a Link header). get_paths_info: POST .../paths-info/{rev}, form fields
        `paths` (repeated) and `expand`; paths that do not exist are left out. A revision arrives
        percent-encoded (refs%2Fpr%2F1)."""
        self.rec.update(node=m["node"] or "", repo=m["repo"], kind="api")
        found = self._lookup(hub, m["repo"], unquote(m["rev"] or "main"))
        if found is None:
            return
        sha, files = found
        if m["op"] in (None, "revision") and self.command == "GET":
            return self._json(_model_info(m["repo"], sha, files, _true(query, "blobs")))
        if m["op"] == "tree" and self.command == "GET":
            entries = _tree(files, unquote(m["path"] or "").strip("/"), _true(query, "recursive"))
            if entries is None:
                return self._error(404, "EntryNotFound", f"{m['path']} is no directory at {sha}")
            return self._json(entries)
        if m["op"] == "paths-info" and self.command == "POST":
            paths = parse_qs(body.decode()).get("paths", [])
            return self._json([e for p in paths if (e := _path_entry(files, p.strip("/"))) is not None])
        self._error(405, None, f"{self.command} {m['op']}")

    def _lookup(self, hub: FakeHub, repo_id: str, rev: str) -> tuple[str, dict[str, _File]] | None:
        """(sha, files) of `rev`, or None after answering RepoNotFound or RevisionNotFound."""
        repo = hub._repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha, repo.commits[sha]

    def _control(self, hub: FakeHub, path: str, body: bytes):
        """For tests that run the hub in another process: GET /_stats; POST /_reset; POST /_fault with an
        add_fault spec as JSON, or {"clear": true}; POST /_push {"repo", "dir", "revision"?} and
        POST /_ref {"repo", "name", "revision"?} answer {"sha"}."""
        try:
            args = json.loads(body or b"{}")
            if path == "/_stats":
                return self._json(hub.stats())
            if path == "/_reset":
                return self._json(hub.reset() or {})
            if path == "/_fault":
                hub.clear_faults() if args.get("clear") else hub.add_fault(**args)
                return self._json({"faults": hub.faults()})
            if path == "/_push":
                return self._json({"sha": hub.push(args["repo"], args["dir"], args.get("revision", "main"))})
            if path == "/_ref":
                return self._json({"sha": hub.create_ref(args["repo"], args["name"], args.get("revision", "main"))})
        except (KeyError, TypeError, ValueError, OSError) as e:
            return self._error(400, None, repr(e))
        self._error(404, None, f"no control {path}")

    def _send(self, status: int, headers=(), body: bytes = b"", length: int | None = None):
        """Status and headers, and `body` unless HEAD; `length` is the Content-Length of a body sent later."""
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
        if self.rec is not None:
            self.rec["status"] = status

    def _json(self, obj, status: int = 200, headers=()):
        self._send(status, [("Content-Type", "application/json"), *headers], json.dumps(obj).encode())

    def _error(self, status: int, code: str | None, message: str, headers=()) -> None:
        """An error as the Hub words it; the client picks its exception from X-Error-Code."""
        self._json({"error": message}, status,
                   [("X-Error-Message", message), *([("X-Error-Code", code)] if code else []), *headers])


def client_env(endpoint: str, home: str | Path, *, offline: bool = False, base: dict | None = None) -> dict:
    """The environment of a process that plays one node against the fake hub: `base` (default os.environ)
    without any HF_ setting, then HF_ENDPOINT (the node's URL), HF_HOME=home/hf, DISTLOAD_CACHE=home/distload
    (each node its own caches), HF_HUB_OFFLINE, no progress bars, no proxy for 127.0.0.1, one OMP thread."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("TRANSFORMERS_OFFLINE", "DISTLOAD_CACHE",
                                                                      "TORCHELASTIC_ERROR_FILE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(Path(home) / "hf"), DISTLOAD_CACHE=str(Path(home) / "distload"),
               HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1",
               no_proxy="127.0.0.1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_client(code: str, args: list[str], repo: str, directory: str | Path, home: str | Path, *,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code *args`` in a fresh interpreter (huggingface_hub reads HF_ENDPOINT at
    import) against a fake hub that serves `directory` as `repo`, its caches under `home`
    (`client_env`); the completed process, output captured as text."""
    with FakeHub() as hub:
        hub.push(repo, directory)
        return subprocess.run([sys.executable, "-c", code, *args], env=client_env(hub.url("node0"), home),
                              capture_output=True, text=True, timeout=timeout)


def _true(query: dict, key: str) -> bool:
    return query.get(key, [""])[0].lower() in ("1", "true")


def _dir_entry(files: dict[str, _File], path: str) -> dict:
    oids = "".join(f.oid for p, f in sorted(files.items()) if p.startswith(path + "/"))
    return {"type": "directory", "oid": _git_sha1("tree", oids.encode()), "size": 0, "path": path}


def _tree(files: dict[str, _File], base: str, recursive: bool) -> list[dict] | None:
    """What is in directory `base` ("" for the root), or all below it if recursive; None if it is no directory."""
    prefix, out, seen = base + "/" if base else "", [], set()
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for i in range(1, len(parts) if recursive else min(2, len(parts))):
            if (d := prefix + "/".join(parts[:i])) not in seen:
                seen.add(d)
                out.append(_dir_entry(files, d))
        if recursive or len(parts) == 1:
            out.append(files[path].entry(path))
    return out if out or not base else None


def _path_entry(files: dict[str, _File], path: str) -> dict | None:
    if path in files:
        return files[path].entry(path)
    return _dir_entry(files, path) if any(p.startswith(path + "/") for p in files) else None


def _model_info(repo_id: str, sha: str, files: dict[str, _File], blobs: bool) -> dict:
    """What model_info reads: `sha`, `siblings`, and the parameter count by dtype that the Hub reads from the
    safetensors headers."""
    siblings, params = [], {}
    for path, f in sorted(files.items()):
        s = {"rfilename": path}
        if blobs:
            s.update(size=f.size, blobId=f.oid)
            if f.lfs:
                s["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": len(f.pointer)}
        siblings.append(s)
        if path.endswith(".safetensors"):
            for name, t in _safetensors_header(f.data).items():
                if name != "__metadata__":
                    params[t["dtype"]] = params.get(t["dtype"], 0) + math.prod(t["shape"])
    info = {"id": repo_id, "author": repo_id.split("/")[0], "sha": sha, "lastModified": DATE, "createdAt": DATE,
            "private": False, "gated": False, "disabled": False, "tags": [], "siblings": siblings}
    if params:
        info["safetensors"] = {"parameters": params, "total": sum(params.values())}
    return info


def _safetensors_header(data: bytes) -> dict:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        return json.loads(data[8:8 + n])
    except (struct.error, ValueError):
        return {}  # not a safetensors file after all: no parameters to count


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description="Serve directories as Hugging Face Hub model repos on 127.0.0.1.")
    p.add_argument("--repo", action="append", default=[], metavar="ID=DIR", help="repo id and its directory")
    p.add_argument("--fault", action="append", default=[], metavar="JSON", help="an add_fault spec, as JSON")
    p.add_argument("--port", type=int, default=0, help="0: any free port")
    p.add_argument("--port-file", help="where to write the bound port (atomically) once serving")
    args = p.parse_args(argv)
    hub = FakeHub(dict(r.split("=", 1) for r in args.repo), [json.loads(f) for f in args.fault], args.port)
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # the server threads inherit the mask: sigwait gets them
    with hub:
        print(hub.url(), flush=True)
        if args.port_file:
            tmp = f"{args.port_file}.{os.getpid()}.tmp"
            Path(tmp).write_text(str(hub.port))
            os.replace(tmp, args.port_file)
        signal.sigwait(stop)


if __name__ == "__main__":
    main()
