"""IFEval's counting rules on plain text: words, sentences, paragraphs, bullets, highlights, placeholders,
titles (see align.evaluation.verifier for the rules in words and their sources). Pure functions; the verifier, the
degeneration check and the dataset builder count with them."""

from __future__ import annotations

import re


_WORD_RE = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Number of runs of word characters (IFEval: `nltk.tokenize.RegexpTokenizer(r"\\w+")`)."""
    return len(_WORD_RE.findall(text))


# Abbreviations whose final dot does not end a sentence (compared lower-cased, without the dot).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs inc ltd corp jan feb mar apr jun jul aug sep sept oct nov dec "
    "e.g i.e a.m p.m u.s u.k ph.d fig approx dept".split()
)
# A candidate sentence end: a run of terminators, then any closing quotes or brackets.
_END_RE = re.compile(r"(?:[.!?\u2026\u3002\uff01\uff1f]+)[\"'\u201d\u2019)\]]*")
_TOKEN_BEFORE_RE = re.compile(r"(\S+)$")


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences with fixed, documented rules (no downloaded model).

    A sentence ends at a run of `.`, `!`, `?`, `…` (or the CJK `。！？`), plus any closing quotes or
    brackets, that is followed by whitespace or the end of the text. A run of terminators ends one
    sentence ("Wait!!" and "Well..." are one sentence each). A single `.` does not end a sentence when the
    word it closes is a listed abbreviation ("Dr.", "e.g.", "p.m."; see `_ABBREVIATIONS`), a single letter
    other than "I" (an initial, "J.") or a number ("1." in a numbered list), since then the dot is part of
    that token; words that often end a sentence ("etc.", "no.") are not listed. A dot not followed by
    whitespace never ends a sentence ("3.14", "example.com"). Line breaks count as spaces, as in IFEval,
    so a bulleted list without full stops is one sentence. Text after the last terminator is one more
    sentence if it has a word character; pieces without any word character (a lone "*") are not
    sentences.
    """
    text = text.replace("\n", " ")
    sentences: list[str] = []
    start = 0
    for match in _END_RE.finditer(text):
        end = match.end()
        if end < len(text) and not text[end].isspace():
            continue
        run = match.group(0)
        if run.rstrip("\"'\u201d\u2019)]") == ".":
            before = _TOKEN_BEFORE_RE.search(text, 0, match.start())
            token = before.group(1).lstrip("(\"'\u201c\u2018*[") if before else ""
            word = token.lower()
            initial = len(token) == 1 and token.isalpha() and token != "I"  # "J." is an initial, "I." a pronoun
            if word in _ABBREVIATIONS or initial or word.isdigit():
                continue
        piece = text[start:end].strip()
        if _WORD_RE.search(piece):
            sentences.append(piece)
        start = end
    tail = text[start:].strip()
    if _WORD_RE.search(tail):
        sentences.append(tail)
    return sentences


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


_PARAGRAPH_SPLIT_RE = re.compile(r"\s?\*\*\*\s?")


def count_paragraphs(text: str) -> int | None:
    """Paragraphs split on `***` (IFEval); None when a paragraph in the middle is empty (an IFEval fail)."""
    pieces = _PARAGRAPH_SPLIT_RE.split(text)
    count = len(pieces)
    for i, piece in enumerate(pieces):
        if not piece.strip():
            if i == 0 or i == len(pieces) - 1:
                count -= 1
            else:
                return None
    return count


_STAR_BULLET_RE = re.compile(r"^\s*\*[^\*].*$", re.MULTILINE)
_DASH_BULLET_RE = re.compile(r"^\s*-.*$", re.MULTILINE)


def count_bullets(text: str) -> int:
    """Lines that start with `*` (not `**`) or with `-`, after optional spaces (IFEval)."""
    return len(_STAR_BULLET_RE.findall(text)) + len(_DASH_BULLET_RE.findall(text))


_HIGHLIGHT_RE = re.compile(r"\*[^\n\*]*\*")
_DOUBLE_HIGHLIGHT_RE = re.compile(r"\*\*[^\n\*]*\*\*")


def count_highlights(text: str) -> int:
    """`*text*` and `**text**` spans on one line with non-blank text (IFEval)."""
    single = sum(1 for h in _HIGHLIGHT_RE.findall(text) if h.strip("*").strip())
    double = sum(1 for h in _DOUBLE_HIGHLIGHT_RE.findall(text) if h[2:-2].strip())
    return single + double


_PLACEHOLDER_RE = re.compile(r"\[.*?\]")


def count_placeholders(text: str) -> int:
    return len(_PLACEHOLDER_RE.findall(text))


_TITLE_RE = re.compile(r"<<[^\n]+>>")


def has_title(text: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in _TITLE_RE.findall(text))
