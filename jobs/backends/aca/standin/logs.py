"""The Log Analytics query API."""

from __future__ import annotations

import datetime as dt
import json

from aiohttp import web

from jobs.backends.aca.standin.common import (
    WORKSPACE_ID,
    _iso,
)
from jobs.backends.aca.standin.kql import KqlError, run_kql


class LogsService:
    """The Log Analytics query endpoint of the stand-in."""

    def _logs_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("POST", "/v1/workspaces/{ws}/query", self.logs_query)
        return app

    async def logs_query(self, request: web.Request) -> web.Response:
        early, body = await self._gate("logs", request)
        if early is not None:
            return early
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return web.json_response({"error": {"code": "AuthorizationRequiredError", "message": "no token"}}, status=401)
        if request.match_info["ws"] != WORKSPACE_ID:
            return web.json_response({"error": {"code": "WorkspaceNotFoundError", "message": "no such workspace"}},
                                     status=404)
        data = json.loads(body)
        refused = self._against_spec("logs", request, data)
        if refused is not None:
            return refused
        with self.lock:
            tables = {k: list(v) for k, v in self.log_tables.items() if v or k == "ContainerAppConsoleLogs_CL"}
        try:
            rows = run_kql(data["query"], tables)
        except KqlError as e:
            return web.json_response({"error": {"code": "BadArgumentError", "message": "The request had some invalid properties",
                                                "innererror": {"code": "SemanticError", "message": str(e)}}},
                                     status=400)
        cols = list(rows[0].keys()) if rows else ["TimeGenerated", "Log"]
        types = {c: "datetime" if c == "TimeGenerated" else "string" for c in cols}
        out_rows = [[_iso(r[c]) if isinstance(r.get(c), dt.datetime) else r.get(c) for c in cols] for r in rows]
        return web.json_response({"tables": [{"name": "PrimaryResult",
                                              "columns": [{"name": c, "type": types[c]} for c in cols],
                                              "rows": out_rows}]})


