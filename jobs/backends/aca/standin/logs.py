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
        # Query_Post: POST /v1/workspaces/{workspaceId}/query with {"query", "timespan"} (OperationalInsights.json,
        # data plane stable/v1; examples/oms-post-example.json).
        app.router.add_route("POST", "/v1/workspaces/{ws}/query", self.logs_query)
        return app

    async def logs_query(self, request: web.Request) -> web.Response:
        early, body = await self._gate("logs", request)
        if early is not None:
            return early
        # Without a token: 401 AuthorizationRequiredError, "Valid authentication was not provided" (the message as
        # MicrosoftDocs/azure-docs#112220 quotes it; the code as clients' recorded answers show it, found by code
        # search, repositories not named there).
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return web.json_response({"error": {"code": "AuthorizationRequiredError",
                                                "message": "Valid authentication was not provided"}}, status=401)
        # A workspace the API does not know: 404 PathNotFoundError, "The requested path does not exist"
        # (Azure/azure-cli-extensions#2479, #3914; Azure/azure-sdk-for-python#45580).
        if request.match_info["ws"] != WORKSPACE_ID:
            return web.json_response({"error": {"code": "PathNotFoundError",
                                                "message": "The requested path does not exist"}}, status=404)
        data = json.loads(body)
        refused = self._against_spec("logs", request, data)
        if refused is not None:
            return refused
        # A table exists in a workspace once something wrote to it; the custom table always does here (an
        # environment logging to Log Analytics has it: log-monitoring.md), so a union over both tables resolves.
        with self.lock:
            tables = {k: list(v) for k, v in self.log_tables.items() if v or k == "ContainerAppConsoleLogs_CL"}
        try:
            rows = run_kql(data["query"], tables)
        except KqlError as e:
            # A bad query: 400 BadArgumentError, "The request had some invalid properties", the reason in
            # innererror (MicrosoftDocs/azure-docs#18012 quotes {"message": "The request had some invalid
            # properties", "code": "BadArgumentError", "innererror": {"code": "SyntaxError", ...}}; errorInfo with its
            # recursive innererror in OperationalInsights.json). Later answers nest the detail one level deeper
            # (SEM0100, SYN0002: Azure/azure-sdk-for-js sdk/monitor/monitor-query/test/public/logsQueryClient.spec.ts);
            # the stand-in keeps one level and calls every failure a SemanticError: tuneops reads only the status.
            return web.json_response({"error": {"code": "BadArgumentError",
                                                "message": "The request had some invalid properties",
                                                "innererror": {"code": "SemanticError", "message": str(e)}}},
                                     status=400)
        # The answer: {"tables": [{"name": "PrimaryResult", "columns": [{"name", "type"}], "rows": [[...]]}]}
        # (queryResults in OperationalInsights.json; examples/oms-post-example.json, datetimes as ISO strings, type
        # "datetime" or "string"). With no rows the real API still names the query's columns; the stand-in cannot
        # know them and names TimeGenerated and Log (no public source; kept because nothing reads an empty table's
        # columns).
        cols = list(rows[0].keys()) if rows else ["TimeGenerated", "Log"]
        types = {c: "datetime" if c == "TimeGenerated" else "string" for c in cols}
        out_rows = [[_iso(r[c]) if isinstance(r.get(c), dt.datetime) else r.get(c) for c in cols] for r in rows]
        return web.json_response({"tables": [{"name": "PrimaryResult",
                                              "columns": [{"name": c, "type": types[c]} for c in cols],
                                              "rows": out_rows}]})


