"""Constants and small pieces shared by the stand-in's services."""

from __future__ import annotations

import base64
import datetime as dt
import random
import re
import string
from dataclasses import dataclass

SUBSCRIPTION = "00000000-0000-4000-8000-000000000001"
TENANT = "00000000-0000-4000-8000-0000000000aa"
ACCOUNT = "tuneopsstore"
ACCOUNT_KEY = base64.b64encode(b"stand-in storage account key, not a secret").decode()
WORKSPACE_ID = "11111111-2222-4333-8444-555555555555"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _rand(n: int) -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=n))


@dataclass
class Fault:
    """One injected failure: requests to `service` whose method and path match get `status` (or just `delay`)."""

    service: str                      # "arm", "vault", "files", "logs" or "*"
    path: str = ""                    # a regex searched in the request path
    method: str = ""                  # "" = any
    status: int | None = 500          # None: answer normally, after `delay`
    retry_after: float | None = None
    delay: float = 0.0
    code: str = ""
    message: str = "injected fault"
    times: int = 1
    hits: int = 0

    def matches(self, service: str, method: str, path: str) -> bool:
        return (self.times > 0 and self.service in (service, "*") and (not self.method or self.method == method)
                and re.search(self.path, path) is not None)


@dataclass
class RecordedRequest:
    service: str
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes             # empty for file data (only its size is kept, in `size`)
    size: int
    status: int = 0

