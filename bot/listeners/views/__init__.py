"""Modal (view submission) listeners. The bot opens no modal yet: the secret form arrives with Key Vault secrets,
and registers its submission handler here."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp


def register(app: AsyncApp) -> None:
    """No views to register in this version."""
