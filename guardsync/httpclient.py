"""What both API clients (graph.py, scim.py) read off an HTTP exchange the same way."""

from __future__ import annotations

import email.utils
import time

import requests
import urllib3


def retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds (both APIs send seconds; an HTTP date works too); None if absent or unreadable."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def never_connected(exc: requests.RequestException) -> bool:
    """Refused, unresolvable or timed out while connecting: on a first contact, a wrong URL.
    (A reset after connecting is only a blip, and stays retryable.)"""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)  # NameResolutionError is one too
