"""MediaWiki markup to plain text, keeping the `[[target|surface]]` links as exact character spans.

`strip_wikitext(markup)` returns the plain text and a list of `WikiLink(start, end, target)` with
`text[start:end]` equal to the link's surface form. Removed: templates `{{...}}` (nested), tables
`{|...|}`, `<ref>...</ref>` and other tags, comments, bold/italic quotes, file/category/interwiki
links; kept: link surfaces, external-link labels, heading text. The output is built piece by
piece, so an offset is the length of what was emitted before the surface: exact by construction.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref\s*>", re.S | re.I)
_DROP_BLOCK_TAGS = re.compile(
    r"<(math|gallery|timeline|syntaxhighlight|source|score)\b[^>]*>.*?</\1\s*>", re.S | re.I
)
_TAG = re.compile(r"</?[a-zA-Z][^>]*?/?>")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s+([^\]]*))?\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_QUOTES = re.compile(r"'{2,5}")
_SPACES = re.compile(r"[ \t]+")


@dataclass(frozen=True)
class WikiLink:
    start: int
    end: int
    target: str


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced open_...close regions (templates nest)."""
    out, depth, i, n = [], 0, 0, len(text)
    while i < n:
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def normalize_target(target: str) -> str:
    """A page title as MediaWiki resolves it: no fragment, underscores as spaces, first letter upper."""
    target = target.split("#", 1)[0].replace("_", " ").strip()
    target = " ".join(target.split())
    return target[:1].upper() + target[1:]


def _clean_inline(text: str) -> str:
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _QUOTES.sub("", text)
    return text


def strip_wikitext(markup: str) -> tuple[str, list[WikiLink]]:
    text = html.unescape(markup)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_BLOCK_TAGS.sub("", text)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = _TAG.sub("", text)
    text = _HEADING.sub(lambda m: m.group(2), text)

    out: list[str] = []
    links: list[WikiLink] = []
    length = 0

    def emit(piece: str) -> None:
        nonlocal length
        out.append(piece)
        length += len(piece)

    i = 0
    while i < len(text):
        start = text.find("[[", i)
        if start < 0:
            emit(_clean_inline(text[i:]))
            break
        emit(_clean_inline(text[i:start]))
        end = _matching_close(text, start)
        if end < 0:  # unbalanced: keep the rest as text
            emit(_clean_inline(text[start:]))
            break
        inner = text[start + 2 : end]
        i = end + 2
        target, _, surface = inner.partition("|")
        if target.strip().lower().startswith(DROP_LINK_PREFIXES) or ":" in target.split("|")[0][:1]:
            continue
        if re.match(r"^[a-z]{2,3}(-[a-z]+)?:", target.strip()):  # interlanguage link
            continue
        surface = _clean_inline(surface if surface else target)
        # Link trail: [[bus]]es -> "buses", the link covering the whole word.
        trail = re.match(r"[a-z]+", text[i:])
        if trail:
            surface += trail.group(0)
            i += len(trail.group(0))
        if "[[" in surface or not surface.strip():
            emit(surface.replace("[[", "").replace("]]", ""))
            continue
        core = surface.strip()
        lead = surface[: len(surface) - len(surface.lstrip())]
        emit(lead)
        links.append(WikiLink(length, length + len(core), normalize_target(target)))
        emit(surface[len(lead) :])
    plain = "".join(out)
    # Collapse runs of spaces without moving link offsets: rebuild with an offset map.
    return _collapse_spaces(plain, links)


def _matching_close(text: str, start: int) -> int:
    depth, i = 0, start
    while i < len(text) - 1:
        if text.startswith("[[", i):
            depth += 1
            i += 2
        elif text.startswith("]]", i):
            depth -= 1
            if depth == 0:
                return i
            i += 2
        else:
            i += 1
    return -1


def _collapse_spaces(text: str, links: list[WikiLink]) -> tuple[str, list[WikiLink]]:
    """Squeeze blank lines and runs of spaces, remapping link offsets through the edit."""
    keep: list[str] = []
    new_pos = [0] * (len(text) + 1)
    prev_space = prev_newlines = 0
    for idx, ch in enumerate(text):
        new_pos[idx] = len(keep)
        if ch in " \t":
            if prev_space or prev_newlines:
                continue
            prev_space = 1
            keep.append(" ")
        elif ch == "\n":
            if keep and keep[-1] == " ":
                keep.pop()
                new_pos[idx] = len(keep)
            prev_space = 0
            prev_newlines += 1
            if prev_newlines > 2:
                continue
            keep.append("\n")
        else:
            prev_space = prev_newlines = 0
            keep.append(ch)
    new_pos[len(text)] = len(keep)
    out = "".join(keep)
    lstrip = len(out) - len(out.lstrip())
    out = out.strip()
    remapped = []
    for link in links:
        s, e = new_pos[link.start] - lstrip, new_pos[link.end] - lstrip
        if 0 <= s < e <= len(out):
            remapped.append(WikiLink(s, e, link.target))
    return out, remapped
