"""A terminal "tiktokenizer": show where a tokenizer cuts a text, and what it costs.

``render`` returns the text with every token boundary visible (alternating background colours,
or ``|`` separators without colour), special tokens highlighted, then the ids and a count line.
It is a pure function of its arguments so the CLI can print it and tests can check it.

A token that ends or starts inside a multi-byte character is shown with its partial bytes as
``\\xNN`` escapes: hiding the split would hide exactly what the view is for.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmstack.tokenizer.bpe import AllowedSpecial, Tokenizer

RESET = "\x1b[0m"
# Light 256-colour backgrounds with black text: readable on dark and light terminals.
_BACKGROUNDS = tuple(f"\x1b[30;48;5;{c}m" for c in (153, 222, 151, 217, 189))
_SPECIAL_STYLE = "\x1b[1;97;41m"  # bold bright white on red
_NO_COLOR_SPECIAL = ("⟦", "⟧")


def render(tok: Tokenizer, text: str, color: bool = True, *, allowed_special: AllowedSpecial = "all") -> str:
    """Tokenize ``text`` and render it; special-token names in the text count as specials by
    default (a viewer is for inspecting templates), pass ``allowed_special="none"`` to see how
    untrusted user text is encoded."""
    return render_ids(tok, tok.encode(text, allowed_special=allowed_special), color=color)


def render_ids(tok: Tokenizer, ids: Sequence[int], color: bool = True) -> str:
    """Render already-encoded ids (e.g. a training sequence or a model's output)."""
    pieces = [tok.id_to_token(i) for i in ids]
    specials = [tok.is_special(i) for i in ids]
    if color:
        styles = [_style(n, special) for n, special in enumerate(specials)]
        body = "".join(_paint(piece, style) for piece, style in zip(pieces, styles, strict=True))
        id_line = "ids: [" + ", ".join(_paint(str(i), s) for i, s in zip(ids, styles, strict=True)) + "]"
    else:
        marked = [_mark_special(p) if s else p for p, s in zip(pieces, specials, strict=True)]
        body = "|".join(marked)
        id_line = f"ids: {list(ids)}"
    return f"{body}\n{id_line}\n{_count_line(tok, ids)}"


def _style(position: int, special: bool) -> str:
    return _SPECIAL_STYLE if special else _BACKGROUNDS[position % len(_BACKGROUNDS)]


def _paint(piece: str, style: str) -> str:
    """Colour ``piece`` line by line, so a background never bleeds past a newline."""
    return "\n".join(f"{style}{line}{RESET}" if line else "" for line in piece.split("\n"))


def _mark_special(piece: str) -> str:
    left, right = _NO_COLOR_SPECIAL
    return f"{left}{piece}{right}"


def _count_line(tok: Tokenizer, ids: Sequence[int]) -> str:
    n_tokens = len(ids)
    n_bytes = sum(len(tok.decode_token_bytes(i)) for i in ids)
    ratio = n_bytes / n_tokens if n_tokens else 0.0
    tokens_word = "token" if n_tokens == 1 else "tokens"
    bytes_word = "byte" if n_bytes == 1 else "bytes"
    return f"{n_tokens} {tokens_word}, {n_bytes} {bytes_word}, {ratio:.2f} bytes/token"
