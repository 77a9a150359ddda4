"""Configuration: the TOML file of the contract, as a pydantic model.

The same model is the flow's parameter, so a Prefect deployment shows and
validates it. It holds secret *references* (env:NAME, prefect:BLOCK), never secret
values: those are resolved at the client edge, in memory only.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from guardsync.errors import ConfigError
from guardsync.models import ATTRIBUTES

SECRET_REF = re.compile(r"^(env|prefect):[A-Za-z0-9_.\-/]+$")
# Query parameters of a database URL that carry a secret (libpq's password, sslpassword; drivers' pwd, token...)
SECRET_QUERY_KEY = re.compile(r"pass|pwd|secret|token", re.IGNORECASE)


def url_has_secret(url: str) -> bool:
    """A password in the URL's userinfo, or a query parameter such as ?password=."""
    try:
        parts = urlsplit(url)
        return bool(parts.password) or any(SECRET_QUERY_KEY.search(key) for key, _ in parse_qsl(parts.query))
    except ValueError:
        return False


def redacted_url(url: str) -> str:
    """The URL as it may be printed: its password and secret query values replaced by ***."""
    if not url_has_secret(url):
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
        query = "&".join(f"{key}=***" if SECRET_QUERY_KEY.search(key) else f"{key}={value}"
                         for key, value in parse_qsl(parts.query, keep_blank_values=True))
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "the configured URL"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_secret_ref(value: str | None) -> str | None:
    if value is not None and not SECRET_REF.match(value):
        # Never echo the value: it may be a pasted secret.
        raise ValueError("must be a reference, env:VARIABLE or prefect:SECRET_BLOCK, not the secret itself")
    return value


class EntraSettings(_Section):
    tenant_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    client_secret: str | None = None
    certificate_path: str | None = None
    authority_host: str = "https://login.microsoftonline.com"
    graph_url: str = "https://graph.microsoft.com"

    _ref = field_validator("client_secret")(_check_secret_ref)

    @field_validator("authority_host", "graph_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("must be an https:// URL (TLS is always verified)")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_credential(self) -> "EntraSettings":
        if (self.client_secret is None) == (self.certificate_path is None):
            raise ValueError("set exactly one of client_secret or certificate_path")
        return self


class AtlassianSettings(_Section):
    scim_url: str
    api_key: str

    _ref = field_validator("api_key")(_check_secret_ref)

    @field_validator("scim_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("must be an https:// URL, e.g. https://api.atlassian.com/scim/directory/DIRECTORY_ID")
        return value.rstrip("/")


class SyncSettings(_Section):
    groups: list[str] = []
    domains: list[str] = []
    identifier: Literal["upn", "email"] = "upn"
    max_group_size: int = Field(10_000, ge=1)
    max_deactivations: str | int = "10%"
    state: str = "sqlite:///guardsync-state.db"
    # Extensions of the contract (optional keys):
    write_concurrency: int = Field(4, ge=1, le=32)  # parallel SCIM writes; adapts down on 429
    full_read_every_hours: float = Field(24, gt=0)  # delta sync: force a full read this often
    results_keep_days: float = Field(7, gt=0)  # Prefect's persisted stage results: a retry window, then deleted
    # How long one Graph or SCIM request may be retried, Retry-After waits included (Graph asks for up to a few
    # minutes when it throttles); a longer wait fails the run with a message that says so.
    retry_budget_seconds: float = Field(900, gt=0, le=6 * 3600)
    request_timeout_seconds: float = Field(60, gt=0, le=600)  # a silent server must not hang a run
    # A deployment run an approvable guard blocks waits this long for a person's answer in the Prefect UI
    approval_timeout_hours: float = Field(24, gt=0, le=24 * 14)

    @field_validator("state")
    @classmethod
    def _no_password_in_state(cls, value: str) -> str:
        # The settings are the flow's parameters: Prefect stores them and shows them in its UI.
        if value.startswith(("env:", "prefect:")):
            return _check_secret_ref(value)
        if url_has_secret(value):
            raise ValueError(
                "the URL holds a password (in user:password@ or a query parameter such as ?password=), which "
                "Prefect would store and show as a flow parameter; put the URL in "
                "an environment variable and set state = \"env:VARIABLE\" (or prefect:SECRET_BLOCK), or leave the "
                "password out and let libpq read PGPASSWORD or ~/.pgpass"
            )
        return value

    @field_validator("max_deactivations")
    @classmethod
    def _limit(cls, value: str | int) -> str | int:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("must be a count >= 0 or a percentage like \"10%\"")
            return value
        if re.fullmatch(r"\d+(\.\d+)?%", value.strip()) or value.strip().isdigit():
            return value.strip()
        raise ValueError("must be a count like 50 or a percentage like \"10%\"")

    def deactivation_limit(self, active_managed: int) -> int | None:
        """The most deactivations allowed; None when a percentage has no base (first run)."""
        value = self.max_deactivations
        if isinstance(value, int) or value.isdigit():
            return int(value)
        if active_managed == 0:
            return None
        return int(active_managed * float(value.rstrip("%")) / 100)


PRODUCT_REF = re.compile(r"^[a-z][a-z0-9-]*(@[A-Za-z0-9.-]+)?$")


class AccessSettings(_Section):
    """Product access of synced groups, through the Organizations REST API (see DESIGN.md "Product access")."""

    org_id: str = Field(min_length=1)
    api_key: str  # an organization API key, not the SCIM key
    admin_url: str = "https://api.atlassian.com"
    max_revocations: int = Field(0, ge=0)  # grants one run may take away; more blocks it
    groups: dict[str, list[str]] = {}  # synced group (display name or Entra id) = product keys

    _ref = field_validator("api_key")(_check_secret_ref)

    @field_validator("admin_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("must be an https:// URL, e.g. https://api.atlassian.com (TLS is always verified)")
        return value.rstrip("/")

    @field_validator("groups")
    @classmethod
    def _products(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for group, products in value.items():
            bad = [p for p in products if not PRODUCT_REF.match(p)]
            if bad:
                raise ValueError(f"{group!r}: {bad[0]!r} is not a product key; write it like \"jira-software\" or "
                                 "\"confluence@example.atlassian.net\" (key@site-host)")
        return value


# A source: a Graph user property as $select names it, an on-premises extension attribute, or a
# directory extension (extension_<appId without dashes>_<name>). Whether Graph knows it is `check`'s job.
SOURCE = re.compile(
    r"^(?:[A-Za-z][A-Za-z0-9]*|onPremisesExtensionAttributes\.extensionAttribute(?:[1-9]|1[0-5])"
    r"|extension_[0-9A-Fa-f]{32}_[A-Za-z0-9_]+)$"
)
# Graph returns these only when reading one user (GET /users/{id}), never in a list or a delta round
# (learn.microsoft.com/graph/api/user-list, "Optional query parameters").
SINGLE_USER_ONLY = frozenset({
    "aboutMe", "birthday", "hireDate", "interests", "mailboxSettings", "mySite", "pastProjects",
    "preferredName", "responsibilities", "schools", "skills",
})


class AttributeSettings(_Section):
    """[attributes]: Atlassian attribute = Entra user property; "" sends nothing for it.

    The defaults are Atlassian's own Entra sync. Keys are spelled as SCIM does (aliases), so
    `"phoneNumbers.mobile" = ""` and a nested `[attributes.phoneNumbers]` table both work.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_alias=True, validate_by_name=True,
                              serialize_by_alias=True)

    display_name: str = Field("displayName", alias="displayName")
    given_name: str = Field("givenName", alias="name.givenName")
    family_name: str = Field("surname", alias="name.familyName")
    title: str = Field("jobTitle", alias="title")
    preferred_language: str = Field("preferredLanguage", alias="preferredLanguage")
    phone_work: str = Field("businessPhones", alias="phoneNumbers.work")
    phone_mobile: str = Field("mobilePhone", alias="phoneNumbers.mobile")
    department: str = Field("department", alias="department")
    organization: str = Field("", alias="organization")
    timezone: str = Field("", alias="timezone")
    nick_name: str = Field("", alias="nickName")

    @model_validator(mode="before")
    @classmethod
    def _dotted_keys(cls, raw):
        """TOML reads `phoneNumbers.mobile = ""` (unquoted) as a table: make it the dotted key."""
        if not isinstance(raw, dict):
            return raw
        flat = {}
        for key, value in raw.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{sub}": inner for sub, inner in value.items()})
            else:
                flat[key] = value
        return flat

    @field_validator("*")
    @classmethod
    def _source(cls, value: str, info) -> str:
        value = value.strip()
        if value == "":
            if info.field_name == "display_name":
                raise ValueError("displayName cannot be turned off (Atlassian shows it everywhere); map it to a "
                                 "Graph user property, or leave it out for the default displayName")
            return value
        if not SOURCE.match(value):
            raise ValueError(
                f"{value!r} is not an Entra source: give a Graph user property as $select names it (companyName), "
                "onPremisesExtensionAttributes.extensionAttribute1..15, or a directory extension "
                "extension_<appId>_<name>; \"\" turns the attribute off"
            )
        if value in SINGLE_USER_ONLY:
            raise ValueError(f"Microsoft Graph returns {value} only when reading one user, not in the user lists "
                             "and delta rounds guardsync reads: map another property")
        return value

    def mapping(self) -> dict[str, str]:
        """DesiredUser field -> Entra source, for the attributes that are on."""
        return {a.field: getattr(self, a.field) for a in ATTRIBUTES if getattr(self, a.field)}

    def sources(self) -> set[str]:
        return set(self.mapping().values())

    def key_of(self, field: str) -> str:
        return next(a.key for a in ATTRIBUTES if a.field == field)


class Settings(_Section):
    entra: EntraSettings
    atlassian: AtlassianSettings
    sync: SyncSettings = SyncSettings()
    attributes: AttributeSettings = AttributeSettings()
    access: AccessSettings | None = None  # optional: without it no product access changes


def load_settings(path: str | Path) -> Settings:
    """Read and validate a TOML file; every problem is one ConfigError line with the fix."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} not found: pass --config with the path of your TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}): fix the syntax at that line") from None
    return parse_settings(raw, source=str(path))


def parse_settings(raw: dict, source: str = "configuration") -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """First problem as `[section] key: what is wrong and what to do`; no input values echoed."""
    error = exc.errors()[0]
    location = [str(part) for part in error["loc"]]
    where = f"[{location[0]}] {'.'.join(location[1:])}".strip() if location else "top level"
    kind = error["type"]
    if kind == "extra_forbidden":
        known = _known_keys(location[:-1])
        close = difflib.get_close_matches(location[-1], known, n=1, cutoff=0.6) if location else []
        hint = f"did you mean {close[0]!r}? Otherwise " if close else ""
        return f"{where}: unknown key; {hint}remove it or check its spelling against the documented keys ({', '.join(known)})"
    if kind == "missing":
        return f"{where}: required key is missing; add it"
    if kind == "literal_error":
        return f"{where}: {error['msg'].lower()}"
    message = error["msg"].removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return f"{where}: {message}{more}"


def _known_keys(section: list[str]) -> list[str]:
    """The keys the model accepts at this location ([] at an unknown one)."""
    model: type[BaseModel] = Settings
    for part in section:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if annotation is not None and not isinstance(annotation, type):  # Optional[Model]: the model
            annotation = next((a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [field.alias or name for name, field in model.model_fields.items()]


SecretLookup = Callable[[str], str]


def resolve_secret(reference: str, key: str, prefect_lookup: SecretLookup | None = None) -> str:
    """Turn env:NAME / prefect:BLOCK into the secret value; errors name the key, never the value."""
    scheme, _, name = reference.partition(":")
    if scheme == "env":
        value = os.environ.get(name)
        if not value:
            raise ConfigError(f"{key}: environment variable {name} is not set; export it before running guardsync")
        return value
    if scheme == "prefect":
        if prefect_lookup is None:
            raise ConfigError(f"{key}: prefect:{name} needs a Prefect server; run through the flow or use env:VARIABLE")
        try:
            return prefect_lookup(name)
        except Exception as exc:  # the block store's own error types vary
            raise ConfigError(
                f"{key}: could not load Prefect Secret block {name!r} ({type(exc).__name__}); create it with "
                f"`prefect block create secret` or fix the name"
            ) from None
    raise ConfigError(f"{key}: must be env:VARIABLE or prefect:SECRET_BLOCK")


def preflight(settings: Settings) -> None:
    """Problems found without any network, before a flow run starts: missing variables and files."""
    references = [("entra.client_secret", settings.entra.client_secret), ("atlassian.api_key", settings.atlassian.api_key)]
    if settings.access is not None:
        references.append(("access.api_key", settings.access.api_key))
    for key, reference in references:
        if reference and reference.startswith("env:"):
            resolve_secret(reference, key)
    certificate = settings.entra.certificate_path
    if certificate and not Path(certificate).is_file():
        raise ConfigError(f"[entra] certificate_path: {certificate} not found; give the path of the PEM file holding the key and certificate")
