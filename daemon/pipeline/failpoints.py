"""Named crash points for the crash-safety tests (the idea of TiKV's fail-rs, reduced to one action).

``UNLEARND_FAILPOINTS=after_registry_write`` makes the daemon SIGKILL itself when it reaches that
point, so a test can crash it exactly between two durable steps; random-time kills cover the rest.
Unset (always, in production) this costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "REBASE_POINTS", "S3_POINTS", "failpoint"]

POINTS = ("after_begin_commit", "after_registry_write", "after_ledger_commit", "after_reject_batch",
          "after_round_split")
#: a rebase's: its training done but not returned, its intent recorded before the registry write, its version
#: written before the ledger commits it (kept apart from POINTS: only a daemon with a rebase reaches them)
REBASE_POINTS = ("rebase_before_training_end", "rebase_before_publish", "rebase_after_publish")
#: a version's push to an s3:// registry (``registry.url``): its files uploaded but not its manifest, its manifest
#: but not LATEST, LATEST moved but the ledger not committed (only a daemon with a bucket reaches them)
S3_POINTS = ("s3_before_manifest", "s3_before_latest", "s3_after_latest")
_ACTIVE = frozenset(p for p in os.environ.get("UNLEARND_FAILPOINTS", "").split(",") if p)


def failpoint(name: str) -> None:
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
