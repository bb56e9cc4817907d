"""Key Vault secrets, with the 401 challenge handshake."""

from __future__ import annotations

import json
import re
import time
import uuid

from aiohttp import web

from jobs.backends.aca.standin.common import (
    TENANT,
)


class VaultService:
    """The Key Vault endpoints of the stand-in; its state lives on AzureStandIn."""

    def _vault_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/secrets", self._vault(self.kv_list))
        app.router.add_route("*", "/secrets/{name}", self._vault(self.kv_secret))
        # get_secret without a version asks for /secrets/NAME/ (an empty version: the latest).
        app.router.add_route("*", "/secrets/{name}/", self._vault(self.kv_secret))
        app.router.add_route("*", "/secrets/{name}/{version}", self._vault(self.kv_secret))
        return app

    def _vault(self, handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            early, body = await self._gate("vault", request)
            if early is not None:
                return early
            if not request.headers.get("Authorization", "").startswith("Bearer "):
                # The handshake: Key Vault's client first asks without a token and learns where to get one.
                return web.json_response(
                    {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer token."}},
                    status=401, headers={"WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/'
                                                             f'{TENANT}", resource="https://vault.azure.net"'})
            with self.lock:
                return handler(request, json.loads(body) if body else None)

        return wrapped

    def _bundle(self, name: str, version: dict, with_value: bool) -> dict:
        out = {"id": f"{self.vault_url}/secrets/{name}/{version['version']}", "attributes": version["attributes"],
               "tags": version.get("tags") or {}}
        if version.get("contentType"):
            out["contentType"] = version["contentType"]
        if with_value:
            out["value"] = version["value"]
        return out

    def kv_list(self, request, data):
        if request.method != "GET":
            return web.json_response({"error": {"code": "BadParameter", "message": "method"}}, status=405)
        items = [self._bundle(n, v[-1], False) for n, v in sorted(self.vault.items())]
        for item in items:
            item["id"] = item["id"].rsplit("/", 1)[0]
        return web.json_response({"value": items, "nextLink": None})

    def kv_secret(self, request, data):
        name = request.match_info["name"]
        if not re.match(r"^[0-9a-zA-Z-]{1,127}$", name):
            return web.json_response({"error": {"code": "BadParameter", "message": f"invalid secret name {name}"}},
                                     status=400)
        if request.method == "PUT":
            if not isinstance(data, dict) or not isinstance(data.get("value"), str):
                return web.json_response({"error": {"code": "BadParameter", "message": "value is required"}}, status=400)
            now = int(time.time())
            versions = self.vault.setdefault(name, [])
            created = versions[0]["attributes"]["created"] if versions else now
            v = {"version": uuid.uuid4().hex, "value": data["value"], "tags": data.get("tags") or {},
                 "contentType": data.get("contentType"),
                 "attributes": {"enabled": True, "created": created, "updated": now,
                                "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90}}
            versions.append(v)
            return web.json_response(self._bundle(name, v, True))
        if request.method == "GET":
            versions = self.vault.get(name)
            if not versions:
                return web.json_response({"error": {"code": "SecretNotFound",
                                                    "message": f"A secret with (name/id) {name} was not found in this key vault."}},
                                         status=404)
            want = request.match_info.get("version")
            v = next((x for x in versions if x["version"] == want), None) if want else versions[-1]
            if v is None:
                return web.json_response({"error": {"code": "SecretNotFound", "message": "no such version"}}, status=404)
            return web.json_response(self._bundle(name, v, True))
        return web.json_response({"error": {"code": "BadParameter", "message": "method"}}, status=405)

