"""The report's blocks (Heading, Para, Table, Image) written as Markdown and as self-contained HTML."""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str  # `code` spans are rendered as code


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    wide_text: bool = False  # cells hold replies: wrap and keep newlines


@dataclass
class Image:
    filename: str
    png: bytes
    alt: str


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** -digits):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(ci: dict[str, Any]) -> str:
    if ci.get("mean") is None:
        return "-"
    if ci["lo"] == ci["hi"]:
        return fmt(ci["mean"])
    return f"{fmt(ci['mean'])} [{fmt(ci['lo'])}, {fmt(ci['hi'])}]"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def to_markdown(blocks: list[Any]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}\n")
        elif isinstance(b, Para):
            out.append(b.text + "\n")
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "|".join("---" for _ in b.header) + "|")
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows)
            out.append("")
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.filename})\n")
    return "\n".join(out)


def _html_inline(text: str) -> str:
    parts = re.split(r"(`[^`]+`)", text)
    return "".join(f"<code>{html.escape(p[1:-1])}</code>" if p.startswith("`") and p.endswith("`") and len(p) > 1
                   else html.escape(p) for p in parts)


HTML_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.wide { white-space: pre-wrap; max-width: 380px; font-size: 12px; }
code { background: #f4f4f4; padding: 0 3px; border-radius: 3px; font-size: 90%; }
img { max-width: 100%; border: 1px solid #eee; }
p.warning { background: #fff4e5; border-left: 4px solid #f0a030; padding: .4em .8em; }
"""


def to_html(blocks: list[Any], title: str) -> str:
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = ' class="warning"' if b.text.startswith("Warning:") else ""
            body.append(f"<p{cls}>{_html_inline(b.text)}</p>")
        elif isinstance(b, Table):
            td = '<td class="wide">' if b.wide_text else "<td>"
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"{td}{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<p><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}"></p>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head>\n<body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )
