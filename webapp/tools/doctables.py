"""The docs' tables, derived from the declarations: the settings (``webapp.settings``), the request fields
(``webapp.api.fields``, /generate's and OpenAI's), the error codes (``webapp.errors``) and a worker's state
transitions (``webapp.board.lifecycle``). A test compares
each with the docs; ``python -m webapp.tools.doctables`` writes them into the docs after a declaration
changes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from webapp import errors
from webapp.api.fields import FIELDS, RequestField, bounds_text, number_text
from webapp.model.profile import Limits
from webapp.settings import VARIABLES, Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def settings_table() -> str:
    """docs/configuration.md's table of every setting."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    rows += [f"| `{v.name}` | `{v.default or '(empty)'}` | {v.meaning} |" for v in VARIABLES]
    return "\n".join(rows)


def code_table() -> str:
    """docs/api.md's table of error codes."""
    rows = ["| code | status | meaning |", "|---|---|---|"]
    rows += [f"| `{code}` | {code.status or '4xx'} | {code.meaning} |" for code in errors.CODES]
    return "\n".join(rows)


def transition_table() -> str:
    """docs/architecture.md §2's table of a worker's state transitions."""
    from webapp.board.lifecycle import TRANSITIONS

    rows = ["| from | to | made by | when |", "|---|---|---|---|"]
    rows += [f"| {' '.join(s.name for s in t.sources)} | {t.to.name} | {t.by} | {t.when} |" for t in TRANSITIONS]
    return "\n".join(rows)


def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else number_text(value)  # type: ignore[arg-type]


def request_table(limits: Limits, fields: tuple[RequestField, ...] = FIELDS) -> str:
    """The README's table of request ``fields`` (/generate's by default), with the limits of ``limits``."""
    rows = ["| Field | Type | Default | Limits | Meaning |", "|---|---|---|---|---|"]
    for field in fields:
        high = field.bounds(limits)[1]
        default = field.default_for(limits)
        if field.kind == "text":
            bounds = f"at most {number_text(high)} characters" + (", required" if field.required else "")
        elif field.kind == "choice":
            bounds = "one of " + ", ".join(f"`{choice}`" for choice in field.choices)
        elif field.kind == "boolean":
            bounds = "`true` or `false`"
        elif field.kind == "image":
            bounds = f"base64 of at most MAX_UPLOAD_BYTES={limits.max_upload_bytes} bytes"
        elif field.kind == "adapters":
            bounds = f"at most MAX_LORAS={limits.max_loras}; each scale {bounds_text(field, limits)}"
        else:
            multiple = field.multiple(limits)
            bounds = bounds_text(field, limits) + (f", a multiple of {multiple}" if multiple else "")
        shown = "(required)" if field.required else "-" if default is None else f"`{_default_text(default)}`"
        rows.append(f"| `{field.name}` | {field.kind} | {shown} | {bounds} | {field.meaning} |")
    return "\n".join(rows)


def tables() -> dict[str, list[str]]:
    """Each doc's tables, in the order they appear in it, under the default settings."""
    from webapp.api.openai.protocol import EDIT_FIELDS, IMAGE_FIELDS

    limits = Limits.before_load(Settings.from_env({}))
    generate, image, edit = (request_table(limits, fields) for fields in (FIELDS, IMAGE_FIELDS, EDIT_FIELDS))
    return {
        "configuration.md": [settings_table()],
        "api.md": [generate, code_table(), image, edit],
        "architecture.md": [transition_table()],
    }


def rewrite(text: str, new: list[str]) -> str:
    """``text`` with its Markdown tables replaced by ``new``'s, in order: each replaces the next table after
    the last one replaced whose header line is its own."""
    at = 0
    for table in new:
        header = re.escape(table.split("\n", 1)[0])
        found = re.compile(header + r"\n(?:\|.*(?:\n|$))*", re.MULTILINE).search(text, at)
        if found is None:
            raise ValueError(f"no table headed {table.splitlines()[0]!r} after character {at}")
        text = text[: found.start()] + table + "\n" + text[found.end() :]
        at = found.start() + len(table)
    return text


def main() -> int:
    for name, new in tables().items():
        path = DOCS / name
        path.write_text(rewrite(path.read_text(), new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
