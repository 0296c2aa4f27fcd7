"""A tiny document model rendered to both Markdown and standalone HTML.

The report page is built from a few block types (heading, paragraph, table, image, link list,
preformatted text) instead of converting Markdown to HTML, so both renderings are exact and
no Markdown library is needed.
"""
from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Sequence

from brainenc._utils.io import write_text

__all__ = ["Document"]

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1em}th,td{border:1px solid #ccc;
padding:3px 7px}td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f2f2f2}img{max-width:100%;
border:1px solid #eee}pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:12px}figure{margin:1em 0}
figcaption{font-size:13px;color:#555}"""


@dataclasses.dataclass
class _Block:
    kind: str
    data: tuple


class Document:
    """An ordered list of blocks with Markdown and HTML renderers.

    Parameters
    ----------
    title : str
        Page title (level-1 heading).

    Examples
    --------
    >>> doc = Document("Run report")
    >>> doc.heading("Scores"); doc.table(["ROI", "r"], [["V1", "0.50"]])
    >>> "| V1 | 0.50 |" in doc.to_markdown()
    True
    """

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[_Block] = []

    def heading(self, text: str, level: int = 2) -> None:
        """Add a heading (level 2..4)."""
        self.blocks.append(_Block("heading", (text, max(2, min(level, 4)))))

    def paragraph(self, text: str) -> None:
        """Add a paragraph of plain text."""
        self.blocks.append(_Block("paragraph", (text,)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None) -> None:
        """Add a table of already formatted cells (``numeric`` right-aligns columns)."""
        num = tuple(numeric) if numeric is not None else tuple(False for _ in headers)
        self.blocks.append(_Block("table", (tuple(headers), tuple(tuple(map(str, r)) for r in rows), num)))

    def image(self, href: str, caption: str) -> None:
        """Add an image (``href`` relative to the page)."""
        self.blocks.append(_Block("image", (href, caption)))

    def links(self, items: Sequence[tuple[str, str]]) -> None:
        """Add a bullet list of ``(text, href)`` links."""
        self.blocks.append(_Block("links", tuple(items)))

    def bullets(self, items: Sequence[str]) -> None:
        """Add a bullet list of plain text items."""
        self.blocks.append(_Block("bullets", tuple(items)))

    def pre(self, text: str) -> None:
        """Add preformatted text."""
        self.blocks.append(_Block("pre", (text,)))

    # ------------------------------------------------------------------ renderers
    def to_markdown(self) -> str:
        """The document as GitHub-flavoured Markdown."""
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b.kind == "heading":
                text, level = b.data
                out += ["#" * level + " " + text, ""]
            elif b.kind == "paragraph":
                out += [b.data[0], ""]
            elif b.kind == "table":
                headers, rows, num = b.data
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "|".join("---:" if n else "---" for n in num) + "|")
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
                out.append("")
            elif b.kind == "image":
                href, caption = b.data
                out += [f"![{caption}]({href})", "", f"*{caption}*", ""]
            elif b.kind == "links":
                out += [f"- [{text}]({href})" for text, href in b.data] + [""]
            elif b.kind == "bullets":
                out += [f"- {text}" for text in b.data] + [""]
            elif b.kind == "pre":
                out += ["```", b.data[0].rstrip("\n"), "```", ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self) -> str:
        """The document as a standalone HTML page (inline CSS, relative links)."""
        e = html.escape
        out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{e(self.title)}</title>",
               f"<style>{_CSS}</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        for b in self.blocks:
            if b.kind == "heading":
                text, level = b.data
                out.append(f"<h{level}>{e(text)}</h{level}>")
            elif b.kind == "paragraph":
                out.append(f"<p>{e(b.data[0])}</p>")
            elif b.kind == "table":
                headers, rows, num = b.data
                out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>")
                for r in rows:
                    out.append("<tr>" + "".join(f"<td class='num'>{e(c)}</td>" if n else f"<td>{e(c)}</td>"
                                                for c, n in zip(r, num)) + "</tr>")
                out.append("</tbody></table>")
            elif b.kind == "image":
                href, caption = b.data
                out.append(f"<figure><a href='{e(href)}'><img src='{e(href)}' alt='{e(caption)}'></a>"
                           f"<figcaption>{e(caption)}</figcaption></figure>")
            elif b.kind == "links":
                out.append("<ul>" + "".join(f"<li><a href='{e(h)}'>{e(t)}</a></li>" for t, h in b.data) + "</ul>")
            elif b.kind == "bullets":
                out.append("<ul>" + "".join(f"<li>{e(t)}</li>" for t in b.data) + "</ul>")
            elif b.kind == "pre":
                out.append(f"<pre>{e(b.data[0])}</pre>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    def write(self, md_path: str | Path, html_path: str | Path | None = None) -> list[Path]:
        """Write the Markdown (and HTML) renderings atomically; return the paths."""
        paths = [write_text(md_path, self.to_markdown())]
        if html_path is not None:
            paths.append(write_text(html_path, self.to_html()))
        return paths
