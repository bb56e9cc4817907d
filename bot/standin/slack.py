"""A local stand-in for Slack: its Web API and response_url endpoints (server side), and signed requests as Slack
sends them to an app (client side). Used by the tests, the demo and the benchmarks; needs no Slack account.

Server: `SlackStandIn(token).start()` runs an aiohttp server on 127.0.0.1 in its own thread and event loop (usable
from sync tests, async tests and scripts alike), records every call, and answers like Slack, including its limits
(50 blocks, 3,000 characters a section, `invalid_auth` without the right bearer token, optional per-channel
chat.postMessage rate with 429 + Retry-After). `fail_for(...)` makes it answer 429 or 5xx for a while (fault injection
for the soak and the fault tests). `share_file(...)` posts a message with a file attached, which `files.info` and the
file's private download (bot token required) then serve.
Client: `slash_command_body`, `block_actions_body`, `message_action_body`, `view_submission_body`,
`app_home_opened_body`, `home_block_actions_body` and `signed_headers` build what Slack POSTs to the app.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode

from aiohttp import web
from slack_sdk.signature import SignatureVerifier

MAX_BLOCKS = 50
MAX_HOME_BLOCKS = 100
MAX_VIEW_BYTES = 250_000
MAX_SECTION = 3000
MAX_TEXT = 40000
SERVER_ERRORS = frozenset({500, 503})


@dataclass
class Call:
    method: str                      # Web API method, or "response_url" / "upload"
    params: dict[str, Any]
    time: float
    status: int = 200
    response: dict[str, Any] = field(default_factory=dict)
    injected: bool = False           # answered by a `fail_for` window rather than by the method itself

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.response.get("ok"))


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    thread_ts: str | None = None
    reply_broadcast: bool = False
    edits: list[dict[str, Any]] = field(default_factory=list)   # earlier versions, oldest first
    files: list[dict[str, Any]] = field(default_factory=list)   # attached files (share_file), as file objects


@dataclass(frozen=True)
class _Fault:
    until: float                     # time.time() at which the window closes
    status: int                      # 429, 500 or 503
    retry_after: int
    methods: frozenset[str] | None   # None: every Web API method


class SlackStandIn:
    """Answers like Slack's Web API. `rate_per_channel`: chat.postMessage allowed per second per channel
    (None: unlimited). `on_call(call)` is invoked in the server thread after each call is recorded."""

    def __init__(self, token: str = "xoxb-standin", *, app_token: str = "xapp-standin",
                 rate_per_channel: float | None = None,
                 team_id: str = "T0STANDIN", bot_user_id: str = "U0TUNEOPS", bot_id: str = "B0TUNEOPS",
                 on_call: Callable[[Call], None] | None = None):
        self.token = token
        self.app_token = app_token
        self.rate_per_channel = rate_per_channel
        self.team_id, self.bot_user_id, self.bot_id = team_id, bot_user_id, bot_id
        self.on_call = on_call
        self.calls: list[Call] = []
        self.messages: dict[str, dict[str, Message]] = defaultdict(dict)   # channel -> ts -> message
        self.ephemeral: list[dict[str, Any]] = []
        self.responses: dict[str, list[dict[str, Any]]] = defaultdict(list)  # response_url key -> payloads
        self.files: dict[str, dict[str, Any]] = {}
        # The bot token's scopes, as manifest.yaml asks for them; a test removes one to see the missing_scope answer.
        self.scopes: set[str] = {"commands", "chat:write", "chat:write.public", "files:read", "files:write",
                                 "app_mentions:read", "channels:read", "groups:read", "users:read"}
        self.views: dict[str, dict[str, Any]] = {}
        self.home: dict[str, dict[str, Any]] = {}          # views.publish: user id -> their Home view (as published)
        self.socket_acks: dict[str, dict[str, Any]] = {}   # Socket Mode: envelope id -> the app's answer
        self._sockets: list[web.WebSocketResponse] = []
        self._sent: dict[str, deque[float]] = defaultdict(deque)
        self._faults: list[_Fault] = []
        self._ts = itertools.count(1)
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> SlackStandIn:
        ready = threading.Event()
        errors: list[BaseException] = []

        def serve():
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._setup())
            except BaseException as e:  # reported to the starting thread
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="slack-standin", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop and self._thread:
            for ws in list(self._sockets):
                try:
                    asyncio.run_coroutine_threadsafe(ws.close(), self._loop).result(5)
                except Exception:  # already gone
                    pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> SlackStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _setup(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{key}", self._response_url)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_get("/socket", self._socket)
        app.router.add_get("/files-pri/{team_file}/download/{name}", self._download)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """What SLACK_API_URL should be set to."""
        return f"{self.base_url}/api/"

    def response_url(self, key: str | None = None) -> str:
        return f"{self.base_url}/response/{key or uuid.uuid4().hex[:12]}"

    # ---- fault injection ------------------------------------------------------------------------------------------

    def fail_for(self, seconds: float, status: int = 429, *, retry_after: int = 1,
                 methods: set[str] | frozenset[str] | None = None) -> None:
        """From now on, for `seconds`, answer Web API calls (all, or only `methods`) with `status` instead of doing
        them: 429 with `Retry-After: retry_after` (Slack's rate limit), or 500 / 503 (Slack's servers in trouble).
        Calls from any thread; windows may overlap (the one set last wins)."""
        if status != 429 and status not in SERVER_ERRORS:
            raise ValueError(f"status {status}: the stand-in injects 429 or one of {sorted(SERVER_ERRORS)}")
        with self._cond:
            self._faults.append(_Fault(time.time() + seconds, status, max(1, int(retry_after)),
                                       frozenset(methods) if methods else None))

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    def _fault(self, method: str, now: float) -> _Fault | None:
        with self._cond:
            self._faults = [f for f in self._faults if f.until > now]
            for f in reversed(self._faults):
                if f.methods is None or method in f.methods:
                    return f
        return None

    # ---- looking at what happened -------------------------------------------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        with self._cond:
            return [c for c in self.calls if c.method == method]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked after every call); return its value, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.2))

    async def until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """`wait_for` for code running in an event loop that must keep serving meanwhile (an app in the same loop)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    def thread(self, channel: str, thread_ts: str) -> list[Message]:
        """The replies in a thread, oldest first (the root message not included)."""
        with self._cond:
            msgs = [m for m in self.messages[channel].values() if m.thread_ts == thread_ts and m.ts != thread_ts]
        return sorted(msgs, key=lambda m: float(m.ts))

    def root_messages(self, channel: str) -> list[Message]:
        with self._cond:
            msgs = [m for m in self.messages[channel].values() if not m.thread_ts]
        return sorted(msgs, key=lambda m: float(m.ts))

    # ---- the server ---------------------------------------------------------------------------------------------

    def _record(self, call: Call) -> None:
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()
        if self.on_call:
            try:
                self.on_call(call)
            except Exception:  # an observer's bug must not break the server
                pass

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await _read_params(request)
        now = time.time()
        auth = request.headers.get("Authorization", "")
        if method == "apps.connections.open":
            # Socket Mode's only Web API call, made with the app-level token rather than the bot token.
            ok = auth == f"Bearer {self.app_token}"
            body = ({"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"} if ok
                    else {"ok": False, "error": "invalid_auth"})
            self._record(Call(method, params, now, 200, body))
            return web.json_response(body)
        if auth != f"Bearer {self.token}":
            body = {"ok": False, "error": "not_authed" if not auth else "invalid_auth"}
            self._record(Call(method, params, now, 200, body))
            return web.json_response(body)
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            body = {"ok": False, "error": "unknown_method"}
            self._record(Call(method, params, now, 200, body))
            return web.json_response(body)
        fault = self._fault(method, now)
        if fault is not None:
            return self._answer_fault(method, params, now, fault)
        retry_after = self._throttle(method, params, now)
        if retry_after:
            body = {"ok": False, "error": "ratelimited"}
            self._record(Call(method, params, now, 429, body))
            return web.json_response(body, status=429, headers={"Retry-After": str(retry_after)})
        with self._cond:
            body = handler(params)
        self._record(Call(method, params, now, 200, body))
        return web.json_response(body)

    def _answer_fault(self, method: str, params: dict[str, Any], now: float, fault: _Fault) -> web.Response:
        if fault.status == 429:
            # Slack's rate limits (https://api.slack.com/apis/rate-limits): "HTTP 429 Too Many Requests" with a
            # Retry-After header giving the seconds to wait, and `"error": "ratelimited"` in the body.
            body = {"ok": False, "error": "ratelimited"}
            headers = {"Retry-After": str(fault.retry_after)}
        else:
            # Slack's servers failing: slack_sdk's ServerErrorRetryHandler (slack_sdk/http_retry/builtin_handlers.py)
            # exists for exactly these, HTTP 500 and 503; the body is JSON so that the client reads the status and
            # does not trip over an HTML error page.
            body = {"ok": False, "error": "internal_error" if fault.status == 500 else "service_unavailable"}
            headers = {}
        self._record(Call(method, params, now, fault.status, body, injected=True))
        return web.json_response(body, status=fault.status, headers=headers)

    def _throttle(self, method: str, params: dict[str, Any], now: float) -> int:
        """Seconds to wait (Slack's Retry-After), or 0 when this chat.postMessage may go through."""
        if method != "chat.postMessage" or not self.rate_per_channel:
            return 0
        window = max(1.0, 1.0 / self.rate_per_channel)
        capacity = max(1, round(self.rate_per_channel * window))
        sent = self._sent[str(params.get("channel", ""))]
        while sent and sent[0] <= now - window:
            sent.popleft()
        if len(sent) >= capacity:
            return max(1, math.ceil(sent[0] + window - now))
        sent.append(now)
        return 0

    async def _response_url(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        try:
            payload = await request.json()
        except (json.JSONDecodeError, ValueError):
            self._record(Call("response_url", {"key": key}, time.time(), 400, {"ok": False}))
            return web.Response(status=400, text="invalid_payload")
        problem = _check_message(payload)
        if problem:
            self._record(Call("response_url", {"key": key, **payload}, time.time(), 400, {"ok": False,
                                                                                        "error": problem}))
            return web.Response(status=400, text=problem)
        with self._cond:
            self.responses[key].append(payload)
        self._record(Call("response_url", {"key": key, **payload}, time.time(), 200, {"ok": True}))
        return web.Response(text="ok")

    async def _upload(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        data = await request.read()
        with self._cond:
            f = self.files.get(file_id)
            if f is not None:
                f["content"] = data
        status = 200 if f is not None else 404
        self._record(Call("upload", {"file_id": file_id, "bytes": len(data)}, time.time(), status,
                          {"ok": f is not None}))
        return web.Response(status=status, text=f"OK - {len(data)}" if f is not None else "not found")

    # ---- files shared in channels (files.info and private downloads) -------------------------------------------

    def share_file(self, name: str, content: bytes, *, channel: str = "C0TRAIN", user: str = "U0ALICE",
                   text: str = "here is the data", visible: bool = True, size: int | None = None,
                   cut_after: int | None = None, filetype: str = "text", timestamp: int | None = None,
                   slow_s: float = 0.0) -> tuple[dict[str, Any], Message]:
        """A person posts a message in `channel` with a file attached; returns the file object and the message.

        `visible=False`: the bot cannot see the file (files.info answers file_not_found). `size`: what files.info
        claims, when it should differ from the content's length. `cut_after`: the download breaks off after that many
        bytes (a connection lost mid-way). `slow_s`: the download takes that long (a big file)."""
        with self._cond:
            file_id = "F" + uuid.uuid4().hex[:10].upper()
            ts = self._next_ts()
            created = int(time.time()) if timestamp is None else timestamp
            # The file object as files.info returns it (https://docs.slack.dev/reference/objects/file-object):
            # url_private_download needs the bot token; `channels`/`groups`/`ims` and `shares` say where it was
            # shared, with the message ts of each share.
            private = channel.startswith("G")
            f = {
                "id": file_id, "created": created, "timestamp": created, "name": name, "title": name,
                "mimetype": "text/plain", "filetype": filetype, "pretty_type": "Plain Text", "user": user,
                "editable": False, "size": len(content) if size is None else size, "mode": "hosted",
                "is_external": False, "external_type": "", "is_public": not private, "public_url_shared": False,
                "url_private": f"{self.base_url}/files-pri/{self.team_id}-{file_id}/{name}",
                "url_private_download": f"{self.base_url}/files-pri/{self.team_id}-{file_id}/download/{name}",
                "permalink": f"https://standin.slack.com/files/{user}/{file_id}/{name}",
                "channels": [] if private else [channel], "groups": [channel] if private else [], "ims": [],
                "shares": {"private" if private else "public": {channel: [{"ts": ts, "channel_name":
                                                                           f"channel-{channel.lower()}",
                                                                           "team_id": self.team_id}]}},
            }
            self.files[file_id] = {"id": file_id, "name": name, "length": len(content), "content": content,
                                   "object": f, "visible": visible, "cut_after": cut_after, "slow_s": slow_s}
            msg = Message(channel, ts, text, [], files=[f])
            self.messages[channel][ts] = msg
            self._cond.notify_all()
        return f, msg

    async def _download(self, request: web.Request) -> web.StreamResponse:
        team_file = request.match_info["team_file"]
        file_id = team_file.split("-", 1)[-1]
        auth = request.headers.get("Authorization", "")
        with self._cond:
            stored = self.files.get(file_id)
        if auth != f"Bearer {self.token}":
            # url_private_download "requires an authorization header with a token that has the files:read scope,
            # like Authorization: Bearer A_VALID_TOKEN" (Slack, "Important changes to files in the Web API", 2015).
            # Without it Slack answers 200 with its HTML sign-in page, not an error status: clients must look at the
            # content type (as reported by tool authors, e.g. tilework-tech/nori-slack-cli PR 6, "Slack's HTTP-200
            # HTML sign-in page").
            self._record(Call("download", {"file": file_id}, time.time(), 200, {"ok": False, "error": "sign_in"}))
            return web.Response(status=200, content_type="text/html",
                                text="<!DOCTYPE html><html><head><title>Slack</title></head><body>Sign in to "
                                     "Stand-in | Slack</body></html>")
        if stored is None or stored.get("object") is None or not stored["visible"]:
            self._record(Call("download", {"file": file_id}, time.time(), 404, {"ok": False}))
            return web.Response(status=404, text="File not found")
        content: bytes = stored["content"]
        cut = stored["cut_after"]
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(content)
        await resp.prepare(request)
        if stored.get("slow_s"):
            await asyncio.sleep(stored["slow_s"])
        if cut is not None:
            # The connection drops part way: the client has fewer bytes than Content-Length announced.
            await resp.write(content[:cut])
            self._record(Call("download", {"file": file_id, "bytes": cut}, time.time(), 200, {"ok": False,
                                                                                              "error": "cut"}))
            request.transport.close()  # type: ignore[union-attr]
            return resp
        for i in range(0, len(content), 64 * 1024):
            await resp.write(content[i:i + 64 * 1024])
        await resp.write_eof()
        self._record(Call("download", {"file": file_id, "bytes": len(content)}, time.time(), 200, {"ok": True}))
        return resp

    # ---- Socket Mode ----------------------------------------------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()  # answers the client's pings itself, as Slack does
        await ws.prepare(request)
        self._sockets.append(ws)
        self._record(Call("socket.connect", {}, time.time(), 200, {"ok": True}))
        await ws.send_json({"type": "hello", "num_connections": len(self._sockets),
                            "connection_info": {"app_id": "A0TUNEOPS"}, "debug_info": {"host": "standin"}})
        try:
            async for msg in ws:
                if msg.type != web.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except json.JSONDecodeError:
                    continue
                if isinstance(data, dict) and data.get("envelope_id"):
                    with self._cond:
                        self.socket_acks[data["envelope_id"]] = data
                    self._record(Call("socket.ack", data, time.time(), 200, {"ok": True}))
        finally:
            self._sockets.remove(ws)
        return ws

    def socket_connected(self) -> bool:
        return bool(self._sockets)

    def push_envelope(self, type_: str, payload: dict[str, Any]) -> str:
        """Send an envelope to the connected Socket Mode app (from any thread); returns its envelope id."""
        if not self._sockets or self._loop is None:
            raise RuntimeError("no Socket Mode app is connected")
        envelope_id = uuid.uuid4().hex
        envelope = {"envelope_id": envelope_id, "type": type_, "payload": payload,
                    "accepts_response_payload": type_ != "events_api", "retry_attempt": 0, "retry_reason": ""}
        ws = self._sockets[-1]
        asyncio.run_coroutine_threadsafe(ws.send_json(envelope), self._loop).result(10)
        return envelope_id

    def _next_ts(self) -> str:
        # Slack's ts: seconds.micro-ish; unique and increasing within this server.
        return f"{int(time.time())}.{next(self._ts):06d}"

    # ---- the Web API methods (called with self._cond held) ------------------------------------------------------

    def _m_auth_test(self, p):
        return {"ok": True, "url": "https://standin.slack.com/", "team": "Stand-in", "user": "tuneops",
                "team_id": self.team_id, "user_id": self.bot_user_id, "bot_id": self.bot_id,
                "is_enterprise_install": False}

    def _m_chat_postMessage(self, p):
        channel = p.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        problem = _check_message(p)
        if problem:
            return {"ok": False, "error": problem}
        thread_ts = p.get("thread_ts") or None
        if thread_ts and thread_ts not in self.messages[channel]:
            return {"ok": False, "error": "thread_not_found"}
        ts = self._next_ts()
        msg = Message(channel, ts, p.get("text", ""), _blocks(p), thread_ts, _flag(p.get("reply_broadcast")))
        self.messages[channel][ts] = msg
        return {"ok": True, "channel": channel, "ts": ts,
                "message": {"type": "message", "text": msg.text, "ts": ts, "bot_id": self.bot_id}}

    def _m_chat_update(self, p):
        channel, ts = p.get("channel"), p.get("ts")
        msg = self.messages.get(channel, {}).get(ts)
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        problem = _check_message(p)
        if problem:
            return {"ok": False, "error": problem}
        msg.edits.append({"text": msg.text, "blocks": msg.blocks})
        msg.text, msg.blocks = p.get("text", ""), _blocks(p)
        return {"ok": True, "channel": channel, "ts": ts, "text": msg.text}

    def _m_chat_postEphemeral(self, p):
        if not p.get("channel") or not p.get("user"):
            return {"ok": False, "error": "user_not_in_channel" if p.get("channel") else "channel_not_found"}
        problem = _check_message(p)
        if problem:
            return {"ok": False, "error": problem}
        ts = self._next_ts()
        self.ephemeral.append({**p, "blocks": _blocks(p), "message_ts": ts})
        return {"ok": True, "message_ts": ts}

    def _m_views_open(self, p):
        # views.open (https://docs.slack.dev/reference/methods/views.open): a trigger_id from an interaction (good for
        # 3 seconds) and the view; answers the view as opened, with its id, which views.update and the view's
        # submission (view.id) carry from then on.
        view = _json_field(p.get("view"))
        if not p.get("trigger_id") or not isinstance(view, dict):
            return {"ok": False, "error": "invalid_arguments"}
        problem = _check_blocks(view.get("blocks"), MAX_HOME_BLOCKS)  # a modal holds 100 blocks too
        if problem:
            return {"ok": False, "error": "invalid_arguments", "response_metadata": {"messages": [problem]}}
        view_id = "V" + uuid.uuid4().hex[:10].upper()
        self.views[view_id] = view
        return {"ok": True, "view": {"id": view_id, **view}}

    def _m_views_update(self, p):
        view = _json_field(p.get("view"))
        view_id = p.get("view_id")
        if view_id not in self.views or not isinstance(view, dict):
            return {"ok": False, "error": "not_found"}
        problem = _check_blocks(view.get("blocks"), MAX_HOME_BLOCKS)
        if problem:
            return {"ok": False, "error": "invalid_arguments", "response_metadata": {"messages": [problem]}}
        self.views[view_id] = view
        return {"ok": True, "view": {"id": view_id, **view}}

    def _m_views_publish(self, p):
        # https://api.slack.com/methods/views.publish: user_id and view (JSON) required, "invalid_arguments" else;
        # "view_too_large" past 250 kB; a home view holds at most 100 blocks
        # (https://docs.slack.dev/reference/views/home-tab-views). The answer carries the view with its id and hash.
        user, view = p.get("user_id"), _json_field(p.get("view"))
        if not user or not isinstance(view, dict) or view.get("type") != "home":
            return {"ok": False, "error": "invalid_arguments"}
        if len(json.dumps(view)) > MAX_VIEW_BYTES:
            return {"ok": False, "error": "view_too_large"}
        problem = _check_blocks(view.get("blocks"), MAX_HOME_BLOCKS)
        if problem:
            return {"ok": False, "error": "invalid_arguments", "response_metadata": {"messages": [problem]}}
        known = self.home.get(user)
        view_id = known["id"] if known else "V" + uuid.uuid4().hex[:10].upper()
        published = {**view, "id": view_id, "team_id": self.team_id, "hash": f"{time.time():.7f}",
                     "app_id": "A0TUNEOPS", "bot_id": self.bot_id}
        self.home[user] = published
        return {"ok": True, "view": published}

    def _m_files_getUploadURLExternal(self, p):
        if not p.get("filename") or not str(p.get("length", "")).isdigit():
            return {"ok": False, "error": "invalid_arguments"}
        file_id = "F" + uuid.uuid4().hex[:10].upper()
        self.files[file_id] = {"id": file_id, "name": p["filename"], "length": int(p["length"]), "content": None}
        return {"ok": True, "upload_url": f"{self.base_url}/upload/{file_id}", "file_id": file_id}

    def _m_files_completeUploadExternal(self, p):
        files = _json_field(p.get("files"))
        if not isinstance(files, list) or not files:
            return {"ok": False, "error": "invalid_arguments"}
        done = []
        for f in files:
            stored = self.files.get(f.get("id"))
            if stored is None or stored["content"] is None:
                return {"ok": False, "error": "file_not_found"}
            stored.update(title=f.get("title") or stored["name"], channel=p.get("channel_id"),
                          thread_ts=p.get("thread_ts"), initial_comment=p.get("initial_comment"))
            done.append({"id": stored["id"], "title": stored["title"], "name": stored["name"]})
        return {"ok": True, "files": done}

    def _m_files_info(self, p):
        # files.info (https://docs.slack.dev/reference/methods/files.info): needs files:read; a file that does not
        # exist "or is not visible to the calling user" is file_not_found; a deleted one is file_deleted.
        if "files:read" not in self.scopes:
            return {"ok": False, "error": "missing_scope", "needed": "files:read",
                    "provided": ",".join(sorted(self.scopes))}
        stored = self.files.get(p.get("file", ""))
        if stored is None or stored.get("object") is None or not stored["visible"]:
            return {"ok": False, "error": "file_not_found"}
        if stored.get("deleted"):
            return {"ok": False, "error": "file_deleted"}
        return {"ok": True, "file": stored["object"], "comments": [], "response_metadata": {"next_cursor": ""}}

    def _m_chat_getPermalink(self, p):
        # chat.getPermalink (https://docs.slack.dev/reference/methods/chat.getPermalink): channel + message_ts ->
        # {"ok": true, "channel", "permalink"}; an unknown message is message_not_found.
        channel, ts = p.get("channel", ""), p.get("message_ts", "")
        if ts not in self.messages.get(channel, {}):
            return {"ok": False, "error": "message_not_found"}
        return {"ok": True, "channel": channel,
                "permalink": f"https://standin.slack.com/archives/{channel}/p{ts.replace('.', '')}"}

    def _m_conversations_info(self, p):
        channel = p.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        return {"ok": True, "channel": {"id": channel, "name": f"channel-{channel.lower()}", "is_member": True,
                                        "is_private": channel.startswith("G")}}

    def _m_users_info(self, p):
        user = p.get("user")
        if not user:
            return {"ok": False, "error": "user_not_found"}
        return {"ok": True, "user": {"id": user, "name": user.lower(), "real_name": f"Person {user}",
                                     "tz": "Europe/Berlin", "is_bot": False}}


# ---- helpers of the server ---------------------------------------------------------------------------------------

async def _read_params(request: web.Request) -> dict[str, Any]:
    params: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except (json.JSONDecodeError, ValueError):
                body = {}
            if isinstance(body, dict):
                params.update(body)
        else:
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return params


def _json_field(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return value


def _blocks(p: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = _json_field(p.get("blocks")) if p.get("blocks") is not None else []
    return blocks if isinstance(blocks, list) else []


def _flag(value: Any) -> bool:
    return value in (True, "true", "1", 1)


def block_kit_problem(blocks: list[Any]) -> str | None:
    """What slack_sdk's own Block Kit models (slack_sdk.models.blocks: the field limits, required fields and element
    types of the Block Kit reference, api.slack.com/reference/block-kit/blocks) refuse in `blocks`, or None. Slack
    answers such a message `invalid_blocks` and such a view `invalid_arguments` (chat.postMessage's and views.publish's
    error lists); checking with a validator we did not write keeps the stand-in from agreeing with the bot by
    construction."""
    from slack_sdk.models.blocks import Block

    for i, b in enumerate(blocks):
        try:
            parsed = Block.parse(b)
            if parsed is None:
                return f"block {i}: unknown block type {b.get('type')!r}"
            parsed.validate_json()
        except Exception as e:  # SlackObjectFormationError, or a field of the wrong shape
            return f"block {i} ({b.get('type')}): {e}"
    return None


def _check_blocks(blocks: Any, limit: int) -> str | None:
    """What Slack says of a view's blocks that break its limits: too many, a section text over 3,000 characters."""
    if not isinstance(blocks, list):
        return "[ERROR] missing required field: blocks"
    if len(blocks) > limit:
        return f"[ERROR] no more than {limit} items allowed [json-pointer:/view/blocks]"
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or "type" not in b:
            return f"[ERROR] missing required field: type [json-pointer:/view/blocks/{i}]"
        text = b.get("text")
        if isinstance(text, dict) and len(text.get("text", "")) > MAX_SECTION:
            return f"[ERROR] must be less than {MAX_SECTION + 1} characters [json-pointer:/view/blocks/{i}/text]"
    problem = block_kit_problem(blocks)
    return f"[ERROR] {problem} [json-pointer:/view/blocks]" if problem else None


def _check_message(p: dict[str, Any]) -> str | None:
    """Slack's checks of a message: some text or blocks, at most 50 blocks, 3,000 characters a section text."""
    blocks = _json_field(p.get("blocks")) if p.get("blocks") is not None else None
    if blocks is None and not p.get("text") and not p.get("attachments") and not p.get("delete_original"):
        return "no_text"
    if blocks is not None:
        if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS:
            return "invalid_blocks"
        for b in blocks:
            if not isinstance(b, dict) or "type" not in b:
                return "invalid_blocks"
            text = b.get("text")
            if isinstance(text, dict) and len(text.get("text", "")) > MAX_SECTION:
                return "invalid_blocks"
        if block_kit_problem(blocks) is not None:
            return "invalid_blocks"
    if len(str(p.get("text", ""))) > MAX_TEXT:
        return "msg_too_long"
    return None


# ---- what Slack sends to an app ----------------------------------------------------------------------------------

def slash_command_body(text: str, *, user_id: str = "U0ALICE", channel_id: str = "C0TRAIN",
                       response_url: str, trigger_id: str | None = None, command: str = "/finetune",
                       team_id: str = "T0STANDIN", user_name: str = "alice") -> str:
    """The form-encoded body of a slash command, as Slack POSTs it."""
    return urlencode({
        "token": "deprecated-verification-token",
        "team_id": team_id,
        "team_domain": "standin",
        "channel_id": channel_id,
        "channel_name": f"channel-{channel_id.lower()}",
        "user_id": user_id,
        "user_name": user_name,
        "command": command,
        "text": text,
        "api_app_id": "A0TUNEOPS",
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": trigger_id or f"{int(time.time())}.{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex}",
    })


def block_actions_body(*, action_id: str, value: str, user_id: str = "U0ALICE", channel_id: str = "C0TRAIN",
                       message_ts: str = "", response_url: str, team_id: str = "T0STANDIN",
                       block_id: str = "actions") -> str:
    """The form-encoded body of a button click (interactivity), as Slack POSTs it: payload=<json>."""
    payload = {
        "type": "block_actions",
        "team": {"id": team_id, "domain": "standin"},
        "user": {"id": user_id, "username": user_id.lower(), "team_id": team_id},
        "api_app_id": "A0TUNEOPS",
        "token": "deprecated-verification-token",
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel_id,
                      "is_ephemeral": False},
        "trigger_id": f"{int(time.time())}.{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex}",
        "channel": {"id": channel_id, "name": f"channel-{channel_id.lower()}"},
        "message": {"type": "message", "ts": message_ts, "text": ""},
        "response_url": response_url,
        "actions": [{"type": "button", "action_id": action_id, "block_id": block_id, "value": value,
                     "action_ts": f"{time.time():.6f}"}],
    }
    return urlencode({"payload": json.dumps(payload)})


def message_action_body(*, callback_id: str, message: Message, user_id: str = "U0ALICE", response_url: str,
                        team_id: str = "T0STANDIN") -> str:
    """The form-encoded body of a message shortcut (payload=<json>), as Slack POSTs it: type message_action, the
    shortcut's callback_id, a trigger_id for views.open, the whole message (with its files) and its channel
    (https://api.slack.com/reference/interaction-payloads/shortcuts)."""
    msg: dict[str, Any] = {"type": "message", "ts": message.ts, "text": message.text,
                           "user": user_id, "blocks": message.blocks}
    if message.files:
        msg["files"] = message.files
        msg["upload"] = True
    payload = {
        "type": "message_action",
        "token": "deprecated-verification-token",
        "action_ts": f"{time.time():.6f}",
        "team": {"id": team_id, "domain": "standin"},
        "user": {"id": user_id, "username": user_id.lower(), "name": user_id.lower(), "team_id": team_id},
        "channel": {"id": message.channel, "name": f"channel-{message.channel.lower()}"},
        "is_enterprise_install": False,
        "enterprise": None,
        "callback_id": callback_id,
        "trigger_id": f"{int(time.time())}.{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex}",
        "response_url": response_url,
        "message_ts": message.ts,
        "message": msg,
    }
    return urlencode({"payload": json.dumps(payload)})


def view_submission_body(view: dict[str, Any], view_id: str, values: dict[str, dict[str, Any]], *,
                         user_id: str = "U0ALICE", team_id: str = "T0STANDIN") -> str:
    """The form-encoded body of a modal submission (payload=<json>), as Slack POSTs it: the view as it was opened,
    with what was entered in `state.values` (block_id -> action_id -> a string, which is a plain_text_input's value,
    or the element's whole state such as {"type": "static_select", "selected_option": {...}})."""
    state = {"values": {block: {action: ({"type": "plain_text_input", "value": v} if isinstance(v, str) else v)
                                for action, v in actions.items()} for block, actions in values.items()}}
    payload = {
        "type": "view_submission",
        "team": {"id": team_id, "domain": "standin"},
        "user": {"id": user_id, "username": user_id.lower(), "name": user_id.lower(), "team_id": team_id},
        "api_app_id": "A0TUNEOPS",
        "token": "deprecated-verification-token",
        "trigger_id": f"{int(time.time())}.{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex}",
        "view": {
            "id": view_id, "team_id": team_id, "type": "modal", "blocks": view.get("blocks", []),
            "private_metadata": view.get("private_metadata", ""), "callback_id": view.get("callback_id", ""),
            "state": state, "hash": uuid.uuid4().hex[:16], "title": view.get("title"), "close": view.get("close"),
            "submit": view.get("submit"), "clear_on_close": False, "notify_on_close": False,
            "previous_view_id": None, "root_view_id": view_id, "app_id": "A0TUNEOPS", "external_id": "",
            "app_installed_team_id": team_id, "bot_id": "B0TUNEOPS",
        },
        "response_urls": [],
        "is_enterprise_install": False,
        "enterprise": None,
    }
    return urlencode({"payload": json.dumps(payload)})


def app_home_opened_body(*, user_id: str = "U0ALICE", event_id: str | None = None, tab: str = "home",
                         view: dict[str, Any] | None = None, team_id: str = "T0STANDIN") -> str:
    """The JSON body of an app_home_opened event (https://api.slack.com/events/app_home_opened), as Slack POSTs it to
    the Events API request URL: the person, their DM with the app, which tab, and the Home view last published."""
    event: dict[str, Any] = {"type": "app_home_opened", "user": user_id, "channel": "D0" + user_id[-6:],
                             "tab": tab, "event_ts": f"{time.time():.6f}"}
    if view is not None:  # only once a view was published to this person
        event["view"] = view
    return json.dumps({"token": "deprecated-verification-token", "team_id": team_id, "api_app_id": "A0TUNEOPS",
                       "event": event, "type": "event_callback",
                       "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
                       "event_time": int(time.time())})


def home_block_actions_body(*, action_id: str, value: str, user_id: str = "U0ALICE", view: dict[str, Any],
                            team_id: str = "T0STANDIN", block_id: str = "actions") -> str:
    """A button click on the app's Home tab (https://api.slack.com/reference/interaction-payloads/block-actions): the
    container is the view, the payload carries the view, and there is neither a channel nor a response_url."""
    payload = {
        "type": "block_actions",
        "team": {"id": team_id, "domain": "standin"},
        "user": {"id": user_id, "username": user_id.lower(), "team_id": team_id},
        "api_app_id": "A0TUNEOPS",
        "token": "deprecated-verification-token",
        "container": {"type": "view", "view_id": view.get("id", "")},
        "trigger_id": f"{int(time.time())}.{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex}",
        "view": view,
        "actions": [{"type": "button", "action_id": action_id, "block_id": block_id, "value": value,
                     "action_ts": f"{time.time():.6f}"}],
    }
    return urlencode({"payload": json.dumps(payload)})


def slash_command_payload(text: str, *, user_id: str = "U0ALICE", channel_id: str = "C0TRAIN",
                          response_url: str, trigger_id: str | None = None) -> dict[str, str]:
    """A slash command as Socket Mode delivers it: the same fields as the HTTP form, as a JSON object."""
    body = slash_command_body(text, user_id=user_id, channel_id=channel_id, response_url=response_url,
                              trigger_id=trigger_id)
    return dict(parse_qsl(body))


def signed_headers(signing_secret: str, body: str, *, timestamp: int | None = None, retry_num: int | None = None,
                   content_type: str = "application/x-www-form-urlencoded") -> dict[str, str]:
    """Headers Slack sends with a request: X-Slack-Request-Timestamp and X-Slack-Signature (v0 HMAC-SHA256)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        "Content-Type": content_type,
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": SignatureVerifier(signing_secret).generate_signature(timestamp=ts, body=body),
    }
    if retry_num is not None:
        headers["X-Slack-Retry-Num"] = str(retry_num)
        headers["X-Slack-Retry-Reason"] = "http_timeout"
    return headers
