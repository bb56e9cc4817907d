"""The ACA usages APIs: how much of a quota the subscription (per location) and an environment use."""

from __future__ import annotations

from aiohttp import web


class UsagesService:
    """The usages endpoints of the stand-in, registered on the ARM app."""

    def _usage_routes(self, app: web.Application, prefix: str) -> None:
        """Add the usages routes to the ARM app (`prefix` is the resource group's Microsoft.App path)."""
