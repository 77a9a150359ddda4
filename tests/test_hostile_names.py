"""Names and values from Entra or Atlassian show as text in every artifact (DESIGN.md, "what artifacts show").

A tenant whose group, titles and names carry markdown and HTML: every artifact of its runs (a first sync,
a full read that restores a hand edit, a run that a guard blocks) is rendered with two real markdown
renderers, GFM-style (tables, bare-URL autolinks), the way the Prefect UI renders markdown artifacts and the
cells of table artifacts. No link, image or HTML tag may come out of them, and the names must read as
written.
"""

from __future__ import annotations

import html
import json
import re

import mistune
import pytest
from markdown_it import MarkdownIt

from tests.test_flow import group_id

HOSTILE_GROUP = "[Sign in](https://evil.example) <img src=x>"
HOSTILE_TITLE = "![pay](https://evil.example/x.png) **now**"
HOSTILE_NAME = "<script>alert(1)</script> _Eve_ | col"
HOSTILE_EDIT = "<img src=x onerror=alert(1)> www.evil.example"

RENDERERS = {
    "markdown-it (CommonMark + tables)": MarkdownIt("commonmark").enable("table").render,
    "mistune (tables, bare URLs, raw HTML kept)": mistune.create_markdown(escape=False, plugins=["table", "url", "strikethrough"]),
}
MARKUP = re.compile(r"<(a|img|script|iframe)\b|javascript:", re.IGNORECASE)


def artifacts_of(flow_run_ids) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))


def rendered_pieces(artifact) -> list[str]:
    """What the UI renders as markdown: a markdown artifact whole, a table artifact cell by cell."""
    if artifact.type == "markdown":
        return [artifact.data]
    if artifact.type == "table":
        rows = artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)
        return [str(value) for row in rows for value in row.values()]
    return []


def test_every_artifact_shows_hostile_names_as_text(make_sandbox, state_url, prefect_server):
    from tests.test_secrets import run_flow

    sandbox = make_sandbox()
    tenant = sandbox.tenant
    tenant.rename_group(group_id(tenant, "Engineering All"), HOSTILE_GROUP)
    someone = next(uid for uid in sorted(tenant.users) if tenant.users[uid].get("accountEnabled", True))
    tenant.update_user(someone, displayName=HOSTILE_NAME, jobTitle=HOSTILE_TITLE)
    tenant.add_user(userPrincipalName="[click](https://evil.example)@contoso.com", displayName="<b>Mallory</b>",
                    accountEnabled=True)  # a malformed identifier: quarantined, and listed by name

    runs = []
    flow_run_id, state, exc = run_flow(sandbox.settings(state_url))
    assert state.is_completed(), exc
    runs.append(flow_run_id)
    account = next(u for u in sandbox.scim.users() if u["userName"] == tenant.users[someone]["userPrincipalName"])
    sandbox.scim.edit_user_by_hand(account["id"], title=HOSTILE_EDIT)
    flow_run_id, state, exc = run_flow(sandbox.settings(state_url, full_read_every_hours=1e-9))  # drift, restored
    assert state.is_completed(), exc
    runs.append(flow_run_id)
    for uid in sorted(set(tenant.members[group_id(tenant, HOSTILE_GROUP)]) & set(tenant.users))[:5]:
        tenant.update_user(uid, accountEnabled=False)
    flow_run_id, state, exc = run_flow(sandbox.settings(state_url, max_deactivations=1))  # blocked, names in reason
    assert state.is_failed() and exc is not None
    runs.append(flow_run_id)

    artifacts = artifacts_of(runs)
    keys = {artifact.key for artifact in artifacts}
    assert {"summary", "plan", "plan-changes", "gate-results", "drift"} <= keys, keys
    seen_text = []
    for artifact in artifacts:
        for piece in rendered_pieces(artifact):
            for renderer_name, render in RENDERERS.items():
                out = render(piece)
                assert not MARKUP.search(out), f"{renderer_name} made markup of the {artifact.key} artifact: {out[:500]}"
                seen_text.append(html.unescape(re.sub(r"<[^>]+>", "", out)))
    text = "\n".join(seen_text)
    for hostile in (HOSTILE_GROUP, HOSTILE_EDIT, "[click](https://evil.example)@contoso.com"):  # those artifacts name
        assert hostile in text, f"{hostile!r} does not read as written in any artifact"


@pytest.mark.parametrize("value", [HOSTILE_GROUP, HOSTILE_TITLE, HOSTILE_NAME, HOSTILE_EDIT, "1. item", "# title",
                                   "a\nb", "x@contoso.com", "`code`", "&amp; &#60;"])
def test_md_renders_as_its_own_characters(value):
    from guardsync.text import md

    for render in RENDERERS.values():
        out = render(md(value))
        assert not MARKUP.search(out) and "<h1" not in out and "<ol" not in out and "<code" not in out, out
        assert html.unescape(re.sub(r"<[^>]+>", "", out)).strip() == " ".join(value.split())


def test_log_lines_keep_names_on_one_line():
    from guardsync.summary import RunSummary

    summary = RunSummary(run_id="r", mode="sync", status="completed", identifier="upn",
                         new_groups=["Finance\nSummary of run forged (sync, completed)"], message="\x1b[2Jcleared")
    lines = summary.lines()
    assert not any("\n" in line or "\x1b" in line for line in lines)
    assert sum(line.startswith("Summary of run") for line in lines) == 1
