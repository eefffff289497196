"""One self-contained HTML page for a report: tables, text and the PNG plots, in one file.

The replay (:mod:`recsys.replay.report`, ``results.md``) and the A/B analysis
(:mod:`recsys.abtest.report`, ``report.md``) describe their report as a list of blocks
built from the same rows as their Markdown; :func:`write_html` turns them into
``report.html``: the plots embedded as base64 ``data:`` URIs, the style inline, no script
and no external reference (a Content-Security-Policy forbids both), so the page opens
from a mail attachment or an artefact store as it is.

Blocks: :class:`Heading`, :class:`Text` (``**bold**`` and ```code``` are kept),
:class:`Bullets` (a line starting with two spaces is a sub-bullet), :class:`Table`
(rows are dicts; the first row's keys are the columns) and :class:`Image` (a PNG file).
:func:`render_markdown` writes the same blocks as Markdown (the A/B report's ``report.md``).

Example::

    write_html(out / "report.html", "Replay: ml-100k", [
        Text("ml-100k replay period ..."),
        Heading("Quality"), Table(quality_rows(summary)),
        Image(out / "ndcg_vs_budget.png", "ndcg_vs_budget"),
    ])
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.errors import ValidationError
from recsys.reporting import format_cell

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       margin: 2rem auto; max-width: 72rem; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .85rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .5rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
thead th { background: #f6f8fa; }
tbody tr:nth-child(even) { background: #fbfcfd; }
code { background: #f6f8fa; padding: 0 .2rem; border-radius: 3px; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { font-size: .8rem; color: #59636e; }
.scroll { overflow-x: auto; }
"""


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Text:
    """A paragraph; ``**bold**`` and ```code``` are rendered, everything else escaped."""

    text: str


@dataclass(frozen=True)
class Bullets:
    lines: Sequence[str]


@dataclass(frozen=True)
class Table:
    """Rows (dicts, the first one's keys are the columns); ``fmt`` formats a cell."""

    rows: Sequence[Mapping[str, Any]]
    fmt: Callable[[Any], str] = field(default=format_cell)


@dataclass(frozen=True)
class Image:
    """A PNG file, embedded; ``caption`` is its alt text and caption."""

    path: Path
    caption: str = ""


Block = Heading | Text | Bullets | Table | Image

_INLINE = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`")
_NUMBER = re.compile(r"^[+-]?[\d,]*\.?\d+(e[+-]?\d+)?\s?%?$", re.IGNORECASE)


def inline(text: str) -> str:
    """``text`` escaped, with ``**bold**`` and ```code``` as <strong> / <code>."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        if m.group(1) is not None:
            out.append(f"<strong>{html.escape(m.group(1))}</strong>")
        else:
            out.append(f"<code>{html.escape(m.group(2))}</code>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def data_uri(path: str | Path) -> str:
    """``data:image/png;base64,...`` of a PNG file.

    Raises:
        ValidationError: the file is missing or not a PNG.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError(f"cannot read the plot {path}: {exc.strerror}") from None
    if not data.startswith(PNG_SIGNATURE):
        raise ValidationError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _table(t: Table) -> str:
    if not t.rows:
        return "<p>(none)</p>"
    cols = list(t.rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for row in t.rows:
        cells = []
        for c in cols:
            text = t.fmt(row.get(c, ""))
            cls = ' class="num"' if _NUMBER.match(text.strip()) else ""
            cells.append(f"<td{cls}>{inline(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _bullets(lines: Sequence[str]) -> str:
    out, nested = ["<ul>"], False
    for line in lines:
        sub = line.startswith("  ")
        if sub and not nested:
            out.append("<ul>")
        elif not sub and nested:
            out.append("</ul>")
        nested = sub
        out.append(f"<li>{inline(line.strip())}</li>")
    out.append("</ul></ul>" if nested else "</ul>")
    return "".join(out)


def render_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h2>{inline(block.text)}</h2>"
    if isinstance(block, Text):
        return f"<p>{inline(block.text)}</p>"
    if isinstance(block, Bullets):
        return _bullets(block.lines)
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Image):
        caption = html.escape(block.caption or Path(block.path).stem)
        return (
            f'<figure><img src="{data_uri(block.path)}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    raise TypeError(f"not a report block: {block!r}")


def render_html(title: str, blocks: Sequence[Block]) -> str:
    """The whole page (UTF-8 text): ``title`` as <title> and <h1>, then the blocks."""
    body = "\n".join(render_block(b) for b in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{inline(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    """The same blocks as Markdown (plots linked by file name, beside the file)."""
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += [f"## {b.text}", ""]
        elif isinstance(b, Text):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"  - {x.strip()}" if x.startswith("  ") else f"- {x}" for x in b.lines]
            out.append("")
        elif isinstance(b, Table):
            if not b.rows:
                out += ["(none)", ""]
                continue
            cols = list(b.rows[0])
            out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            out += ["| " + " | ".join(b.fmt(r.get(c, "")) for c in cols) + " |" for r in b.rows]
            out.append("")
        elif isinstance(b, Image):
            name = Path(b.path).name
            out += [f"![{b.caption or Path(name).stem}]({name})", ""]
        else:
            raise TypeError(f"not a report block: {b!r}")
    return "\n".join(out).rstrip("\n") + "\n"


def write_html(path: str | Path, title: str, blocks: Sequence[Block]) -> Path:
    """Write :func:`render_html` to ``path``; returns it."""
    dest = Path(path)
    dest.write_text(render_html(title, blocks), encoding="utf-8")
    return dest


__all__ = [
    "Block",
    "Bullets",
    "Heading",
    "Image",
    "Table",
    "Text",
    "data_uri",
    "inline",
    "render_html",
    "render_markdown",
    "write_html",
]
