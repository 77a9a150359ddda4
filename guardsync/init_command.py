"""`guardsync init`: write a commented configuration file, asking on a terminal for what is missing.

Plain functions returning typed results; the command line only prints them. The secrets are
written as references (env:VARIABLE or prefect:SECRET_BLOCK), never as values, and the file
is validated as `load_settings` will read it before it is written.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from guardsync.config import SECRET_REF, Settings, SyncSettings, parse_settings
from guardsync.errors import ConfigError
from guardsync.graph import permission_lines


REQUIRED_ANSWERS = {
    "tenant_id": "--tenant-id",
    "client_id": "--client-id",
    "credential": "--client-secret-ref or --certificate-path",
    "scim_url": "--scim-url",
    "api_key_ref": "--api-key-ref",
}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
Ask = Callable[[str, str], str]  # (question, default) -> answer ("" takes the default)


@dataclass
class InitAnswers:
    """What `guardsync init` writes; None means "not given" (asked on a terminal, else defaulted or refused)."""

    tenant_id: str | None = None
    client_id: str | None = None
    client_secret_ref: str | None = None
    certificate_path: str | None = None
    scim_url: str | None = None
    api_key_ref: str | None = None
    groups: list[str] | None = None
    domains: list[str] | None = None
    identifier: str | None = None
    state: str | None = None
    authority_host: str | None = None
    graph_url: str | None = None


def check_secret_reference(value: str, what: str) -> str:
    """A reference (env:NAME, prefect:BLOCK) or a ConfigError; the value is never echoed (it may be a pasted secret)."""
    value = value.strip()
    scheme, _, name = value.partition(":")
    if not SECRET_REF.match(value) or (scheme == "env" and not ENV_NAME.match(name)):
        raise ConfigError(
            f"{what} must be a reference, env:VARIABLE or prefect:SECRET_BLOCK, not the secret itself (it was not "
            "written anywhere): put the secret in an environment variable or a Prefect Secret block and give its name"
        )
    return value


def complete_answers(answers: InitAnswers, ask: Ask | None = None, default_state: str | None = None) -> InitAnswers:
    """Fill what is missing: by asking when `ask` is given (a terminal), else refuse missing required values."""
    if answers.client_secret_ref is not None and answers.certificate_path is not None:
        raise ConfigError("give either --client-secret-ref or --certificate-path, not both")
    if answers.client_secret_ref is not None:
        answers.client_secret_ref = check_secret_reference(answers.client_secret_ref, "--client-secret-ref")
    if answers.api_key_ref is not None:
        answers.api_key_ref = check_secret_reference(answers.api_key_ref, "--api-key-ref")
    if ask is None:
        missing = [flag for key, flag in REQUIRED_ANSWERS.items() if _missing(answers, key)]
        if missing:
            raise ConfigError(f"guardsync init: missing {', '.join(missing)}; pass them, or run init in a terminal "
                              "to be asked")
    else:
        _ask_missing(answers, ask, default_state)
    answers.groups = answers.groups or []
    answers.domains = answers.domains or []
    answers.identifier = answers.identifier or "upn"
    answers.state = answers.state or default_state or SyncSettings.model_fields["state"].default
    return answers


def _missing(answers: InitAnswers, key: str) -> bool:
    if key == "credential":
        return answers.client_secret_ref is None and answers.certificate_path is None
    return not getattr(answers, key)


def _ask_missing(answers: InitAnswers, ask: Ask, default_state: str | None) -> None:
    def required(question: str, default: str = "") -> str:
        for _ in range(5):
            answer = ask(question, default).strip() or default
            if answer:
                return answer
        raise ConfigError(f"guardsync init: no answer for {question!r}")

    def reference(question: str, default: str, what: str) -> str:
        for _ in range(5):
            try:
                return check_secret_reference(ask(question, default).strip() or default, what)
            except ConfigError as exc:
                print(f"  {exc}")
        raise ConfigError(f"guardsync init: {what} must be a reference, env:VARIABLE or prefect:SECRET_BLOCK")

    if not answers.tenant_id:
        answers.tenant_id = required("Entra tenant id (GUID or contoso.onmicrosoft.com)")
    if not answers.client_id:
        answers.client_id = required("Application (client) id of the app registration")
    if answers.client_secret_ref is None and answers.certificate_path is None:
        kind = ""
        while kind not in ("secret", "certificate"):
            kind = required("Credential: secret or certificate", "secret").casefold()
        if kind == "secret":
            answers.client_secret_ref = reference(
                "Where the client secret is (env:VARIABLE or prefect:SECRET_BLOCK; not the secret)",
                "env:ENTRA_CLIENT_SECRET", "the client secret reference")
        else:
            answers.certificate_path = required("Path of the PEM file with the private key and certificate", "app.pem")
    if not answers.scim_url:
        answers.scim_url = required("Atlassian SCIM directory URL", "https://api.atlassian.com/scim/directory/DIRECTORY_ID")
    if not answers.api_key_ref:
        answers.api_key_ref = reference("Where the SCIM API key is (env:VARIABLE or prefect:SECRET_BLOCK; not the key)",
                                        "env:ATLASSIAN_SCIM_API_KEY", "the API key reference")
    if answers.groups is None:
        answer = ask("Pilot groups, comma-separated display names (empty: all users and all groups)", "")
        answers.groups = [g.strip() for g in answer.split(",") if g.strip()]
    if answers.domains is None:
        answer = ask("Domains to sync, comma-separated (empty: every verified domain but *.onmicrosoft.com)", "")
        answers.domains = [d.strip() for d in answer.split(",") if d.strip()]
    while answers.identifier not in ("upn", "email"):
        answers.identifier = (ask("Identifier: upn (userPrincipalName) or email (mail)", "upn").strip() or "upn").casefold()
    if not answers.state:
        answers.state = required("State store (SQLAlchemy URL)", default_state or SyncSettings.model_fields["state"].default)


def render_config(answers: InitAnswers) -> str:
    """The commented TOML file; every key of the contract, optional ones commented out with their defaults."""
    fields = SyncSettings.model_fields
    authority = answers.authority_host or "https://login.microsoftonline.com"
    graph = answers.graph_url or "https://graph.microsoft.com"
    if answers.client_secret_ref is not None:
        credential = [
            "# Where the client secret is: env:VARIABLE (an environment variable) or prefect:BLOCK (a Prefect Secret",
            "# block). Never the secret itself.",
            f"client_secret = {_toml(answers.client_secret_ref)}",
            "# Or a certificate instead (one PEM file holding the private key and the certificate):",
            '# certificate_path = "app.pem"',
        ]
    else:
        credential = [
            "# One PEM file holding the private key and the certificate uploaded to the app registration.",
            f"certificate_path = {_toml(answers.certificate_path)}",
            "# Or a client secret instead, by reference (env:VARIABLE or prefect:SECRET_BLOCK):",
            '# client_secret = "env:ENTRA_CLIENT_SECRET"',
        ]
    lines = [
        f"# guardsync configuration, written by `guardsync init` on {datetime.now(timezone.utc):%Y-%m-%d}.",
        "# Check every prerequisite before the first sync:  guardsync check --config THIS_FILE",
        "# Secrets are references (env:VARIABLE or prefect:SECRET_BLOCK), resolved in memory when guardsync runs.",
        "",
        "[entra]",
        "# The Entra ID tenant: its GUID or its *.onmicrosoft.com domain.",
        f"tenant_id = {_toml(answers.tenant_id)}",
        "# Application (client) id of the app registration guardsync signs in as (application permissions,",
        "# admin consent: see `guardsync init` output or the README).",
        f"client_id = {_toml(answers.client_id)}",
        *credential,
        "# Sovereign clouds sign in and read Graph elsewhere (e.g. https://login.microsoftonline.us and",
        "# https://graph.microsoft.us).",
        f"authority_host = {_toml(authority)}",
        f"graph_url = {_toml(graph)}",
        "",
        "[atlassian]",
        "# Atlassian Administration > Security > Identity providers > your directory: the SCIM base URL and API key.",
        f"scim_url = {_toml(answers.scim_url)}",
        f"api_key = {_toml(answers.api_key_ref)}",
        "",
        "[sync]",
        "# Groups to sync: display names (any letter case) or object ids. Start with one pilot group;",
        "# [] syncs all users and all groups. Nested groups are flattened into each synced group.",
        f"groups = {_toml(answers.groups)}",
        "# Allowed domains: [] = every verified domain of the tenant but its initial *.onmicrosoft.com one.",
        f"domains = {_toml(answers.domains)}",
        '# "upn" (userPrincipalName) or "email" (mail). SSO in Atlassian must use the same identifier.',
        f"identifier = {_toml(answers.identifier)}",
        "# What guardsync applied, and the audit of every write (SQLAlchemy URL; PostgreSQL for shared deployments).",
        f"state = {_toml(answers.state)}",
        "# Optional, shown with their defaults:",
        f"# max_group_size = {fields['max_group_size'].default}      # a synced group with more members blocks the run",
        f"# max_deactivations = {_toml(fields['max_deactivations'].default)}   # a count, or a percentage of the active users guardsync manages",
        f"# write_concurrency = {fields['write_concurrency'].default}       # parallel SCIM writes",
        f"# full_read_every_hours = {fields['full_read_every_hours'].default:g}  # delta sync: a full read at least this often",
        "",
        "# Optional: Atlassian attribute = Entra user property. Left out, guardsync sends what Atlassian's own",
        "# Entra sync sends (names, title, preferredLanguage, work and mobile phone, department); \"\" sends nothing.",
        "# [attributes]",
        '# organization = "companyName"',
        '# nickName = "onPremisesExtensionAttributes.extensionAttribute3"',
        '# "phoneNumbers.mobile" = ""',
        "",
        "# Optional: product access for synced groups, through the Organizations REST API (README, rollout step 8).",
        "# Without it guardsync changes no product access, and each run's summary lists the groups that need it.",
        "# [access]",
        '# org_id = "ORG_ID"                        # from the Atlassian Administration URL: admin.atlassian.com/o/ORG_ID',
        '# api_key = "env:ATLASSIAN_ORG_API_KEY"    # an organization API key (Settings > API keys), not the SCIM key',
        "# max_revocations = 0                      # grants one run may take away; more blocks the run",
        "# [access.groups]                          # synced group (display name or Entra object id) = its products",
        '# "Engineering All" = ["jira-software", "confluence"]',
        "",
    ]
    return "\n".join(lines)


def _toml(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    text = str(value)
    escaped = "".join(
        "\\\\" if ch == "\\" else '\\"' if ch == '"' else f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch
        for ch in text
    )
    return f'"{escaped}"'


@dataclass
class InitResult:
    path: Path
    settings: Settings
    next_steps: list[str]


def write_config(answers: InitAnswers, output: str | Path, force: bool = False) -> InitResult:
    """Validate the rendered file as `load_settings` will read it, then write it (never over a file without force)."""
    path = Path(output)
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists: pass --force to replace it, or --output another file")
    text = render_config(answers)
    try:
        settings = parse_settings(tomllib.loads(text), source=str(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"guardsync init produced invalid TOML ({exc}): report this") from None
    with path.open("w" if force else "x", encoding="utf-8") as handle:
        handle.write(text)
    return InitResult(path, settings, next_steps(settings, path))


def next_steps(settings: Settings, path: Path) -> list[str]:
    entra = settings.entra
    lines = [f"Wrote {path}.", ""]
    lines += permission_lines(entra.authority_host, entra.tenant_id, entra.client_id)
    exports = [ref.partition(":")[2] for ref in (entra.client_secret, settings.atlassian.api_key)
               if ref and ref.startswith("env:")]
    blocks = [ref.partition(":")[2] for ref in (entra.client_secret, settings.atlassian.api_key)
              if ref and ref.startswith("prefect:")]
    lines.append("")
    if exports:
        lines.append("Set the secrets where guardsync runs (never in the file): " + ", ".join(f"{name}=..." for name in exports))
    if blocks:
        lines.append("Create the Prefect Secret blocks: " + ", ".join(blocks))
    if not settings.sync.groups:
        lines.append("No pilot group: this configuration syncs ALL users and groups; for a pilot, set [sync] groups.")
    lines.append(f"Then: guardsync check --config {path}   and   guardsync plan --config {path}")
    return lines
