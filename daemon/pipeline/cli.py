"""`unlearnd run | broker | publish | receipts | config | rebase | audit`: the daemon and the tools around it."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]


def _usage(message: str) -> Exception:
    from daemon.errors import UsageError

    return UsageError(message)


def _load(args: argparse.Namespace):  # noqa: ANN202 - Config
    from daemon.pipeline.config import ConfigError, load_config

    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise _usage(f"configuration: {exc}") from exc


def _check_folders(config: Any, *, wait: bool = False) -> list[str]:
    """The folders and the database the daemon writes: a usage error (exit 2) when the state folder is not writable
    or the ledger's PostgreSQL (state.url) cannot be reached (``wait``: within ``state.wait_s``); warnings."""
    from daemon.pipeline.config import ConfigError
    from daemon.pipeline.config_checks import check_folders, check_registry_store, check_state_database

    try:
        warnings = check_folders(config)
        check_state_database(config, wait_s=config.state.wait_s if wait else 0.0)   # state.url answers
        check_registry_store(config)                    # registry.url: the bucket answers
        return warnings
    except ConfigError as exc:
        raise _usage(f"configuration: {exc}") from exc


def _ledger_shown(config: Any) -> str:
    """The ledger as messages show it: the SQLite file, or the PostgreSQL URL (state.url holds no password)."""
    return f"PostgreSQL {config.state.url}" if config.state.url else config.state.ledger_target()


# -- run ----------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    import threading

    import structlog

    from daemon.logs import configure_logging
    from daemon.pipeline.bucket import RegistryUnavailable
    from daemon.pipeline.assembly import build_daemon, install_signal_handlers
    from daemon.pipeline.lifecycle import BrokerUnavailable, StartupError
    from daemon.pipeline.runtime import RuntimeError_

    config = _load(args)
    configure_logging(config.log.level, config.log.format)
    warnings = _check_folders(config, wait=True)    # before anything is set up: a refusal leaves nothing behind
    for warning in warnings:
        structlog.get_logger("unlearnd.daemon").warning("config_warning", detail=warning)
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        daemon = build_daemon(config, stop=stop)
    except RuntimeError_ as exc:
        raise _usage(f"refusing to start: {exc}") from exc
    try:
        daemon.start()
    except (StartupError, RuntimeError_) as exc:
        raise _usage(f"refusing to start: {exc}") from exc
    except (BrokerUnavailable, RegistryUnavailable) as exc:
        print(f"unlearnd run: {exc}", file=sys.stderr)
        daemon.shutdown()
        return 1
    return daemon.run()


# -- broker -------------------------------------------------------------------------------------------
def cmd_broker(args: argparse.Namespace) -> int:
    import signal

    from daemon.pipeline.broker import BrokerError, start_broker

    try:
        proc = start_broker(args.port, args.host, storage=args.storage)
    except BrokerError as exc:
        raise _usage(str(exc)) from exc
    if args.storage.startswith("memory:"):
        print(f"broker listening on {args.host}:{args.port}\nWARNING: in-memory storage: stopping it loses every "
              f"topic, message and committed offset; requests published while the daemon is down are lost with it "
              f"(those accepted but not applied get a failed receipt asking for a resubmission). For a durable "
              f"broker: --storage s3://BUCKET/ (docs/operations.md)", file=sys.stderr, flush=True)
    else:
        print(f"broker listening on {args.host}:{args.port}, storage {args.storage}", file=sys.stderr, flush=True)

    def stop(*_: Any) -> None:
        proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return 0 if proc.wait() in (0, -15, 143) else 1
    finally:
        if proc.poll() is None:
            proc.kill()


# -- config -------------------------------------------------------------------------------------------
def cmd_config(args: argparse.Namespace) -> int:
    from daemon.pipeline.config_docs import effective_toml, example_toml, reference_rows

    if args.action == "example":
        sys.stdout.write(example_toml())
    elif args.action == "check":
        config = _load(args)
        for warning in _check_folders(config):
            print(f"warning: {warning}", file=sys.stderr)
        k = config.kafka
        sasl = f" {k.sasl_mechanism}" if k.security_protocol.startswith("SASL_") else ""
        print(f"ok: {len(config.models)} model(s), broker {k.bootstrap} ({k.security_protocol}{sasl}), "
              f"state {config.state.dir}, ledger {_ledger_shown(config)}, "
              f"registry {config.registry.url or config.registry.dir}")
    elif args.action == "show":
        sys.stdout.write(effective_toml(_load(args)))
    else:
        print("| setting | environment | type | default | unit | meaning |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in reference_rows():
            print(f"| `{r['key']}` | `{r['env']}` | {r['type']} | `{r['default']}` | {r['unit']} | {r['meaning']} |")
    return 0


# -- publish ------------------------------------------------------------------------------------------
def _requests_from_args(args: argparse.Namespace) -> Iterator[tuple[str, bytes]]:
    from daemon.engine.kinds import get_kind

    if args.file:
        path = Path(args.file)
        lines = sys.stdin if args.file == "-" else path.open(encoding="utf-8")
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                model = json.loads(line).get("model")
            except (ValueError, AttributeError):
                model = None
            yield (model or args.model or ""), line.encode()
        return
    if not args.model or not args.ref:
        raise _usage("give --file, or --model with one or more --ref")
    kind = get_kind(args.kind)
    if kind.names_targets and (not args.target or len(args.target) != len(args.ref)):
        raise _usage(f"{kind.name} needs one --target per --ref")
    if kind.names_class and args.forget_class is None:
        raise _usage(f"{kind.name} needs --class")
    from daemon.data.sources import RefError, parse_ref

    for ref in args.ref:   # the form only: the source and the item are the daemon's to check
        try:
            parse_ref(ref)
        except RefError as exc:
            raise _usage(f"--ref {ref!r}: {exc} ({exc.reason}); e.g. mnist-train:12 or photos:cats/001.png") from None
    instances = []
    for i, ref in enumerate(args.ref):
        inst: dict[str, Any] = {"id": f"{args.id_prefix}{ref}", "ref": ref}
        if args.label:
            inst["label"] = args.label[i]
        if kind.names_targets:
            inst["target"] = args.target[i]
        instances.append(inst)
    per_request = instances if args.one_per_request else [instances]
    for j, group in enumerate(per_request):
        body: dict[str, Any] = {
            "schema": "unlearn.request/v1",
            "request_id": (f"{args.request_id}-{j}" if args.one_per_request else args.request_id)
            if args.request_id else f"req-{uuid.uuid4().hex[:12]}",
            "model": args.model, "kind": args.kind,
            "instances": group if isinstance(group, list) else [group],
            "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
        if kind.names_class:
            body["class"] = args.forget_class
        yield args.model, json.dumps(body).encode()


# -- the Kafka connection of publish and receipts ---------------------------------------------------------
_KAFKA_FLAGS = {   # flag -> [kafka] setting; each overrides --config (or the UNLEARND_KAFKA_* environment)
    "--bootstrap": "bootstrap", "--security-protocol": "security_protocol", "--ssl-cafile": "ssl_cafile",
    "--ssl-certfile": "ssl_certfile", "--ssl-keyfile": "ssl_keyfile", "--ssl-password-file": "ssl_password_file",
    "--ssl-crlfile": "ssl_crlfile", "--sasl-mechanism": "sasl_mechanism", "--sasl-username": "sasl_username",
    "--sasl-password-file": "sasl_password_file", "--sasl-oauth-token-file": "sasl_oauth_token_file",
}


def _add_kafka_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", help="read the [kafka] section (broker, topics, TLS, SASL) of this TOML file")
    for flag, key in _KAFKA_FLAGS.items():
        sp.add_argument(flag, dest=f"kafka_{key}", help=f"kafka.{key} (overrides --config)")
    sp.add_argument("--no-ssl-check-hostname", dest="kafka_ssl_check_hostname", action="store_const", const=False,
                    help="kafka.ssl_check_hostname = false")


def _kafka_from_args(args: argparse.Namespace):  # noqa: ANN202 - KafkaSection
    """The [kafka] section of --config (or defaults and UNLEARND_KAFKA_*), with the flags over it, checked: the
    same settings, secrets and checks as the daemon's. Secrets come from files or the environment only
    (UNLEARND_KAFKA_SASL_PASSWORD, UNLEARND_KAFKA_SSL_PASSWORD), never from a flag, which any user could read."""
    import dataclasses

    from daemon.pipeline.config import ConfigError
    from daemon.pipeline.kafka_security import check_security

    section = _load(args).kafka
    given = {key: getattr(args, f"kafka_{key}") for key in (*_KAFKA_FLAGS.values(), "ssl_check_hostname")}
    section = dataclasses.replace(section, **{k: v for k, v in given.items() if v is not None})
    problem = check_security(section)
    if problem is not None:
        raise _usage(f"configuration: {ConfigError(*problem)}")
    return section


def _connect_error(what: str, kafka: Any, exc: Exception, seen: Any = None) -> str:
    """Why a client could not talk to the broker: the error, the last reason kafka-python saw, the SASL in use."""
    hint = f"; last failure: {seen.telling}" if seen is not None and seen.telling else ""
    if kafka.security_protocol.startswith("SASL_"):
        hint += (f" ({kafka.security_protocol}, {kafka.sasl_mechanism}"
                f"{' as ' + repr(kafka.sasl_username) if kafka.sasl_username else ''}: a refused login ends like this "
                f"too)")
    return f"unlearnd {what}: cannot reach {kafka.bootstrap}: {exc}{hint}"


def cmd_publish(args: argparse.Namespace) -> int:
    from daemon.pipeline.kafka_io import explained_bootstrap

    messages = list(_requests_from_args(args))
    kafka = _kafka_from_args(args)
    topic = args.topic or kafka.requests_topic
    with explained_bootstrap() as seen:
        return _publish(kafka, topic, messages, seen)


def _publish(kafka: Any, topic: str, messages: list[tuple[str, bytes]], seen: Any) -> int:
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    from daemon.pipeline.kafka_io import connection_kwargs
    from daemon.pipeline.kafka_security import probe_tls

    try:
        kwargs = connection_kwargs(kafka)
        probe_tls(kafka, 5.0, kwargs.get("ssl_context"))
        wait_ms = kafka.request_timeout_ms            # how long an unreachable or refusing broker is tried
        producer = KafkaProducer(**kwargs, acks="all", linger_ms=5, max_block_ms=wait_ms, bootstrap_timeout_ms=wait_ms)
    except KafkaError as exc:
        print(_connect_error("publish", kafka, exc, seen), file=sys.stderr)
        return 1
    try:
        futures = [producer.send(topic, key=model.encode() if model else None, value=value)
                   for model, value in messages]
        producer.flush(timeout=30)
        for (model, value), fut in zip(messages, futures, strict=True):
            meta = fut.get(timeout=10)
            try:
                rid = json.loads(value).get("request_id")
            except (ValueError, AttributeError):
                rid = None
            print(json.dumps({"request_id": rid, "model": model, "partition": meta.partition,
                              "offset": meta.offset}))
    except KafkaError as exc:
        print(_connect_error("publish", kafka, exc, seen), file=sys.stderr)
        return 1
    finally:
        producer.close(timeout=5)
    return 0


# -- receipts -----------------------------------------------------------------------------------------
def cmd_receipts(args: argparse.Namespace) -> int:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    from daemon.pipeline.kafka_io import connection_kwargs, explained_bootstrap
    from daemon.pipeline.kafka_security import probe_tls

    kafka = _kafka_from_args(args)
    args.topic = args.topic or kafka.receipts_topic
    with explained_bootstrap() as seen:
        try:
            kwargs = connection_kwargs(kafka)
            probe_tls(kafka, 5.0, kwargs.get("ssl_context"))
            consumer = KafkaConsumer(**kwargs, enable_auto_commit=False, auto_offset_reset="earliest",
                                     consumer_timeout_ms=200,
                                     bootstrap_timeout_ms=kafka.request_timeout_ms)
        except KafkaError as exc:
            print(_connect_error("receipts", kafka, exc, seen), file=sys.stderr)
            return 1
    deadline = time.monotonic() + args.timeout if args.timeout else None
    wanted = set(args.request_id or [])
    seen: set[tuple[str, int]] = set()
    shown = 0
    try:
        parts: set[int] = set()
        while not parts:
            parts = consumer.partitions_for_topic(args.topic) or set()
            if not parts:
                if deadline and time.monotonic() > deadline:
                    print(f"unlearnd receipts: topic {args.topic} has no partitions", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        tps = [TopicPartition(args.topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        if not args.from_beginning:
            consumer.seek_to_end(*tps)
        while True:
            for rec in consumer:
                try:
                    receipt = json.loads(rec.value)
                except ValueError:
                    continue
                entry = (receipt.get("request_id"), (receipt.get("audit") or {}).get("entry"))
                if entry in seen:          # the outbox may publish a receipt twice after a crash
                    continue
                seen.add(entry)
                if wanted and receipt.get("request_id") not in wanted:
                    continue
                print(json.dumps(receipt) if args.json else _receipt_line(receipt), flush=True)
                shown += 1
                if args.count and shown >= args.count:
                    return 0
            if deadline and time.monotonic() > deadline:
                return 0 if not args.count else 1
    except KeyboardInterrupt:
        return 0
    finally:
        consumer.close()


def _receipt_line(r: dict[str, Any]) -> str:
    bits = [f"{r.get('request_id')}: {r.get('status')}"]
    if r.get("model_version") is not None and r.get("status") in ("applied", "exact"):
        bits.append(f"{r.get('model')} v{r.get('previous_version')} -> v{r.get('model_version')}")
    if r.get("status") == "exact":
        bits.append(f"rebase {r.get('rebase_id')}")
    for inst in r.get("instances") or []:
        digest = str(inst.get("id_hmac") or inst.get("id_sha256") or "?")[:8]     # keyed (issue 23) or plain
        if "rebase" in inst:        # an exact receipt: what the rebase did with the instance
            bits.append(f"{digest} {inst['rebase']}")
        else:
            bits.append(f"{digest} {inst['prediction_before']}->{inst['prediction_after']}")
    if r.get("reason"):
        bits.append(f"reason: {r['reason']}")
    if (r.get("timings") or {}).get("time_to_forget_s") is not None:
        bits.append(f"{r['timings']['time_to_forget_s']:.1f}s")
    return "  ".join(bits)


# -- audit --------------------------------------------------------------------------------------------
def cmd_audit(args: argparse.Namespace) -> int:
    from daemon.pipeline.ledger import Ledger, LedgerError

    if args.action == "membership":
        from daemon.pipeline.audit_membership import cmd_audit_membership

        if not args.config:
            raise _usage("audit membership needs --config (the daemon's: its models, sources and registry)")
        return cmd_audit_membership(args, _load(args))
    if args.state_dir:
        target = str(Path(args.state_dir) / "ledger.sqlite")
    else:
        config = _load(args)
        target = config.state.ledger_target()
        if config.state.url:
            _check_folders(config)                      # an unreachable database: exit 2 naming state.url
    if "://" not in target and not Path(target).is_file():
        raise _usage(f"no ledger at {target}")
    try:
        ledger = Ledger(target)
    except LedgerError as exc:
        print(f"unlearnd audit: {exc}", file=sys.stderr)
        return 1
    try:
        count, problem = ledger.verify_audit()
    finally:
        ledger.close()
    if problem is not None:
        print(f"audit trail BROKEN at entry {problem.entry}: {problem.reason} ({count} entries verified before it)")
        return 1
    print(f"audit trail ok: {count} entries, hash chain intact")
    return 0


# -- rebase -------------------------------------------------------------------------------------------
def cmd_rebase(args: argparse.Namespace) -> int:
    """Ask the running daemon for an exact rebase of one model: a row in its ledger, which the daemon polls.

    No broker is needed (the ledger is the SQLite file the daemon shares by WAL, or its PostgreSQL database at
    state.url); a rebase already waiting or running is reported, not doubled.
    """
    from daemon.pipeline.ledger import Ledger, LedgerError

    config = _load(args)
    section = config.model(args.model)
    if section is None:
        raise _usage(f"--model: unknown model {args.model!r} (configured: {', '.join(m.name for m in config.models)})")
    if not section.rebase.enabled():
        index = config.models.index(section)
        raise _usage(f"models[{index}].rebase.source: model {args.model!r} names no training source, so it cannot "
                     f"be rebased (set [models.rebase] source)")
    try:
        ledger = Ledger(config.state.ledger_target())
    except LedgerError as exc:
        print(f"unlearnd rebase: {exc}", file=sys.stderr)
        return 1
    try:
        rebase_id, new = ledger.request_rebase(args.model, "on_demand")
    finally:
        ledger.close()
    if new:
        print(f"{rebase_id}: rebase of {args.model} requested; the daemon starts it within a second "
              f"(its log says rebase_started, rebase_committed or rebase_failed)")
    else:
        print(f"{rebase_id}: a rebase of {args.model} is already waiting or running")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from daemon.pipeline.quickstart import run_quickstart

    return run_quickstart(Path(args.dir), broker_port=args.broker_port, serve_port=args.serve_port)


def add_commands(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    """Register this layer's subcommands on the top-level parser."""
    from daemon.engine.kinds import KINDS, ForgetInstances
    from daemon.pipeline.broker import DEFAULT_PORT

    sp = sub.add_parser("run", help="run the daemon (Kafka requests in, unlearned versions out)")
    sp.add_argument("--config", help="TOML file (defaults and UNLEARND_* environment when omitted)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu) on 127.0.0.1")
    sp.add_argument("--port", type=int, default=DEFAULT_PORT)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--storage", default="memory://tansu/",
                    help="Tansu storage engine: memory://tansu/ (default; lost on stop) or s3://BUCKET/ (durable: "
                         "an S3 endpoint from AWS_ENDPOINT, AWS_ACCESS_KEY_ID...; this build of Tansu has no "
                         "sqlite, file or postgres engine)")
    sp.set_defaults(func=cmd_broker)

    sp = sub.add_parser("config", help="print an example configuration, check one, show the one in force (secrets "
                                       "as ***), or list every setting")
    sp.add_argument("action", choices=("example", "check", "show", "reference"))
    sp.add_argument("--config")
    sp.set_defaults(func=cmd_config)

    sp = sub.add_parser("publish", help="send forget requests (from arguments or a JSONL file)")
    _add_kafka_flags(sp)
    sp.add_argument("--topic", help="default: kafka.requests_topic (unlearn.requests)")
    sp.add_argument("--file", help="JSONL of request objects ('-' for standard input)")
    sp.add_argument("--model")
    sp.add_argument("--kind", default=ForgetInstances.name, choices=tuple(KINDS))
    sp.add_argument("--ref", action="append", help="an instance by ref: <source>:<index> (mnist-train:12) or, "
                                                 "in a folder source, <source>:<path> (photos:cats/001.png) (repeat)")
    sp.add_argument("--label", action="append", type=int, help="label per --ref (default: model's prediction)")
    sp.add_argument("--target", action="append", type=int, help="relabel target per --ref")
    sp.add_argument("--class", dest="forget_class", type=int)
    sp.add_argument("--request-id")
    sp.add_argument("--id-prefix", default="cli/", help="instance ids are this prefix + the ref")
    sp.add_argument("--one-per-request", action="store_true", help="one request per --ref")
    sp.set_defaults(func=cmd_publish)

    sp = sub.add_parser("receipts", help="follow the receipts topic")
    _add_kafka_flags(sp)
    sp.add_argument("--topic", help="default: kafka.receipts_topic (unlearn.receipts)")
    sp.add_argument("--from-beginning", action="store_true")
    sp.add_argument("--request-id", action="append", help="only these requests (repeat)")
    sp.add_argument("--count", type=int, default=0, help="stop after this many receipts")
    sp.add_argument("--timeout", type=float, default=0, help="stop after this many seconds")
    sp.add_argument("--json", action="store_true", help="print whole receipts as JSON lines")
    sp.set_defaults(func=cmd_receipts)

    sp = sub.add_parser("quickstart", help="broker + daemon + demo model + server + demo requests (make run)")
    sp.add_argument("--dir", default="var/demo")
    sp.add_argument("--broker-port", type=int, default=DEFAULT_PORT)
    sp.add_argument("--serve-port", type=int, default=8000)
    sp.set_defaults(func=cmd_quickstart)

    sp = sub.add_parser("rebase", help="ask the running daemon for an exact rebase of a model ([models.rebase])")
    sp.add_argument("--config", required=True)
    sp.add_argument("--model", required=True)
    sp.set_defaults(func=cmd_rebase)

    sp = sub.add_parser("audit", help="verify the hash-chained audit trail of receipts (verify), or how member-like "
                                      "named instances look to a version (membership)")
    sp.add_argument("action", choices=("verify", "membership"))
    sp.add_argument("--config")
    sp.add_argument("--state-dir")
    from daemon.pipeline.audit_membership import add_arguments

    add_arguments(sp)
    sp.set_defaults(func=cmd_audit)
