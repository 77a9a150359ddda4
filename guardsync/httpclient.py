"""What the API clients (graph.py, scim.py, admin.py) share about HTTP: their sessions, their backoff,
their bearer header, and how they read an exchange."""

from __future__ import annotations

import email.utils
import os
import random
import time
from typing import Callable

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


def environment_session(url: str) -> requests.Session:
    """A Session that reads the environment once: the CA bundle (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE)
    and the proxies for `url` (HTTPS_PROXY, NO_PROXY ...). With trust_env on, requests re-reads both
    and looks for a .netrc file on every request: a tenth of a SCIM write's client CPU.
    Verification is never turned off."""
    session = requests.Session()
    session.trust_env = False
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    session.proxies.update(requests.utils.get_environ_proxies(url))
    return session


BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0  # seconds; full jitter between 0 and base * 2**attempt


def full_jitter(attempt: int) -> float:
    """The wait before retry `attempt` when the server named none (AWS's "full jitter")."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


def secret_header(api_key: str) -> Callable[[], dict[str, str]]:
    """The bearer header, kept in a closure: vars()/repr()/a debugger dump of a client shows no key."""

    def authorization() -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    return authorization
