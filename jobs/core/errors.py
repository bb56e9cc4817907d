"""The errors a person can act on, as data: what was wrong (`reason`) and, where one helps, which tuneops command to
use next (`hint`). jobs/ never words a command for a chat; the bot renders a Hint as its own command syntax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Hint:
    """A tuneops command that helps, e.g. Hint("list", "shows the runs"); `command` is the subcommand and its
    arguments, `says` what it does, in words that follow the command."""

    command: str
    says: str = ""

    def as_data(self) -> dict[str, str]:
        return {"command": self.command, "says": self.says}

    @classmethod
    def from_data(cls, data: Any) -> Hint | None:
        if isinstance(data, dict) and data.get("command"):
            return cls(str(data["command"]), str(data.get("says", "")))
        return None


class Refusal(Exception):
    """A failure a person can act on. str(e) is the reason alone; renderers add the hint in their own words."""

    def __init__(self, reason: str, *, hint: Hint | None = None):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint

    def hint_data(self) -> dict[str, str]:
        return self.hint.as_data() if self.hint else {}


class RunRejected(Refusal):
    """A request that cannot be done as asked (a bad path, an unknown run, a state that does not allow it)."""


class BackendError(Refusal):
    """A backend failure; `transient` ones are worth retrying."""

    def __init__(self, reason: str, *, hint: Hint | None = None, transient: bool = False):
        super().__init__(reason, hint=hint)
        self.transient = transient
