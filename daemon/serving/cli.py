"""``unlearnd serve`` and ``unlearnd registry list|show|verify|rollback|prune``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]

REGISTRY_ENV = "UNLEARND_REGISTRY_DIR"
REGISTRY_URL_ENV = "UNLEARND_REGISTRY_URL"          # the daemon's settings' names: one environment serves both
ENDPOINT_ENV = "UNLEARND_REGISTRY_ENDPOINT_URL"
REGION_ENV = "UNLEARND_REGISTRY_REGION"
NOTIFY_ENV = "UNLEARND_NOTIFY_URLS"
TOKEN_FILE_ENV = "UNLEARND_SERVE_TOKEN_FILE"
NOTIFY_TOKEN_FILE_ENV = "UNLEARND_NOTIFY_TOKEN_FILE"


def _usage(message: str) -> Exception:
    from daemon.errors import UsageError

    return UsageError(message)


def _registry_value(args: argparse.Namespace) -> str:
    # the daemon's names: with both set, registry.url is where versions are published (dir: its working copy)
    value = args.registry or os.environ.get(REGISTRY_URL_ENV) or os.environ.get(REGISTRY_ENV)
    if not value:
        raise _usage(f"--registry DIR|URL is required (or set {REGISTRY_ENV} or {REGISTRY_URL_ENV})")
    return value


def _mirror(args: argparse.Namespace, cache: Path) -> Any:
    """The bucket ``--registry s3://…`` names over the local ``cache`` (reached once: exit 2 naming the setting
    when the endpoint, the bucket or the credentials are wrong), or None for a folder."""
    from daemon.registry.mirror import open_mirror
    from daemon.registry.remote import RemoteConfigError

    endpoint, region = _s3_settings(args)
    try:
        return open_mirror(_registry_value(args), cache, endpoint_url=endpoint, region=region)
    except RemoteConfigError as exc:
        raise _usage(f"{exc} (--registry, --s3-endpoint-url, --s3-region)") from exc


def _s3_settings(args: argparse.Namespace) -> tuple[str, str]:
    """The bucket's endpoint URL and region: the options, else the daemon's environment variables."""
    return (args.s3_endpoint_url or os.environ.get(ENDPOINT_ENV, ""),
            args.s3_region or os.environ.get(REGION_ENV, ""))


def _is_bucket(value: str) -> bool:
    """``--registry`` names an object store (``s3://…``), not a folder (a path or ``file://…``)."""
    return "://" in value and not value.startswith("file:")


def _registry_dir(args: argparse.Namespace) -> Path:
    """The registry folder a command works on: the folder named, or for ``s3://`` a scratch copy of the bucket's
    versions (pulled and verified; ``args.mirror`` is then the bucket, for a command that publishes)."""
    value = _registry_value(args)
    args.mirror = None
    if _is_bucket(value):
        import tempfile

        if args.cache_dir:
            scratch = Path(args.cache_dir)
        else:
            import atexit
            import shutil

            scratch = Path(tempfile.mkdtemp(prefix="unlearnd-registry-"))
            atexit.register(shutil.rmtree, scratch, True)
        args.mirror = _mirror(args, scratch)
        pulled, failed = args.mirror.pull_all(_model(args, scratch, must_exist=False))
        args.pull_failed = failed
        return scratch
    from daemon.registry.mirror import resolve_registry
    from daemon.registry.remote import RemoteConfigError

    try:
        path = resolve_registry(value, value)[0]
    except RemoteConfigError as exc:
        raise _usage(f"--registry: {exc}") from exc
    if not path.is_dir():
        raise _usage(f"--registry {value}: no such directory")
    return path


def _model(args: argparse.Namespace, registry_dir: Path, *, must_exist: bool = True) -> str:
    from daemon import registry

    try:
        registry.layout._check_model_name(args.model)   # noqa: SLF001 - the one definition of a safe name
    except ValueError as exc:
        raise _usage(f"--model: {exc}") from exc
    if must_exist and not (registry_dir / args.model).is_dir():
        known = sorted(p.name for p in registry_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise _usage(f"--model {args.model}: not in {registry_dir} (models: {', '.join(known) or 'none'})")
    return args.model


# -- serve --------------------------------------------------------------------------------------------
def _security(args: argparse.Namespace) -> tuple[str | None, object]:
    """(token, TlsFiles) from the flags; the token file path may come from the environment (the env wins,
    as the daemon's config overrides do). A world-readable token file gets a warning, not a refusal."""
    from daemon.endpoint_auth import TlsFiles, read_token_file, token_file_is_shared

    token_file = os.environ.get(TOKEN_FILE_ENV) or args.token_file
    token = None
    if token_file:
        try:
            token = read_token_file(token_file)
        except ValueError as exc:
            raise _usage(str(exc)) from exc
        if token_file_is_shared(token_file):
            print(f"unlearnd serve: warning: {token_file} is readable by every user (chmod 0400 or 0440 it)",
                  file=sys.stderr)
    try:
        tls = TlsFiles(certfile=args.tls_cert_file, keyfile=args.tls_key_file, client_cafile=args.tls_client_ca_file,
                       client_auth_required=args.tls_client_auth_required)
        if tls.enabled:
            from daemon.endpoint_auth import server_ssl_context

            server_ssl_context(tls)         # unreadable or mismatched files fail here, with their names
    except ValueError as exc:
        raise _usage(str(exc)) from exc
    return token, tls


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.serving.server import run
    from daemon.serving.settings import ServeSettings

    value = _registry_value(args)
    url = None
    if _is_bucket(value):                                   # s3://: serve from a local cache of the bucket
        registry_dir = Path(args.cache_dir) if args.cache_dir else _default_cache(value)
        _mirror(args, registry_dir)
        registry_dir.mkdir(parents=True, exist_ok=True)
        url = value
    else:
        registry_dir = _registry_dir(args)
    model = _model(args, registry_dir, must_exist=False)   # the daemon may publish it after we start
    token, tls = _security(args)
    try:
        endpoint, region = _s3_settings(args)
        settings = ServeSettings(
            registry=registry_dir, model=model, host=args.host, port=args.port,
            poll_interval_s=args.poll_interval, threads=args.threads, torch_threads=args.torch_threads,
            max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size, lease_ttl_s=args.lease_ttl,
            load_nice=args.load_nice, verify_process=not args.verify_inline, verify_nice=args.verify_nice,
            verify_idle=not args.no_verify_idle, request_slice_us=args.request_slice_us,
            server_id=args.server_id, access_log=args.access_log, log_level=args.log_level,
            log_format=args.log_format, token=token, auth_inference=args.auth_inference, tls=tls,
            header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
            max_header_bytes=args.max_header_bytes, max_connections=args.max_connections, registry_url=url,
            s3_endpoint_url=endpoint, s3_region=region)
    except ValueError as exc:
        raise _usage(str(exc)) from exc
    return run(settings)


def _default_cache(url: str) -> Path:
    """``$XDG_CACHE_HOME/unlearnd/<bucket>/<prefix>`` (``~/.cache`` without it): where served versions are pulled."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "unlearnd" / url.split("://", 1)[1].strip("/")


# -- registry -----------------------------------------------------------------------------------------
def _rows(registry_dir: Path, model: str) -> list[dict[str, Any]]:
    from daemon import registry
    from daemon.registry import ops as registry_ops

    latest = registry.latest_version(registry_dir, model)
    served: dict[int, list[str]] = {}
    for lease in registry_ops.live_leases(registry_dir, model):
        if lease.version is not None:
            served.setdefault(lease.version, []).append(lease.server_id)
    rows = []
    for v in registry.list_versions(registry_dir, model):
        try:
            m = registry.read_manifest(registry_dir, model, v)
        except registry.RegistryError as exc:
            rows.append({"version": v, "error": str(exc)})
            continue
        method = m.get("method") if isinstance(m.get("method"), dict) else {}
        rows.append({
            "version": v, "parent": m.get("parent"), "created_at": m.get("created_at"),
            "method": method.get("name"), "round_id": m.get("round_id"),
            "requests": len(m.get("request_ids") or []), "sha256": m.get("sha256"),
            "latest": v == latest, "served_by": served.get(v, []),
            "rollback_to": (m.get("rollback") or {}).get("to") if isinstance(m.get("rollback"), dict) else None,
        })
    return rows


def cmd_registry_list(args: argparse.Namespace) -> int:
    registry_dir = _registry_dir(args)
    model = _model(args, registry_dir)
    rows = _rows(registry_dir, model)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'version':>7}  {'parent':>6}  {'created_at':<24}  {'method':<14}  {'req':>4}  {'sha256':<12}  marks")
    for r in rows:
        if "error" in r:
            print(f"{r['version']:>7}  unreadable: {r['error']}")
            continue
        marks = []
        if r["latest"]:
            marks.append("LATEST")
        if r["served_by"]:
            marks.append("served by " + ", ".join(r["served_by"]))
        if r["rollback_to"] is not None:
            marks.append(f"rollback to {r['rollback_to']}")
        parent = "-" if r["parent"] is None else str(r["parent"])
        print(f"{r['version']:>7}  {parent:>6}  {str(r['created_at']):<24}  {str(r['method']):<14}  "
              f"{r['requests']:>4}  {str(r['sha256'])[:12]:<12}  {'; '.join(marks)}")
    return 0


def _version_arg(registry_dir: Path, model: str, version: int | None) -> int:
    from daemon import registry

    if version is None:
        latest = registry.latest_version(registry_dir, model)
        if latest is None:
            raise _usage(f"model {model} has no LATEST version; name one")
        return latest
    if version not in registry.list_versions(registry_dir, model):
        raise _usage(f"model {model} has no version {version}")
    return version


def cmd_registry_show(args: argparse.Namespace) -> int:
    from daemon import registry

    registry_dir = _registry_dir(args)
    model = _model(args, registry_dir)
    version = _version_arg(registry_dir, model, args.version)
    try:
        manifest = registry.read_manifest(registry_dir, model, version)
    except registry.RegistryError as exc:
        print(f"unlearnd registry show: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


def cmd_registry_verify(args: argparse.Namespace) -> int:
    from daemon.registry import ops as registry_ops

    registry_dir = _registry_dir(args)
    model = _model(args, registry_dir)
    versions = None if args.version is None else [_version_arg(registry_dir, model, args.version)]
    results = registry_ops.verify_all(registry_dir, model, versions)
    for r in results:
        print(f"{model} v{r.version}: {'ok' if r.ok else f'FAILED ({r.code})'}: {r.detail}")
    bad = [r.version for r in results if not r.ok]
    for v, why in sorted(getattr(args, "pull_failed", {}).items()):     # s3://: a version the bucket holds damaged
        if args.version in (None, v):
            print(f"{model} v{v}: FAILED (bucket): {why}")
            bad.append(v)
    latest_problem = registry_ops.check_latest(registry_dir, model) if args.version is None else None
    if latest_problem:
        print(f"{model} LATEST: FAILED (backwards): {latest_problem}")
    if bad or latest_problem:
        print(f"{len(bad)} of {len(results)} versions failed verification"
              + (f": {', '.join(map(str, bad))}" if bad else "") + ("; LATEST is wrong" if latest_problem else ""),
              file=sys.stderr)
        return 1
    print(f"{len(results)} versions verified")
    return 0


def _notify_urls(args: argparse.Namespace) -> list[str]:
    urls = list(args.notify or [])
    if not urls and os.environ.get(NOTIFY_ENV):
        urls = [u.strip() for u in os.environ[NOTIFY_ENV].split(",") if u.strip()]
    return urls


def cmd_registry_rollback(args: argparse.Namespace) -> int:
    from daemon import registry
    from daemon.registry import ops as registry_ops
    from daemon.endpoint_auth import read_token_file
    from daemon.serving.notify import client_ssl_context, notify_reload

    registry_dir = _registry_dir(args)
    model = _model(args, registry_dir)
    if args.to in getattr(args, "pull_failed", {}):       # s3://: the bucket holds it damaged (never pulled)
        print(f"unlearnd registry rollback: version {args.to} is damaged, nothing written: "
              f"{args.pull_failed[args.to]}", file=sys.stderr)
        return 1
    try:
        info = registry_ops.rollback(registry_dir, model, args.to, reason=args.reason)
    except ValueError as exc:
        raise _usage(str(exc)) from exc
    except registry.VerificationError as exc:
        print(f"unlearnd registry rollback: version {args.to} is damaged, nothing written: {exc}", file=sys.stderr)
        return 1
    if args.mirror is not None:
        args.mirror.publish(model, info.version)        # files, manifest, then the bucket's LATEST
    rb = info.manifest["rollback"]
    print(f"{model}: version {info.version} holds version {rb['to']}'s files (parent {rb['from']}); "
          f"LATEST -> {info.version}" + (f" in {args.mirror.url}" if args.mirror is not None else ""))
    reverted = rb["reverted_request_ids"]
    if reverted or not rb["lineage_complete"]:
        print(f"warning: this undoes the unlearning of {len(reverted)} request(s) applied after version "
              f"{rb['to']}" + ("" if rb["lineage_complete"] else " (at least: some manifests were pruned)")
              + "; re-submit them to forget again: " + ", ".join(reverted[:20])
              + (" ..." if len(reverted) > 20 else ""), file=sys.stderr)
    token_file = os.environ.get(NOTIFY_TOKEN_FILE_ENV) or args.notify_token_file
    try:
        token = read_token_file(token_file, what="--notify-token-file") if token_file else None
    except ValueError as exc:
        raise _usage(str(exc)) from exc
    ctx = client_ssl_context(args.notify_ca_file)
    for result in notify_reload(_notify_urls(args), timeout=args.notify_timeout, model=model, token=token,
                                ssl_context=ctx):
        state = "ok" if result.ok else f"failed ({result.status}): {result.detail}"
        print(f"notify {result.url}: {state} in {result.seconds * 1e3:.1f} ms")
    return 0


def cmd_registry_prune(args: argparse.Namespace) -> int:
    from daemon.registry import ops as registry_ops

    if _is_bucket(_registry_value(args)):
        raise _usage("--registry: prune works on a folder; on s3:// keep versions with the bucket's lifecycle rules "
                     "(never deleting the version LATEST names)")
    registry_dir = _registry_dir(args)
    model = _model(args, registry_dir)
    try:
        result = registry_ops.prune(registry_dir, model, keep=args.keep, dry_run=args.dry_run)
    except ValueError as exc:
        raise _usage(f"--keep: {exc}") from exc
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{model}: {verb} {len(result.deleted)} version(s)"
          + (f": {', '.join(map(str, result.deleted))}" if result.deleted else ""))
    for v, why in sorted(result.protected.items()):
        print(f"kept v{v}: {'; '.join(why)}")
    return 0


# -- parser -------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _s3_arguments(p: argparse.ArgumentParser, cache: str) -> None:
    p.add_argument("--s3-endpoint-url", default="", help=f"S3 endpoint of an s3:// registry (MinIO: "
                                                         f"http://host:9000; default: ${ENDPOINT_ENV}, else AWS's)")
    p.add_argument("--s3-region", default="", help=f"its region (default: ${REGION_ENV}, AWS_DEFAULT_REGION)")
    p.add_argument("--cache-dir", help=cache)


def add_commands(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    """Register this layer's subcommands on the top-level parser."""
    from daemon.registry import ops as registry_ops

    sp = sub.add_parser("serve", help="serve a registry model over the Open Inference Protocol (KServe v2)")
    sp.add_argument("--registry", help=f"registry root, or s3://bucket/prefix (default: ${REGISTRY_URL_ENV}, "
                                       f"${REGISTRY_ENV})")
    _s3_arguments(sp, cache="local cache of an s3:// registry, where versions are pulled and verified before "
                            "they are served (default: $XDG_CACHE_HOME/unlearnd/<bucket>/<prefix>)")
    sp.add_argument("--model", required=True, help="the model to serve")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sp.add_argument("--poll-interval", type=float, default=0.2, help="seconds between reads of LATEST (0.2)")
    sp.add_argument("--threads", type=int, default=2, help="inference threads (2)")
    sp.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of one inference (1)")
    sp.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024, help="largest request body (16 MiB)")
    sp.add_argument("--max-batch-size", type=int, default=256, help="largest batch one request may carry (256)")
    sp.add_argument("--lease-ttl", type=float, default=registry_ops.DEFAULT_LEASE_TTL_S,
                    help="seconds this server's lease protects its version from retention (30)")
    sp.add_argument("--load-nice", type=int, default=10,
                    help="lower CPU priority of full loads found by polling, 0-19 (10)")
    sp.add_argument("--request-slice-us", type=int, default=300,
                    help="CPU scheduler slice of the request threads in µs, 0 for the kernel's default (300; "
                         "Linux 6.12+: a woken request thread then preempts other CPU work at once)")
    sp.add_argument("--verify-nice", type=int, default=19,
                    help="lower CPU priority of the process that verifies each new version, 0-19 (19)")
    sp.add_argument("--no-verify-idle", action="store_true",
                    help="the verifying process runs at its nice value, not SCHED_IDLE first")
    sp.add_argument("--verify-inline", action="store_true",
                    help="verify new versions in the serving process instead of a helper process")
    sp.add_argument("--server-id", help="this server's lease name (default host-pid-port)")
    sp.add_argument("--access-log", action="store_true", help="log every request")
    sp.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sp.add_argument("--log-format", default="json", choices=("json", "console"))
    sec = sp.add_argument_group("security (docs/operations.md, Securing the endpoints)")
    sec.add_argument("--token-file", help=f"file holding the bearer token that load, index and /metrics then need "
                                          f"(${TOKEN_FILE_ENV} overrides it); answered 401 without it")
    sec.add_argument("--auth-inference", action="store_true",
                     help="inference and model metadata need the token too (health endpoints stay open)")
    sec.add_argument("--tls-cert-file", help="serve HTTPS with this certificate chain (PEM)")
    sec.add_argument("--tls-key-file", help="the certificate's private key (PEM)")
    sec.add_argument("--tls-client-ca-file", help="accept client certificates signed by this CA (mutual TLS)")
    sec.add_argument("--tls-client-auth-required", action="store_true",
                     help="refuse clients without a certificate from --tls-client-ca-file")
    lim = sp.add_argument_group("connection limits (daemon.serving.guard)")
    lim.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a request's headers may take to arrive, else 408 (10)")
    lim.add_argument("--body-timeout", type=float, default=30.0,
                     help="seconds its body may take after the headers, else 408 (30)")
    lim.add_argument("--max-header-bytes", type=int, default=64 * 1024, help="largest request head, else 431 (64 KiB)")
    lim.add_argument("--max-connections", type=int, default=0,
                     help="connections held at once; over it the longest-waiting one is closed (0: the open-files "
                          "limit less 256)")
    sp.set_defaults(func=cmd_serve)

    rp = sub.add_parser("registry", help="operate the model registry: list, show, verify, rollback, prune")
    rsub = rp.add_subparsers(dest="registry_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--registry", help=f"registry root, or s3://bucket/prefix (default: ${REGISTRY_URL_ENV}, "
                                          f"${REGISTRY_ENV})")
        _s3_arguments(p, cache="with s3://: the folder the bucket's versions are pulled into (default: a "
                               "temporary one)")
        p.add_argument("--model", required=True)

    p = rsub.add_parser("list", help="every version, with LATEST and the versions servers hold")
    common(p)
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p.set_defaults(func=cmd_registry_list)

    p = rsub.add_parser("show", help="print a version's manifest (default LATEST)")
    common(p)
    p.add_argument("version", nargs="?", type=_positive_int)
    p.set_defaults(func=cmd_registry_show)

    p = rsub.add_parser("verify", help="check every version (or one) as a server would, and LATEST; exit 1 on any failure")
    common(p)
    p.add_argument("version", nargs="?", type=_positive_int)
    p.set_defaults(func=cmd_registry_verify)

    p = rsub.add_parser("rollback", help="serve an older version again, as a new version (history only grows)")
    common(p)
    p.add_argument("--to", required=True, type=_positive_int, help="the version whose files to serve again")
    p.add_argument("--reason", help="recorded in the new version's manifest")
    p.add_argument("--notify", action="append", metavar="URL",
                   help=f"reload URL to call afterwards (repeatable; default ${NOTIFY_ENV}, comma-separated)")
    p.add_argument("--notify-timeout", type=float, default=2.0)
    p.add_argument("--notify-token-file", help=f"the servers' bearer token file (${NOTIFY_TOKEN_FILE_ENV} overrides)")
    p.add_argument("--notify-ca-file", help="CA of the servers' certificates, for https:// URLs")
    p.set_defaults(func=cmd_registry_rollback)

    p = rsub.add_parser("prune", help="delete all but the newest N versions (never LATEST or a served one)")
    common(p)
    p.add_argument("--keep", type=int, default=registry_ops.DEFAULT_KEEP, help="versions to keep (10)")
    p.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    p.set_defaults(func=cmd_registry_prune)
