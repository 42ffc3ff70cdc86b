"""E-mail normalisation and a look-alike skeleton (Unicode TR39, section 4 "skeleton").

``normalize_email`` is what is stored and compared: NFKC (a fullwidth ``ａ`` is an ``a``), no
surrounding space, lower case. ``skeleton`` maps every character to the prototype of its
confusable set, so ``pаypal@example.com`` with a Cyrillic ``а`` and ``paypal@example.com``
share one skeleton: an index on it refuses the look-alike of an existing address.

The confusable sets are the Unicode consortium's ``confusables.txt``, as shipped by the
``confusable-homoglyphs`` package (data only; we build the prototype table from it). ASCII
characters are their own prototypes: ``paypa1`` and ``paypal`` stay distinct addresses (TR39
would fold them, and refuse real addresses that differ by a digit).
"""

from __future__ import annotations

import functools
import json
import unicodedata
from importlib import resources

_ASCII_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_+@")


def normalize_email(value: str) -> str:
    """The stored and compared form of an address: NFKC, stripped, lower-cased."""
    return unicodedata.normalize("NFKC", value).strip().lower()


@functools.cache
def _prototypes() -> dict[str, str]:
    raw = resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8")
    table: dict[str, list[dict[str, str]]] = json.loads(raw)
    out: dict[str, str] = {}
    for char, similar in table.items():
        if len(char) != 1 or char.isascii():
            continue
        candidates = [
            c for c in (entry["c"].lower() for entry in similar) if len(c) == 1 and c in _ASCII_OK
        ]
        if candidates:
            # Letters before digits, then by code point: deterministic across runs.
            out[char] = min(candidates, key=lambda c: (not c.isalpha(), c))
    return out


def skeleton(value: str) -> str:
    """The look-alike key of ``value``: two strings a reader cannot tell apart share it."""
    table = _prototypes()
    folded = unicodedata.normalize("NFKC", value).casefold()
    mapped = "".join(table.get(ch, ch) for ch in unicodedata.normalize("NFD", folded))
    # Drop combining marks left by NFD (an accented look-alike is still a look-alike).
    return "".join(ch for ch in mapped if not unicodedata.combining(ch))
