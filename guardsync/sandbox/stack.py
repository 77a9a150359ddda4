"""The whole sandbox at once: a CA, a Graph emulator over a tenant, an Atlassian SCIM server.

Used by `guardsync demo`, the tests and the benchmark, so all three exercise the
same real HTTPS paths. Secrets of the sandbox reach guardsync the production way:
through environment variables named in the configuration (env:NAME).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

from guardsync.config import Settings, parse_settings
from guardsync.sandbox.graph_emulator import GraphEmulator
from guardsync.sandbox.http import SandboxCA
from guardsync.sandbox.org_api import OrgApiServer
from guardsync.sandbox.scim_server import AtlassianScimServer
from guardsync.sandbox.tenant import Tenant

SECRET_ENV = "GUARDSYNC_SANDBOX_CLIENT_SECRET"
API_KEY_ENV = "GUARDSYNC_SANDBOX_SCIM_API_KEY"
ORG_KEY_ENV = "GUARDSYNC_SANDBOX_ORG_API_KEY"


@dataclass
class Sandbox:
    tenant: Tenant
    atlassian_domains: set[str]
    latency: float = 0.0
    api_key: str = field(default_factory=lambda: "ATSCIM-" + secrets.token_urlsafe(24))
    org_api_key: str = field(default_factory=lambda: "ATORG-" + secrets.token_urlsafe(24))
    ca: SandboxCA = field(init=False)
    graph: GraphEmulator = field(init=False)
    scim: AtlassianScimServer = field(init=False)
    org: OrgApiServer = field(init=False)  # the Organizations REST API (product access), over the SCIM server's groups

    def start(self) -> "Sandbox":
        self.ca = SandboxCA()
        self.graph = GraphEmulator(self.tenant, self.ca, latency=self.latency).start()
        self.scim = AtlassianScimServer(self.ca, self.api_key, self.atlassian_domains, latency=self.latency).start()
        self.org = OrgApiServer(self.ca, self.org_api_key, self.scim, latency=self.latency).start()
        return self

    def stop(self) -> None:
        self.graph.stop()
        self.scim.stop()
        self.org.stop()

    def environment(self) -> dict[str, str]:
        """What a guardsync process needs to reach the sandbox: the CA to trust and the two secrets."""
        return {
            "REQUESTS_CA_BUNDLE": str(self.ca.ca_file),
            SECRET_ENV: self.tenant.client_secret,
            API_KEY_ENV: self.api_key,
            ORG_KEY_ENV: self.org_api_key,
        }

    def export(self) -> None:
        os.environ.update(self.environment())

    def config(self, state: str, access: dict[str, list[str]] | None = None, **sync) -> dict:
        """A configuration (as the TOML file would hold it) pointing at this sandbox; `access`, when given,
        is [access.groups] (with the organization of the sandbox's Organizations API)."""
        config = {
            "entra": {
                "tenant_id": self.tenant.tenant_id,
                "client_id": self.tenant.client_id,
                "client_secret": f"env:{SECRET_ENV}",
                "authority_host": self.graph.authority_host,
                "graph_url": self.graph.graph_url,
            },
            "atlassian": {"scim_url": self.scim.scim_url, "api_key": f"env:{API_KEY_ENV}"},
            "sync": {"state": state, **sync},
        }
        if access is not None:
            config["access"] = {"org_id": self.org.org_id, "api_key": f"env:{ORG_KEY_ENV}",
                                "admin_url": self.org.base_url, "groups": access}
        return config

    def settings(self, state: str, access: dict[str, list[str]] | None = None, **sync) -> Settings:
        return parse_settings(self.config(state, access, **sync), source="sandbox")


def to_toml(config: dict) -> str:
    """Render the small, flat configuration dict as TOML (the stdlib reads TOML but cannot write it)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        tables = {key: value for key, value in values.items() if isinstance(value, dict)}
        for key, value in values.items():
            if key not in tables:
                bare = key.replace("_", "").replace("-", "").isalnum()
                lines.append(f"{key if bare else _toml_value(key)} = {_toml_value(value)}")  # "phoneNumbers.work" quoted
        lines.append("")
        for key, table in tables.items():  # [access.groups]: quoted keys (group names hold spaces)
            lines.append(f"[{section}.{key}]")
            lines += [f"{_toml_value(name)} = {_toml_value(value)}" for name, value in table.items()]
            lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
