"""Azure Files: share, directory, file create, put range, list, get with ranges, properties, delete."""

from __future__ import annotations

import asyncio
import contextvars
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

# The x-ms-version the request asked for: each operation's answer carries "the version of Azure Files used to
# execute the request" (x-ms-version in the response headers of Put Range, Get File, ..., learn.microsoft.com
# rest/api/storageservices), which is the request's ("Versioning for Azure Storage": a request with a valid
# x-ms-version is executed with that version). Set per request in FilesService._files; asyncio.to_thread carries it.
_REQUEST_VERSION: contextvars.ContextVar[str] = contextvars.ContextVar("x_ms_version", default="2025-05-05")


class FilesService:
    """The Azure Files endpoints of the stand-in; the share is a folder under its root."""

    def _files_app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{account}/{share}", self._files(self.files_share))
        app.router.add_route("*", "/{account}/{share}/{path:.+}", self._files(self.files_path))
        return app

    @staticmethod
    def _storage_error(status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
        # Storage's error shape: <Error><Code/><Message/></Error> in the body and, since 2017-07-29, the code in
        # x-ms-error-code ("Status and error codes",
        # learn.microsoft.com/rest/api/storageservices/status-and-error-codes2), which is what
        # azure-storage-file-share reads (_shared/response_handlers.py, process_storage_error).
        body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{xml_escape(message)}'
                f"</Message></Error>")
        h = {"x-ms-error-code": code, "x-ms-request-id": uuid.uuid4().hex, "x-ms-version": _REQUEST_VERSION.get(),
             "Content-Type": "application/xml"}
        h.update(headers or {})
        return web.Response(status=status, body=body.encode(), headers=h)

    def _files(self, handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            _REQUEST_VERSION.set(request.headers.get("x-ms-version") or _REQUEST_VERSION.get())
            early, body = await self._gate("files", request)
            if early is not None:
                return early
            # Shared Key, or an OAuth token with x-ms-file-request-intent: backup, which Azure Files requires of
            # token requests (Put Range and the other operations' request headers, "x-ms-file-request-intent:
            # Required if Authorization header specifies an OAuth token"; azure-storage-file-share's token_intent).
            # The refusal's code, status and text: "Common REST API error codes" (AuthenticationFailed, 403).
            auth = request.headers.get("Authorization", "")
            if not (auth.startswith(f"SharedKey {ACCOUNT}:") or
                    (auth.startswith("Bearer ") and request.headers.get("x-ms-file-request-intent") == "backup")):
                return self._storage_error(403, "AuthenticationFailed", "Server failed to authenticate the request. "
                                           "Make sure the value of the Authorization header is formed correctly "
                                           "including the signature.")
            refused = self._against_spec("files", request, None)
            if refused is not None:
                return refused
            # Another account's name in the path: no public source (a real one would be another host); kept because
            # the stand-in serves one account, and InvalidUri is Storage's code for a URI it cannot map.
            if request.match_info["account"] != ACCOUNT:
                return self._storage_error(400, "InvalidUri", "unknown account")
            share = request.match_info["share"]
            root = self.share_dir(share)
            rel = request.match_info.get("path", "")
            # ".." is not a name ("Naming and referencing shares, directories, files, and metadata"; share.py).
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
        # Every answer's x-ms-request-id, x-ms-version (the request's: _REQUEST_VERSION) and Date (each operation's
        # response headers table).
        h = {"x-ms-request-id": uuid.uuid4().hex, "x-ms-version": _REQUEST_VERSION.get(),
             "Date": _now().strftime("%a, %d %b %Y %H:%M:%S GMT")}
        h.update(extra or {})
        return h

    def _file_headers(self, path: Path) -> dict:
        # Get File Properties' response headers (learn.microsoft.com/rest/api/storageservices/get-file-properties):
        # x-ms-type File, ETag, Last-Modified, the SMB properties x-ms-file-attributes, -creation-time,
        # -last-write-time, -change-time (seven fraction digits, "2017-05-10T17:52:33.9551861Z"), -permission-key,
        # -file-id, -file-parent-id, x-ms-server-encrypted. The values are the stand-in's.
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
        # Create Share: 201 Created, or 409 ShareAlreadyExists; a missing share is 404 ShareNotFound (codes and
        # texts: "Azure Files error codes", learn.microsoft.com/rest/api/storageservices/file-service-error-codes).
        if restype == "share" and request.method == "PUT" and not comp:
            if root.exists():
                return self._storage_error(409, "ShareAlreadyExists", "The specified share already exists.")
            root.mkdir(parents=True)
            return web.Response(status=201, headers=self._ok_headers({"ETag": '"0x1"'}))
        if not root.exists():
            return self._storage_error(404, "ShareNotFound", "The specified share does not exist.")
        # Get Share Properties: 200 with x-ms-share-quota (in GiB), ETag and Last-Modified (the page of that name).
        if restype == "share" and request.method in ("GET", "HEAD") and not comp:
            return web.Response(status=200, headers=self._ok_headers({"x-ms-share-quota": "1024", "ETag": '"0x1"',
                                                                      "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}))
        if restype == "directory":
            return self.files_path(request, root, "", body)
        # Anything else: Storage's UnsupportedQueryParameter ("Common REST API error codes"); the stand-in serves
        # only what tuneops calls.
        return self._storage_error(400, "UnsupportedQueryParameter", f"{request.method} {request.query_string}")

    def files_path(self, request, root: Path, rel: str, body: bytes):
        restype, comp, method = request.query.get("restype"), request.query.get("comp"), request.method
        target = root / rel if rel else root
        if not root.exists():
            return self._storage_error(404, "ShareNotFound", "The specified share does not exist.")
        if restype == "directory":
            # Create Directory: 201, 409 ResourceAlreadyExists, 404 ParentNotFound (codes and texts: "Common REST API
            # error codes", "Azure Files error codes"). Get Directory Properties: 200; a missing directory is 404
            # ResourceNotFound.
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
            # Delete Directory: 202 Accepted; a directory with anything in it is refused with 409 DirectoryNotEmpty
            # ("Azure Files error codes": "The specified directory isn't empty."; the older text is kept).
            if method == "DELETE":
                if any(target.iterdir()):
                    return self._storage_error(409, "DirectoryNotEmpty", "The specified directory is not empty.")
                target.rmdir()
                return web.Response(status=202, headers=self._ok_headers())
            return self._storage_error(400, "UnsupportedHttpVerb", method)  # "Common REST API error codes"
        # files
        if method == "PUT" and comp == "range":
            # Put Range (learn.microsoft.com/rest/api/storageservices/put-range): x-ms-range wins over Range, one
            # range "bytes=start-end", at most 4 MiB for an update, Content-Length matching the range (the SDK's
            # ShareFileRangeWriteType: "The Range and Content-Length headers must match"); 201 Created. x-ms-write:
            # clear is not served (tuneops never clears), refused as an InvalidHeaderValue. The code for a length
            # that does not match the range: no public source found; kept as InvalidRange, the range's code.
            if not target.is_file():
                return self._storage_error(404, "ResourceNotFound", "The specified resource does not exist.")
            rng = request.headers.get("x-ms-range") or request.headers.get("Range", "")
            m = re.match(r"bytes=(\d+)-(\d+)", rng)
            if not m or request.headers.get("x-ms-write", "update") != "update":
                return self._storage_error(400, "InvalidHeaderValue", "x-ms-range")
            start, end = int(m.group(1)), int(m.group(2))
            if end - start + 1 != len(body) or end - start + 1 > 4 * 1024 * 1024:
                return self._storage_error(400, "InvalidRange", "range length does not match the body (max 4 MiB)")
            # A file has the size Create File gave it (x-ms-content-length); a range past it is 416 InvalidRange
            # ("Common REST API error codes": "The range specified is invalid for the current size of the
            # resource."; "Specifying the range header for FileREST" gives 416 for a range past the end).
            if end >= target.stat().st_size:
                return self._storage_error(416, "InvalidRange",
                                           "The range specified is invalid for the current size of the resource.")
            with target.open("r+b") as f:
                f.seek(start)
                f.write(body)
            return web.Response(status=201, headers=self._file_headers(target))
        # Create File (learn.microsoft.com/rest/api/storageservices/create-file): x-ms-type: file and
        # x-ms-content-length (the file's size: it is created at that size, its content written by Put Range) are
        # required; 201 Created; a missing header is 400 MissingRequiredHeader ("Common REST API error codes"). A
        # directory of that name: ResourceTypeMismatch, a code of Azure Files' ShareErrorCode (azure-storage-file-share
        # _generated/models/_enums.py); its status and text are not public, 409 and the message are the stand-in's.
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
        # Get File / Get File Properties: 200 with the file (HEAD: its headers, Content-Length its size); with a
        # range, 206 and Content-Range. A range starting past the end is 416 ("Specifying the range header for
        # FileREST", learn.microsoft.com/rest/api/storageservices/
        # specifying-the-range-header-for-file-service-operations, both range formats), InvalidRange in Storage's
        # words ("Common REST API error codes"), with Content-Range "bytes */<size>" as HTTP asks of a 416
        # (RFC 9110 §15.5.17). An end past the file is cut to it (RFC 9110 §14.1.2).
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
        # Delete File: 202 Accepted (learn.microsoft.com/rest/api/storageservices/delete-file2).
        if method == "DELETE" and not comp:
            if not target.is_file():
                return self._storage_error(404, "ResourceNotFound", "The specified resource does not exist.")
            target.unlink()
            return web.Response(status=202, headers=self._ok_headers())
        return self._storage_error(400, "UnsupportedQueryParameter", f"{method} {request.query_string}")

    def _list(self, request, root: Path, target: Path, rel: str) -> web.Response:
        """List Directories and Files (learn.microsoft.com/rest/api/storageservices/list-directories-and-files): one
        level; prefix filters names; "If the request doesn't specify maxresults, or specifies a value greater than
        5,000, the server returns up to 5,000 items" (below 1 the spec check refuses, file.json MaxResults
        "minimum": 1); the XML is EnumerationResults with ServiceEndpoint, ShareName, DirectoryPath, Prefix,
        MaxResults, Entries of File (Name, FileId, Properties/Content-Length) and Directory, and NextMarker, which
        is empty on the last page. "The marker value is opaque to the client": the stand-in's is the page's last
        name, and names are listed in sorted order."""
        prefix = request.query.get("prefix", "")
        marker = request.query.get("marker", "")
        max_results = min(int(request.query.get("maxresults", "5000")), 5000)
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

