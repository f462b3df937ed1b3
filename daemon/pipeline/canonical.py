"""Canonical JSON: the one byte form of a value, for receipts on the wire and for the audit chain's hashes.

Its own module because the codec (receipts out), the ledger (the hash chain) and the receipts all need it,
and none of them may import another for it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json"]


def canonical_json(obj: Any) -> bytes:
    """Compact JSON with sorted keys, UTF-8, no NaN/Infinity: the same bytes for the same value.

    Used for receipts and for hashing (the audit chain). Raises ``ValueError`` for NaN/Infinity
    or text that is not valid Unicode, ``TypeError`` for values JSON does not have.
    """
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")
