"""Typed errors, each carrying what the operator should do.

Client edges (graph.py, scim.py) map HTTP answers to these once; the rest of the
code and the CLI only ever see these types. Exit status follows the contract:
GuardsyncBlocked -> 3, every other GuardsyncError -> 1.
"""

from __future__ import annotations


class GuardsyncError(Exception):
    """Base of every error guardsync raises on purpose. `str()` is one line for people."""

    exit_code = 1


class ConfigError(GuardsyncError):
    """The configuration is wrong: names the key and the fix."""


class AuthError(GuardsyncError):
    """A credential was refused (Entra token or Atlassian SCIM key)."""


class TransientError(GuardsyncError):
    """Worth retrying: throttling, 5xx, connection trouble. `retry_after` in seconds if known."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ApiError(GuardsyncError):
    """A 4xx that will not heal by retrying; carries the server's own code and message."""

    def __init__(self, message: str, status: int, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class NotFound(ApiError):
    """The object is gone on the server (e.g. deleted by hand): re-create it."""


class Conflict(ApiError):
    """The object already exists on the server: adopt it."""


class GuardsyncBlocked(GuardsyncError):
    """A gate or guard stopped the run before the blocked writes; exit 3."""

    exit_code = 3

    def __init__(self, rule: str, message: str, advice: str):
        super().__init__(f"blocked by {rule}: {message}" + (f". {advice}" if advice else ""))
        self.rule = rule
        self.message = message
        self.advice = advice

    @property
    def approvable(self) -> bool:
        """A person may lift it for exactly the plan shown (DESIGN.md, "Approval"); a gate, the group-size cap
        (Atlassian's own limit), an empty scope and a store of another directory never are."""
        return self.rule in APPROVABLE_RULES


# The guards a person may approve past: the run's numbers are big, not wrong.
APPROVABLE_RULES = frozenset({"max_deactivations", "max_revocations", "seat_capacity"})
