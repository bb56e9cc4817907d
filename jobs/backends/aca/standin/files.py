"""Azure Files: share, directory, file create, put range, list, get with ranges, properties, delete."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from aiohttp import web

from jobs.backends.aca import share as sharefs
from jobs.backends.aca.standin.common import (
    ACCOUNT,
    _iso,
    _now,
)


class FilesService:
    """The Azure Files endpoints of the stand-in; the share is a folder under its root."""

    def _files_app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{account}/{share}", self._files(self.files_share))
        app.router.add_route("*", "/{account}/{share}/{path:.+}", self._files(self.files_path))
        return app

    @staticmethod
    def _storage_error(status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
        body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{xml_escape(message)}'
                f"</Message></Error>")
        h = {"x-ms-error-code": code, "x-ms-request-id": uuid.uuid4().hex, "x-ms-version": "2025-05-05",
             "Content-Type": "application/xml"}
        h.update(headers or {})
        return web.Response(status=status, body=body.encode(), headers=h)

    def _files(self, handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            early, body = await self._gate("files", request)
            if early is not None:
                return early
            auth = request.headers.get("Authorization", "")
            if not (auth.startswith(f"SharedKey {ACCOUNT}:") or
                    (auth.startswith("Bearer ") and request.headers.get("x-ms-file-request-intent") == "backup")):
                return self._storage_error(403, "AuthenticationFailed", "Server failed to authenticate the request.")
            refused = self._against_spec("files", request, None)
            if refused is not None:
                return refused
            if request.match_info["account"] != ACCOUNT:
                return self._storage_error(400, "InvalidUri", "unknown account")
            share = request.match_info["share"]
            root = self.share_dir(share)
            rel = request.match_info.get("path", "")
            if ".." in Path(rel).parts:
                return self._storage_error(400, "InvalidResourceName", "bad path")
            # A trailing dot is trimmed unless the request allows it (x-ms-allow-trailing-dot; Azure/azure-cli#27622,
            # microsoft/AzureStorageExplorer#6449); other names break the rules and are a 400 ("Naming and
            # referencing shares, directories, files, and metadata": "a name that violates naming rules ... fails
            # with status code 400"). The message is the service's own, typo included.
            if request.headers.get("x-ms-allow-trailing-dot", "").lower() != "true":
                rel = "/".join(part.rstrip(".") or part for part in rel.split("/"))
            for part in (p for p in rel.split("/") if p):
                if any(c in sharefs.FORBIDDEN for c in part) or len(part) > sharefs.MAX_NAME or \
                        part.lower() in sharefs.RESERVED:
                    return self._storage_error(400, "InvalidResourceName",
                                               "The specifed resource name contains invalid characters.")
            # Disk work runs in a thread so that big uploads do not stall the event loop.
            return await asyncio.to_thread(handler, request, root, rel, body)

        return wrapped

    def _ok_headers(self, extra: dict | None = None) -> dict:
        h = {"x-ms-request-id": uuid.uuid4().hex, "x-ms-version": "2025-05-05",
             "Date": _now().strftime("%a, %d %b %Y %H:%M:%S GMT")}
        h.update(extra or {})
        return h

    def _file_headers(self, path: Path) -> dict:
        st = path.stat()
        mtime = dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc)
        return self._ok_headers({
            "Last-Modified": mtime.strftime("%a, %d %b %Y %H:%M:%S GMT"), "ETag": f'"0x{st.st_mtime_ns:X}"',
            "x-ms-type": "File", "x-ms-server-encrypted": "true", "x-ms-file-attributes": "Archive",
            "x-ms-file-creation-time": _iso(mtime).replace("Z", "0000Z"),
            "x-ms-file-last-write-time": _iso(mtime).replace("Z", "0000Z"),
            "x-ms-file-change-time": _iso(mtime).replace("Z", "0000Z"),
            "x-ms-file-permission-key": "1*1", "x-ms-file-id": str(st.st_ino), "x-ms-file-parent-id": "0",
            "Accept-Ranges": "bytes"})

    def files_share(self, request, root: Path, rel: str, body: bytes):
        restype, comp = request.query.get("restype"), request.query.get("comp")
        if restype == "share" and request.method == "PUT" and not comp:
            if root.exists():
                return self._storage_error(409, "ShareAlreadyExists", "The specified share already exists.")
            root.mkdir(parents=True)
            return web.Response(status=201, headers=self._ok_headers({"ETag": '"0x1"'}))
        if not root.exists():
            return self._storage_error(404, "ShareNotFound", "The specified share does not exist.")
        if restype == "share" and request.method in ("GET", "HEAD") and not comp:
            return web.Response(status=200, headers=self._ok_headers({"x-ms-share-quota": "1024", "ETag": '"0x1"',
                                                                      "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}))
        if restype == "directory":
            return self.files_path(request, root, "", body)
        return self._storage_error(400, "UnsupportedQueryParameter", f"{request.method} {request.query_string}")

    def files_path(self, request, root: Path, rel: str, body: bytes):
        restype, comp, method = request.query.get("restype"), request.query.get("comp"), request.method
        target = root / rel if rel else root
        if not root.exists():
            return self._storage_error(404, "ShareNotFound", "The specified share does not exist.")
        if restype == "directory":
            if method == "PUT" and not comp:
                if target.is_dir():
                    return self._storage_error(409, "ResourceAlreadyExists", "The specified resource already exists.")
                if not target.parent.is_dir():
                    return self._storage_error(404, "ParentNotFound", "The specified parent path does not exist.")
                target.mkdir()
                return web.Response(status=201, headers=self._ok_headers({"ETag": '"0x1"',
                                                                          "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}))
            if not target.is_dir():
                return self._storage_error(404, "ResourceNotFound", "The specified resource does not exist.")
            if method in ("GET", "HEAD") and comp == "list":
                return self._list(request, root, target, rel)
            if method in ("GET", "HEAD") and not comp:
                return web.Response(status=200, headers=self._ok_headers({"ETag": '"0x1"',
                                                                          "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}))
            if method == "DELETE":
                if any(target.iterdir()):
                    return self._storage_error(409, "DirectoryNotEmpty", "The specified directory is not empty.")
                target.rmdir()
                return web.Response(status=202, headers=self._ok_headers())
            return self._storage_error(400, "UnsupportedHttpVerb", method)
        # files
        if method == "PUT" and comp == "range":
            if not target.is_file():
                return self._storage_error(404, "ResourceNotFound", "The specified resource does not exist.")
            rng = request.headers.get("x-ms-range") or request.headers.get("Range", "")
            m = re.match(r"bytes=(\d+)-(\d+)", rng)
            if not m or request.headers.get("x-ms-write", "update") != "update":
                return self._storage_error(400, "InvalidHeaderValue", "x-ms-range")
            start, end = int(m.group(1)), int(m.group(2))
            if end - start + 1 != len(body) or end - start + 1 > 4 * 1024 * 1024:
                return self._storage_error(400, "InvalidRange", "range length does not match the body (max 4 MiB)")
            if end >= target.stat().st_size:
                return self._storage_error(416, "InvalidRange", "The range specified is invalid for the current size of the resource.")
            with target.open("r+b") as f:
                f.seek(start)
                f.write(body)
            return web.Response(status=201, headers=self._file_headers(target))
        if method == "PUT" and not comp:
            if request.headers.get("x-ms-type", "").lower() != "file":
                return self._storage_error(400, "MissingRequiredHeader", "x-ms-type")
            if not target.parent.is_dir():
                return self._storage_error(404, "ParentNotFound", "The specified parent path does not exist.")
            if target.is_dir():
                return self._storage_error(409, "ResourceTypeMismatch", "a directory has that name")
            size = int(request.headers.get("x-ms-content-length", "0"))
            with target.open("wb") as f:
                f.truncate(size)
            return web.Response(status=201, headers=self._file_headers(target))
        if method in ("GET", "HEAD") and not comp:
            if not target.is_file():
                return self._storage_error(404, "ResourceNotFound", "The specified resource does not exist.")
            size = target.stat().st_size
            rng = request.headers.get("x-ms-range") or request.headers.get("Range")
            headers = self._file_headers(target)
            if method == "HEAD":
                headers["Content-Length"] = str(size)
                return web.Response(status=200, headers=headers)
            if rng:
                m = re.match(r"bytes=(\d+)-(\d*)", rng)
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
                if start >= size:
                    return self._storage_error(416, "InvalidRange",
                                               "The range specified is invalid for the current size of the resource.",
                                               {"Content-Range": f"bytes */{size}"})
                end = min(end, size - 1)
                with target.open("rb") as f:
                    f.seek(start)
                    data = f.read(end - start + 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return web.Response(status=206, body=data, headers=headers)
            return web.Response(status=200, body=target.read_bytes(), headers=headers)
        if method == "DELETE" and not comp:
            if not target.is_file():
                return self._storage_error(404, "ResourceNotFound", "The specified resource does not exist.")
            target.unlink()
            return web.Response(status=202, headers=self._ok_headers())
        return self._storage_error(400, "UnsupportedQueryParameter", f"{method} {request.query_string}")

    def _list(self, request, root: Path, target: Path, rel: str) -> web.Response:
        prefix = request.query.get("prefix", "")
        marker = request.query.get("marker", "")
        max_results = int(request.query.get("maxresults", "5000"))
        names = sorted(p.name for p in target.iterdir() if p.name.startswith(prefix))
        names = [n for n in names if n > marker] if marker else names
        page, rest = names[:max_results], names[max_results:]
        entries = []
        for n in page:
            p = target / n
            if p.is_dir():
                entries.append(f"<Directory><Name>{xml_escape(n)}</Name><FileId>{p.stat().st_ino}</FileId>"
                               f"<Properties /></Directory>")
            else:
                entries.append(f"<File><Name>{xml_escape(n)}</Name><FileId>{p.stat().st_ino}</FileId><Properties>"
                               f"<Content-Length>{p.stat().st_size}</Content-Length></Properties></File>")
        next_marker = page[-1] if rest else ""
        xml = (f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="{self.files_url}/" '
               f'ShareName="{xml_escape(root.name)}" DirectoryPath="{xml_escape(rel)}"><Prefix>{xml_escape(prefix)}'
               f"</Prefix><MaxResults>{max_results}</MaxResults><Entries>{''.join(entries)}</Entries>"
               f"<NextMarker>{xml_escape(next_marker)}</NextMarker></EnumerationResults>")
        return web.Response(status=200, body=xml.encode(), headers=self._ok_headers({"Content-Type": "application/xml"}))

