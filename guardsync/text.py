"""Names and values from Entra or Atlassian, shown as text: never as markup, never as a forged log line.

A group may be named `[Sign in](https://evil.example) <img src=x>`, a title `# Pay here`, and every user
name is an address that a GFM renderer (the Prefect UI's markdown artifacts, and its table artifacts'
cells) would turn into a mailto link. In markdown every punctuation character becomes a numeric character
reference: CommonMark decodes one into that very character as text, never as emphasis, link, image, HTML
tag or table column; and an autolink needs its `:`, `@` or `.` literally in the source, which it no longer
finds. Letters, digits, spaces and commas stay as they are, so the markdown stays readable.
"""

from __future__ import annotations

import re

_MARKUP = re.compile(r"[^\w ,]|_")  # punctuation (the underscore too), symbols, whitespace but the plain space
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def md(value: object) -> str:
    """`value` as markdown (or HTML) that renders as exactly its characters, on one line."""
    text = " ".join(str(value).split()) if value is not None else ""
    return _MARKUP.sub(lambda match: f"&#{ord(match[0])};", text)


def plain(value: object) -> str:
    """`value` on one log line: control characters (a line break that would start a forged line, a terminal
    escape) shown as their escapes."""
    return _CONTROL.sub(lambda match: match[0].encode("unicode_escape").decode("ascii"), str(value))


def md_rows(rows: list[dict]) -> list[dict]:
    """A table artifact's rows with every cell as text (the Prefect UI renders cells as markdown)."""
    return [{key: value if isinstance(value, (int, float)) else md(value) for key, value in row.items()}
            for row in rows]
