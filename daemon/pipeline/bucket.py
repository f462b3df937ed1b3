"""The daemon's side of a registry published to S3 (``registry.url = "s3://bucket/prefix"``, issue 24).

Why apart from :mod:`daemon.pipeline.commit`: the commit path only calls :func:`mirror_publish` between the
registry write and the ledger's commit (and the recovery calls it again before rolling a round forward), so its
changes stay a few lines; opening the bucket, pulling at start-up and the push's failpoints live here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import structlog

from daemon.pipeline.config import Config
from daemon.pipeline.failpoints import failpoint
from daemon.pipeline.ledger import Ledger
from daemon.pipeline.runtime import RuntimeError_
from daemon.registry.layout import RegistryError
from daemon.registry.mirror import RegistryMirror, open_mirror, resolve_registry

__all__ = ["RegistryUnavailable", "mirror_publish", "open_registry", "pull_at_start", "s3_failpoint"]

log = structlog.get_logger("unlearnd.daemon")
RETRY_FIRST_S = 0.5         # a push that failed is tried again after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 30.0


def open_registry(config: Config) -> tuple[Path, RegistryMirror | None]:
    """The local registry (the working copy) and the bucket it is published to, if ``registry.url`` names one.

    The bucket was reached already by the start-up checks (``check_registry_store``), so none is made here."""
    r = config.registry
    try:
        return resolve_registry(r.url, r.dir)[0], open_mirror(r.url, r.dir, endpoint_url=r.endpoint_url,
                                                              region=r.region, check=False)
    except RegistryError as exc:
        raise RuntimeError_(str(exc)) from None


def pull_at_start(mirror: RegistryMirror | None, model: str, ledger: Ledger) -> None:
    """Bring the bucket's ``LATEST`` (its weights and continual state) into a working copy that is empty or older:
    a new host, a lost disk, a model another daemon published last."""
    if mirror is None:
        return
    try:
        pulled = mirror.pull_latest(model)
    except Exception as exc:  # noqa: BLE001 - boto3's errors have no common base with ours; all refuse the start
        ledger.close()
        raise RuntimeError_(f"model {model!r}: cannot pull LATEST from registry.url {mirror.url}: "
                            f"{type(exc).__name__}: {exc}") from None
    if pulled is not None:
        log.info("registry_pulled", model=model, version=pulled, url=mirror.url)


def s3_failpoint(step: str) -> None:
    """The push's crash points (``S3_POINTS``): before the manifest, before ``LATEST``."""
    failpoint(f"s3_before_{step}")


class RegistryUnavailable(RuntimeError):
    """The bucket could not take a version (the object store unreachable or refusing): transient, exit 1."""


def mirror_publish(mirror: RegistryMirror | None, model: str, version: int, *,
                   should_abort: Callable[[], bool] | None = None) -> None:
    """Push a version written to the local registry to the bucket, if there is one (rounds, rebases, recovery).

    Idempotent: the recovery calls it again for a round cut short, and the push completes. With ``should_abort``
    (a round's), an unreachable store is waited out, retrying with backoff until the push succeeds or the round
    is aborted; the round then stays ``committing`` and the next start's recovery pushes and commits it. Without,
    one attempt (boto3 retries inside it). A version the bucket already holds with other bytes (another writer's)
    is never retried. The ownership fence (issue 24, part 3: :func:`daemon.pipeline.ownership.check_publish`)
    belongs in ``before_latest``: it runs just before the bucket's ``LATEST`` moves."""
    if mirror is None:
        return
    delay = RETRY_FIRST_S
    while True:
        try:
            mirror.publish(model, version, hook=s3_failpoint, before_latest=None)
            break
        except RegistryError:
            raise
        except Exception as exc:  # noqa: BLE001 - boto3's errors (BotoCoreError, ClientError) and OSError alike
            detail = f"{type(exc).__name__}: {exc}"
            if should_abort is None or should_abort():
                raise RegistryUnavailable(f"registry.url {mirror.url}: cannot push model {model!r} version "
                                          f"{version}: {detail}") from exc
            log.warning("registry_push_failed", model=model, version=version, url=mirror.url, error=detail,
                        retry_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
    failpoint("s3_after_latest")
