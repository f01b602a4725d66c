"""A loopback Hugging Face Hub: the HTTP endpoints huggingface_hub 2.x calls for push and pull.

create_repo (POST /api/repos/create), the model card's metadata check (POST /api/validate-yaml), preupload (POST /api/models/{repo}/preupload/{rev}), commit
(POST /api/models/{repo}/commit/{rev}, ndjson with base64 files), repo_info (GET
/api/models/{repo}/revision/{rev}), list_repo_tree (GET /api/models/{repo}/tree/{rev}) and file
downloads (HEAD/GET /{repo}/resolve/{rev}/{path} with ETag and X-Repo-Commit). Files travel in the
regular (non-LFS) mode; `reject` makes preupload refuse named files, as the hub does for bad ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def _blob_oid(data: bytes) -> str:  # git's blob id, which the hub reports as a file's oid / etag
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"files": {path: bytes}, "sha": str, "private": bool}
        self.reject: dict[str, str] = {}  # path -> reason preupload gives
        self.requests: list[tuple[str, str]] = []
        self.app = Starlette(
            routes=[
                Route("/api/repos/create", self.create, methods=["POST"]),
                Route("/api/validate-yaml", self.validate_yaml, methods=["POST"]),
                Route("/api/models/{ns}/{name}/preupload/{rev}", self.preupload, methods=["POST"]),
                Route("/api/models/{ns}/{name}/commit/{rev}", self.commit, methods=["POST"]),
                Route("/api/models/{ns}/{name}/revision/{rev}", self.info, methods=["GET"]),
                Route("/api/models/{ns}/{name}", self.info, methods=["GET"]),
                Route("/api/models/{ns}/{name}/tree/{rev}", self.tree, methods=["GET"]),
                Route("/api/models/{ns}/{name}/tree/{rev}/{path:path}", self.tree, methods=["GET"]),
                Route("/{ns}/{name}/resolve/{rev}/{path:path}", self.resolve, methods=["GET", "HEAD"]),
            ]
        )

    def _repo(self, request: Request):
        self.requests.append((request.method, request.url.path))
        repo_id = f"{request.path_params['ns']}/{request.path_params['name']}"
        return repo_id, self.repos.get(repo_id)

    @staticmethod
    def _missing(repo_id):
        return JSONResponse({"error": f"Repository {repo_id} not found"}, 404, headers={"X-Error-Code": "RepoNotFound"})

    async def create(self, request: Request):
        self.requests.append((request.method, request.url.path))
        body = await request.json()
        repo_id = f"{body.get('organization') or 'me'}/{body['name']}"
        url = f"{request.base_url}{repo_id}"
        if repo_id in self.repos:
            return JSONResponse({"error": "You already created this model repo", "url": url}, 409)
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        self.repos[repo_id] = {"files": {}, "sha": "0" * 40, "private": private}
        return JSONResponse({"url": url, "name": repo_id})

    async def validate_yaml(self, request: Request):
        """The README.md check create_commit asks for: a card must open with its YAML metadata block."""
        self.requests.append((request.method, request.url.path))
        content = (await request.json())["content"]
        if not content.startswith("---\n") or "\n---\n" not in content[4:]:
            return JSONResponse({"errors": [{"message": "no YAML metadata block"}]}, 400)
        return JSONResponse({"warnings": [], "errors": []})

    async def preupload(self, request: Request):
        repo_id, repo = self._repo(request)
        if repo is None:
            return self._missing(repo_id)
        files = (await request.json())["files"]
        for f in files:
            if f["path"] in self.reject:
                return JSONResponse({"error": self.reject[f["path"]]}, 422)
        modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
        return JSONResponse({"files": modes, "commitOid": repo["sha"]})

    async def commit(self, request: Request):
        repo_id, repo = self._repo(request)
        if repo is None:
            return self._missing(repo_id)
        files = dict(repo["files"])
        for line in (await request.body()).decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return JSONResponse({"error": f"unsupported commit operation {item['key']}"}, 400)
        digest = hashlib.sha1(repr(sorted((k, _blob_oid(v)) for k, v in files.items())).encode())
        repo.update(files=files, sha=digest.hexdigest())
        return JSONResponse(
            {"commitUrl": f"{request.base_url}{repo_id}/commit/{repo['sha']}", "commitOid": repo["sha"]}
        )

    async def info(self, request: Request):
        repo_id, repo = self._repo(request)
        if repo is None:
            return self._missing(repo_id)
        return JSONResponse(
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo["sha"],
                "private": repo["private"],
                "siblings": [{"rfilename": p} for p in sorted(repo["files"])],
                "tags": [],
            }
        )

    async def tree(self, request: Request):
        repo_id, repo = self._repo(request)
        if repo is None:
            return self._missing(repo_id)
        prefix = request.path_params.get("path", "")
        entries = [
            {"type": "file", "path": p, "size": len(d), "oid": _blob_oid(d)}
            for p, d in sorted(repo["files"].items())
            if p.startswith(prefix)
        ]
        return JSONResponse(entries)

    async def resolve(self, request: Request):
        repo_id, repo = self._repo(request)
        if repo is None:
            return self._missing(repo_id)
        path = request.path_params["path"]
        if path not in repo["files"]:
            return JSONResponse({"error": "Entry not found"}, 404, headers={"X-Error-Code": "EntryNotFound"})
        data = repo["files"][path]
        headers = {"ETag": f'"{_blob_oid(data)}"', "X-Repo-Commit": repo["sha"], "Content-Length": str(len(data))}
        return Response(b"" if request.method == "HEAD" else data, headers=headers)


class ServerThread:
    """Runs a Hub on 127.0.0.1 in a background thread; `url` is its endpoint."""

    def __init__(self, hub: Hub):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.sock, self.url = sock, f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(hub.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("loopback hub did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
