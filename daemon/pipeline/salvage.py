"""The request id of a message the strict JSON reader refused, read by a tolerant scan, so it still gets a receipt.

The contract (§2) promises a ``rejected`` receipt to every rejected message whose request id can be read. The
strict reader (:func:`daemon.pipeline.codec.check_request`) refuses documents that are JSON to the eye but not to
it: a ``NaN`` or ``Infinity`` somewhere, an integer of thousands of digits, a UTF-8 byte order mark, nesting
deeper than Python's recursion allows. Their ``request_id`` is usually plain to see, and the publisher deserves
to be told. :func:`salvage_fields` finds the top-level string members of such a document without parsing
the rest: it walks the string tokens (with :func:`json.decoder.scanstring`, JSON's own string reader) and the
runs of brackets (one regex match per run, so 100,000 nested brackets are one step), keeping the depth.

Bounded: the message is already within ``limits.max_message_bytes``; the walk gives up after
:data:`MAX_TOKENS` tokens, at an unterminated string, or when the top-level object ends. A field named twice
at the top level is not reported (which copy did the sender mean?). Nothing here decides validity: the caller
checks what it gets back as it checks a strictly parsed field.
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring

__all__ = ["MAX_TOKENS", "salvage_fields"]

MAX_TOKENS = 100_000            # strings and bracket runs walked at most (~0.1 s of work)
_TOKEN = re.compile(r'"|[\[{]+|[\]}]+')
_COLON = re.compile(r"\s*:\s*")


def salvage_fields(text: str, names: frozenset[str]) -> dict[str, str]:
    """The top-level members of ``text`` (a JSON object to the eye) named in ``names`` whose value is a string."""
    if text.startswith("\ufeff"):
        text = text[1:]
    start = len(text) - len(text.lstrip())
    if not text.startswith("{", start):
        return {}
    found: dict[str, str] = {}
    twice: set[str] = set()
    depth, pos, tokens = 1, start + 1, 0
    while depth > 0 and tokens < MAX_TOKENS:
        m = _TOKEN.search(text, pos)
        if m is None:
            break
        tokens += 1
        tok = m.group()
        if tok[0] in "[{":
            depth, pos = depth + len(tok), m.end()
            continue
        if tok[0] in "]}":
            depth, pos = depth - len(tok), m.end()
            continue
        try:
            value, pos = scanstring(text, m.end())
        except (json.JSONDecodeError, ValueError):
            break                                   # an unterminated or broken string: nothing past it is sure
        if depth != 1 or value not in names:
            continue
        colon = _COLON.match(text, pos)
        if colon is None:
            continue                                # a value that equals a name, not a key
        pos = colon.end()
        member = ""                                 # not a string: the field is there, but unusable
        if text.startswith('"', pos):
            try:
                member, pos = scanstring(text, pos + 1)
            except (json.JSONDecodeError, ValueError):
                break
        if value in found:
            twice.add(value)
        found[value] = member
    return {k: v for k, v in found.items() if k not in twice and v}
