"""Key Vault secrets, with the 401 challenge handshake, soft delete (delete, get deleted, recover, purge) and the
answers a caller without a data action's RBAC role gets."""

from __future__ import annotations

import json
import re
import time
import uuid

from aiohttp import web

from jobs.backends.aca.standin.common import (
    SUBSCRIPTION,
    TENANT,
)

# Key Vault RBAC data actions, as Azure names them (the `dataActions` of Microsoft.KeyVault/vaults/secrets, e.g. in
# `azperm --resource-type=Microsoft.KeyVault/vaults/secrets@2023-02-01`); `deny_vault_actions` takes their last parts.
DATA_ACTION = "Microsoft.KeyVault/vaults/secrets/{}"
SET, GET, LIST, DELETE, RECOVER, PURGE = ("setSecret/action", "getSecret/action", "readMetadata/action", "delete",
                                          "recover/action", "purge/action")
RETENTION_DAYS = 90   # recoverableDays of a vault with the default retention (the secrets' attributes say so)


def _error(status: int, code: str, message: str, inner: str = "") -> web.Response:
    body: dict = {"code": code, "message": message}
    if inner:
        body["innererror"] = {"code": inner}
    return web.json_response({"error": body}, status=status)


class VaultService:
    """The Key Vault endpoints of the stand-in; its state lives on AzureStandIn (`vault`: the live secrets' versions)
    and, added here on first use, `deleted_secrets`, `vault_recovering` and `vault_denied`."""

    # How long a recovery takes: GET answers 404 and PUT 409 ObjectIsBeingRecovered until then; the PUT may be
    # refused a little longer than the GET (`vault_recovery_put_lag_s`). Tests set them; 0 = at once.
    vault_recovery_s = 0.0
    vault_recovery_put_lag_s = 0.0

    def _vault_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/secrets", self._vault(self.kv_list))
        app.router.add_route("*", "/secrets/{name}", self._vault(self.kv_secret))
        # get_secret without a version asks for /secrets/NAME/ (an empty version: the latest).
        app.router.add_route("*", "/secrets/{name}/", self._vault(self.kv_secret))
        app.router.add_route("*", "/secrets/{name}/{version}", self._vault(self.kv_secret))
        app.router.add_route("*", "/deletedsecrets/{name}", self._vault(self.kv_deleted))
        app.router.add_route("*", "/deletedsecrets/{name}/recover", self._vault(self.kv_recover))
        return app

    def _vault(self, handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            early, body = await self._gate("vault", request)
            if early is not None:
                return early
            if not request.headers.get("Authorization", "").startswith("Bearer "):
                # The handshake: Key Vault's client first asks without a token and learns where to get one. A
                # request without a token is a 401 with a Bearer challenge naming the tenant's authority and the
                # resource ("Azure Key Vault REST API Error Codes", HTTP 401, learn.microsoft.com/azure/key-vault/
                # general/rest-error-codes); body and header as recorded in Azure/azure-sdk-for-js
                # sdk/keyvault/keyvault-secrets/recordings/node/secret_client__list_secrets_in_various_ways/
                # recording_can_list_secret_properties.js ({"error": {"code": "Unauthorized", "message": "AKV10000:
                # Request is missing a Bearer or PoP token."}}; 'Bearer authorization="https://login.windows.net/
                # <tenant>", resource="https://vault.azure.net"'). login.microsoftonline.com is the same authority
                # (an alias of login.windows.net in that recording's instance discovery).
                return web.json_response(
                    {"error": {"code": "Unauthorized",
                               "message": "AKV10000: Request is missing a Bearer or PoP token."}},
                    status=401, headers={"WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/'
                                                             f'{TENANT}", resource="https://vault.azure.net"'})
            data = json.loads(body) if body else None
            refused = self._against_spec("vault", request, data)
            if refused is not None:
                return refused
            with self.lock:
                return handler(request, data)

        return wrapped

    # ---- what tests configure and inspect ------------------------------------------------------------------------

    @property
    def deleted_secrets(self) -> dict[str, dict]:
        """Soft-deleted secrets: name -> {"versions", "deletedDate", "scheduledPurgeDate"}."""
        return self.__dict__.setdefault("_deleted_secrets", {})

    @property
    def vault_recovering(self) -> dict[str, tuple[float, float]]:
        """Secrets being recovered: name -> (monotonic time GET finds it, time PUT may write it)."""
        return self.__dict__.setdefault("_vault_recovering", {})

    @property
    def vault_denied(self) -> set[str]:
        """The data actions the caller's role lacks (full names, DATA_ACTION)."""
        return self.__dict__.setdefault("_vault_denied", set())

    def deny_vault_actions(self, *actions: str) -> None:
        """Take data actions (SET, GET, RECOVER, ...) away from the caller, as a role without them would."""
        with self.lock:
            self.vault_denied.update(DATA_ACTION.format(a) for a in actions)

    # ---- shared pieces -------------------------------------------------------------------------------------------

    def _bundle(self, name: str, version: dict, with_value: bool) -> dict:
        """A SecretBundle (secrets.json 7.6): id "<vault>/secrets/<name>/<version>", attributes, tags, contentType
        when set, and value only where the operation gives it (SetSecret, GetSecret; not the deleted, recovered or
        listed forms: RecoverDeletedSecret-example.json has none)."""
        out = {"id": f"{self.vault_url}/secrets/{name}/{version['version']}", "attributes": version["attributes"],
               "tags": version.get("tags") or {}}
        if version.get("contentType"):
            out["contentType"] = version["contentType"]
        if with_value:
            out["value"] = version["value"]
        return out

    def _deleted_bundle(self, name: str) -> dict:
        # DeletedSecretBundle: DeleteSecret-example.json / GetDeletedSecret-example.json (azure-rest-api-specs,
        # specification/keyvault/data-plane/Microsoft.KeyVault/stable/7.5/examples): recoveryId, deletedDate,
        # scheduledPurgeDate (deletedDate + the retention, 90 days there), id and attributes of the latest version,
        # and no value.
        entry = self.deleted_secrets[name]
        out = self._bundle(name, entry["versions"][-1], False)
        out.update({"recoveryId": f"{self.vault_url}/deletedsecrets/{name}", "deletedDate": entry["deletedDate"],
                    "scheduledPurgeDate": entry["scheduledPurgeDate"]})
        return out

    def _forbidden(self, action: str, name: str) -> web.Response | None:
        """A 403 for a caller whose role lacks `action`, or None. The shape is Key Vault's RBAC refusal as clients
        print it (piyushsachdeva/Terraform_AKS issue 2: Code="Forbidden", the multi-line message naming the Action,
        InnerError={"code":"ForbiddenByRbac"}; microsoft/AzureTRE issue 1237 shows the access-policy variant)."""
        full = DATA_ACTION.format(action)
        if full not in self.vault_denied:
            return None
        resource = (f"/subscriptions/{SUBSCRIPTION}/resourcegroups/tuneops-rg/providers/microsoft.keyvault/vaults/"
                    f"tuneops-kv/secrets/{name}")
        message = ("Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments "
                   "or role definitions were changed recently, please observe propagation time.\r\n"
                   f"Caller: appid=00000000-0000-4000-8000-0000000000b0;oid=00000000-0000-4000-8000-0000000000b1;"
                   f"iss=https://sts.windows.net/{TENANT}/\r\nAction: '{full}'\r\nResource: '{resource}'\r\n"
                   "Assignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: 'DeniedWithNoValidRBAC' \r\n"
                   f"Vault: tuneops-kv;location={self.location}\r\n")
        return _error(403, "Forbidden", message, "ForbiddenByRbac")

    def _recovery(self, name: str) -> tuple[bool, bool]:
        """(hidden from GET, refused to PUT) for a secret whose recovery may still run."""
        times = self.vault_recovering.get(name)
        if times is None:
            return False, False
        now = time.monotonic()
        if now >= max(times):
            del self.vault_recovering[name]
            return False, False
        return now < times[0], now < times[1]

    @staticmethod
    def _bad_name(name: str) -> web.Response | None:
        # secret-name's pattern "^[0-9a-zA-Z-]+$" (SetSecret in secrets.json 7.6) and 1-127 characters ("About keys,
        # secrets, and certificates", object identifiers); BadParameter is Key Vault's code for a bad parameter
        # (schema.py). The message is the stand-in's.
        if re.match(r"^[0-9a-zA-Z-]{1,127}$", name):
            return None
        return _error(400, "BadParameter", f"invalid secret name {name}")

    # ---- /secrets ------------------------------------------------------------------------------------------------

    def kv_list(self, request, data):
        if request.method != "GET":
            return _error(405, "BadParameter", "method")
        if (refused := self._forbidden(LIST, "")) is not None:
            return refused
        # GetSecrets: a SecretListResult, {"value": [SecretItem], "nextLink"} (secrets.json 7.6), each item the
        # secret's id without a version, its attributes, tags and contentType, never a value (SecretItem has none);
        # one page here, so nextLink is null. Listing needs secrets/readMetadata (DATA_ACTION above).
        items = [self._bundle(n, v[-1], False) for n, v in sorted(self.vault.items()) if not self._recovery(n)[0]]
        for item in items:
            item["id"] = item["id"].rsplit("/", 1)[0]
        return web.json_response({"value": items, "nextLink": None})

    def kv_secret(self, request, data):
        name = request.match_info["name"]
        if (bad := self._bad_name(name)) is not None:
            return bad
        if request.method == "PUT":
            return self._kv_set(name, data)
        if request.method == "GET":
            return self._kv_get(name, request.match_info.get("version"))
        if request.method == "DELETE" and "version" not in request.match_info:
            return self._kv_delete(name)
        return _error(405, "BadParameter", "method")

    def _kv_set(self, name: str, data) -> web.Response:
        if (refused := self._forbidden(SET, name)) is not None:
            return refused
        if not isinstance(data, dict) or not isinstance(data.get("value"), str):
            return _error(400, "BadParameter", "value is required")
        if name in self.deleted_secrets:
            # A soft-deleted name cannot be reused until it is recovered or purged: 409 Conflict with the inner code
            # ObjectIsDeletedButRecoverable. The text is Key Vault's as the Azure CLI prints it (MicrosoftDocs example
            # "If you try to set a secret that has been deleted ... you get the following error"); the JSON shape
            # (error.code, error.message, error.innererror.code) is the one Azure/azure-sdk-for-net's Key Vault
            # sample "Getting error details" parses, and external-secrets/external-secrets issue 3519 reports it.
            return _error(409, "Conflict",
                          f"Secret {name} is currently in a deleted but recoverable state, and its name cannot be "
                          f"reused; in this state, the secret can only be recovered or purged.",
                          "ObjectIsDeletedButRecoverable")
        if self._recovery(name)[1]:
            # During a recovery, and sometimes just after the client's poller saw the secret again, a SET answers
            # 409 ObjectIsBeingRecovered (hashicorp/terraform-provider-azurerm issue 12285 logs the body;
            # Azure/azure-sdk-for-net issue 31581: "after StartRecoverDeletedSecretAsync completed").
            return _error(409, "Conflict",
                          f"Secret {name} is currently being recovered and cannot be re-created; retry later.",
                          "ObjectIsBeingRecovered")
        now = int(time.time())
        versions = self.vault.setdefault(name, [])
        created = versions[0]["attributes"]["created"] if versions else now
        v = {"version": uuid.uuid4().hex, "value": data["value"], "tags": data.get("tags") or {},
             "contentType": data.get("contentType"),
             "attributes": {"enabled": True, "created": created, "updated": now,
                            "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": RETENTION_DAYS}}
        versions.append(v)
        return web.json_response(self._bundle(name, v, True))

    def _kv_get(self, name: str, want: str | None) -> web.Response:
        if (refused := self._forbidden(GET, name)) is not None:
            return refused
        versions = self.vault.get(name)
        if not versions or self._recovery(name)[0]:
            # Recorded while a recovery runs (Azure/azure-sdk-for-js, keyvault-secrets recording
            # "can wait until a secret is recovered"): GET /secrets/NAME/ answers 404 SecretNotFound for seconds.
            return _error(404, "SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault.")
        v = next((x for x in versions if x["version"] == want), None) if want else versions[-1]
        if v is None:
            return _error(404, "SecretNotFound", "no such version")
        return web.json_response(self._bundle(name, v, True))

    def _kv_delete(self, name: str) -> web.Response:
        if (refused := self._forbidden(DELETE, name)) is not None:
            return refused
        if name not in self.vault or self._recovery(name)[0]:
            return _error(404, "SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault.")
        # DELETE moves every version to the deleted secrets and answers the DeletedSecretBundle
        # (DeleteSecret-example.json; the recording in Azure/azure-sdk-for-js shows the same fields). Deletion is
        # immediate here; Key Vault may take seconds, which the SDK's delete poller waits out.
        now = int(time.time())
        self.deleted_secrets[name] = {"versions": self.vault.pop(name), "deletedDate": now,
                                      "scheduledPurgeDate": now + RETENTION_DAYS * 86400}
        return web.json_response(self._deleted_bundle(name))

    # ---- /deletedsecrets -----------------------------------------------------------------------------------------

    def kv_deleted(self, request, data):
        name = request.match_info["name"]
        if (bad := self._bad_name(name)) is not None:
            return bad
        if request.method == "GET":
            # GetDeletedSecret (secrets.json 7.5; GetDeletedSecret-example.json). Not found: the recorded 404
            # {"code":"SecretNotFound","message":"Deleted Secret not found: NAME"} (Azure/azure-sdk-for-js recording).
            if name not in self.deleted_secrets:
                return _error(404, "SecretNotFound", f"Deleted Secret not found: {name}")
            return web.json_response(self._deleted_bundle(name))
        if request.method == "DELETE":
            # PurgeDeletedSecret: 204 and no body (PurgeDeletedSecret-example.json); needs secrets/purge.
            if (refused := self._forbidden(PURGE, name)) is not None:
                return refused
            if self.deleted_secrets.pop(name, None) is None:
                return _error(404, "SecretNotFound", f"Deleted Secret not found: {name}")
            return web.Response(status=204)
        return _error(405, "BadParameter", "method")

    def kv_recover(self, request, data):
        name = request.match_info["name"]
        if (bad := self._bad_name(name)) is not None:
            return bad
        if request.method != "POST":
            return _error(405, "BadParameter", "method")
        # RecoverDeletedSecret: POST /deletedsecrets/NAME/recover needs secrets/recover (secrets.json 7.5) and
        # answers the SecretBundle of the latest version without its value (RecoverDeletedSecret-example.json).
        if (refused := self._forbidden(RECOVER, name)) is not None:
            return refused
        entry = self.deleted_secrets.pop(name, None)
        if entry is None:
            # Not in the deleted secrets: the same 404 a GET of it gets (an assumption; no recorded example).
            return _error(404, "SecretNotFound", f"Deleted Secret not found: {name}")
        self.vault[name] = entry["versions"]
        # Recovery is asynchronous: the recording above shows GET /secrets/NAME/ answering 404 for several seconds
        # after the 200, which is what begin_recover_deleted_secret's poller waits out.
        start = time.monotonic()
        visible = start + self.vault_recovery_s
        self.vault_recovering[name] = (visible, visible + self.vault_recovery_put_lag_s)
        return web.json_response(self._bundle(name, entry["versions"][-1], False))
