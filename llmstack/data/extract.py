"""The main text of one HTML page: trafilatura, after fixing the Sphinx markup that trips it.

Shared by the data pipeline's extract stage (``data/refine.py``), the HTML corpus reader
(``data/corpus.py``) and an assistant's knowledge files (``assistants/knowledge.py``).
"""

from __future__ import annotations

from typing import Any

import lxml.html


def _prepare_html(html: str) -> Any:
    """Fix two ways Sphinx markup trips trafilatura before extraction.

    The heading permalinks (``<a class="headerlink">¶</a>``) would leave a pilcrow after every
    title, and code blocks inside list items or definition bodies would have their newlines
    collapsed into one line; turning those containers into plain divs keeps the code's lines.
    """
    tree = lxml.html.fromstring(html)
    for a in tree.xpath('//a[contains(concat(" ", normalize-space(@class), " "), " headerlink ")]'):
        a.drop_tree()
    for el in tree.xpath("//li[.//pre] | //ul[.//pre] | //ol[.//pre] | //dd[.//pre]"):
        el.tag = "div"
    return tree


def extract_html_text(html: str) -> str:
    """The main text of one page (navigation, sidebars and footers dropped), or "" if none."""
    import trafilatura  # heavy: ~0.15 s to import

    if not html.strip():
        return ""
    text = trafilatura.extract(
        _prepare_html(html),
        # favor_precision=True was tried and drops real content on these pages (notes, "Changed in
        # version" lines, output-only code blocks: 10 of 31 blocks in howto/logging.html) while
        # removing no boilerplate that the default keeps; Sphinx chrome is dropped either way.
        favor_precision=False,
        include_comments=False,
        include_tables=True,
        deduplicate=False,
        fast=True,  # skip the readability/jusText fallbacks: identical text on 60 sampled pages, ~20% faster
    )
    if not text:
        return ""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip()
