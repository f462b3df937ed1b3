"""The daemon's configuration: one TOML file, every setting overridable from the environment.

The schema is declared once, as dataclasses whose fields carry their documentation and unit; the
example file (``unlearnd config example``), the reference in the docs and the validation all come
from it, so they cannot drift apart.

Environment overrides are named ``UNLEARND_<SECTION>_<KEY>`` (``UNLEARND_KAFKA_BOOTSTRAP``,
``UNLEARND_STATE_DIR``, ``UNLEARND_REGISTRY_DIR``, ...); the models are a TOML array, overridden per
index: ``UNLEARND_MODELS_0_PROBE``, and so are a model's sources (``[[models.sources]]``):
``UNLEARND_MODELS_0_SOURCES_1_PATH``. An override is parsed as its setting's type (lists are
comma-separated), and wins over the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.cpu_policy import POLICIES
from daemon.data.sources import KNOWN_DATASETS, check_source_name
from daemon.engine.config import PRESETS, parse_settings
from daemon.engine.importance import ACCUMULATIONS
from daemon.engine.kinds import GOALS
from daemon.engine.methods import METHODS
from daemon.pipeline.kafka_security import MECHANISMS, PROTOCOLS, check_security

__all__ = [
    "ENV_PREFIX",
    "SECTIONS",
    "Config",
    "ConfigError",
    "DaemonSection",
    "KafkaSection",
    "KeysSection",
    "LimitsSection",
    "LogSection",
    "MetricsSection",
    "ModelSection",
    "RebaseSection",
    "RegistrySection",
    "RoundsSection",
    "ServingSection",
    "SourceSection",
    "StateSection",
    "load_config",
    "parse_rebase_source",
]

ENV_PREFIX = "UNLEARND"
#: the choices come from the registries that define them: a method added to the engine is a setting at once
_ROUND_METHODS = tuple(name for name, m in METHODS.items() if not m.oracle)   # an oracle never runs in a round


class ConfigError(ValueError):
    """A setting is missing, mistyped or out of range; ``setting`` names it (``rounds.max_wait_s``)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


def _opt(default: Any, doc: str, unit: str = "", *, minimum: float | None = None, below: float | None = None,
         choices: tuple[str, ...] | None = None) -> Any:
    meta = {"doc": doc, "unit": unit, "minimum": minimum, "below": below, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _secret(doc: str) -> Any:
    """A secret: never in the TOML file (refused there), never in a repr or ``config show``."""
    meta = {"doc": doc, "unit": "", "minimum": None, "below": None, "choices": None, "secret": True}
    return field(default="", repr=False, metadata=meta)


@dataclass(frozen=True)
class KafkaSection:
    """Where requests come from and receipts go."""

    bootstrap: str = _opt("127.0.0.1:19092", "Kafka bootstrap servers, comma-separated host:port")
    group_id: str = _opt("unlearnd", "consumer group; daemons in one group share the models by partition")
    instance_id: str = _opt("unlearnd-1", "static group membership id (group.instance.id); unique per daemon")
    static_membership: bool = _opt(True, "join the group as a static member (instance_id as group.instance.id): a "
                                   "restart keeps its partitions; false for daemons on several hosts, so a crashed "
                                   "daemon's partitions go to the others after the session timeout "
                                   "(docs/operations.md)")
    requests_topic: str = _opt("unlearn.requests", "topic the forget requests arrive on")
    receipts_topic: str = _opt("unlearn.receipts", "topic receipts are published to")
    dlq_topic: str = _opt("unlearn.dlq", "dead-letter topic for messages that cannot be decoded or validated")
    models_topic: str = _opt("unlearn.models", "topic announcing each durable model version")
    create_topics: bool = _opt(True, "create missing topics at start-up")
    partitions: int = _opt(4, "partitions of the requests topic when the daemon creates it", minimum=1)
    session_timeout_ms: int = _opt(6000, "consumer session timeout; each group join takes about half of it",
                                   "ms", minimum=1000)
    heartbeat_interval_ms: int = _opt(1000, "consumer heartbeat interval", "ms", minimum=100)
    max_poll_interval_ms: int = _opt(300000, "longest gap between polls before the group evicts the daemon",
                                     "ms", minimum=1000)
    poll_timeout_ms: int = _opt(200, "how long one poll waits for records", "ms", minimum=1)
    max_poll_records: int = _opt(500, "records fetched per poll at most", minimum=1)
    startup_wait_s: float = _opt(60.0, "how long start-up waits for an unreachable broker before exiting 1",
                                 "s", minimum=0)
    request_timeout_ms: int = _opt(10000, "timeout of one broker request (producer and admin)", "ms",
                                   minimum=1000)
    security_protocol: str = _opt("PLAINTEXT", "how clients reach the broker: TLS (SSL), SASL authentication, or "
                                  "both (SASL_SSL)", choices=PROTOCOLS)
    ssl_cafile: str = _opt("", "PEM file of the CA(s) the broker's certificate must chain to (empty: the system's)")
    ssl_certfile: str = _opt("", "client certificate (PEM) for mutual TLS")
    ssl_keyfile: str = _opt("", "the client certificate's private key (PEM; empty: inside ssl_certfile)")
    ssl_password: str = _secret("the client key's password; only from the environment (UNLEARND_KAFKA_SSL_PASSWORD)")
    ssl_password_file: str = _opt("", "file holding the client key's password")
    ssl_check_hostname: bool = _opt(True, "check that the broker's certificate names the host connected to")
    ssl_crlfile: str = _opt("", "PEM certificate revocation list checked against the broker's certificate")
    sasl_mechanism: str = _opt("", "SASL mechanism (with SASL_PLAINTEXT or SASL_SSL)", choices=MECHANISMS)
    sasl_username: str = _opt("", "SASL user (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)")
    sasl_password: str = _secret("the SASL password; only from the environment (UNLEARND_KAFKA_SASL_PASSWORD)")
    sasl_password_file: str = _opt("", "file holding the SASL password")
    sasl_oauth_token_file: str = _opt("", "OAUTHBEARER: file holding the token, re-read at each connection (rotation)")


@dataclass(frozen=True)
class StateSection:
    """The daemon's own durable state."""

    dir: str = _opt("var/state", "folder of the ledger (SQLite, WAL; unless state.url names a database), the "
                                 "audit trail and the keys")
    url: str = _opt("", "the ledger's database: empty = SQLite in state.dir (embedded); postgresql://user@host:port/db "
                        "= PostgreSQL (the password from PGPASSWORD or ~/.pgpass, never in the URL)")
    wait_s: float = _opt(30.0, "PostgreSQL: how long `unlearnd run` waits at start-up for a server it cannot reach (a "
                               "restart, a failover) before it gives up with exit 2; a running daemon waits out an "
                               "outage for as long as it lasts", "s", minimum=0)

    def ledger_target(self) -> str:
        """What :class:`daemon.pipeline.ledger.Ledger` opens: the PostgreSQL URL, else the SQLite file in ``dir``."""
        return self.url or str(Path(self.dir) / "ledger.sqlite")


@dataclass(frozen=True)
class RegistrySection:
    """The model registry (contract §4), shared with the servers."""

    dir: str = _opt("var/registry", "registry root: <dir>/<model>/<version>/...; with an s3:// url, the local "
                                    "working copy the bucket mirrors")
    url: str = _opt("", "where the registry is published: empty = registry.dir alone; file:///path = that folder "
                        "(in place of registry.dir); s3://bucket/prefix = object storage, each version pushed there "
                        "before its round commits (credentials from boto3's chain: AWS_* env, ~/.aws, an IAM role; "
                        "never here)")
    endpoint_url: str = _opt("", "the S3 endpoint for an s3:// url (MinIO, Ceph, moto: http://host:port; empty: "
                                 "AWS's)")
    region: str = _opt("", "the bucket's region for an s3:// url (empty: AWS_DEFAULT_REGION, else us-east-1)")
    keep_versions: int = _opt(0, "versions to keep per model (0 keeps all); LATEST and served ones are kept",
                              minimum=0)


@dataclass(frozen=True)
class RoundsSection:
    """How requests are batched into unlearning rounds and how a round is run."""

    max_instances: int = _opt(64, "close a round once it holds this many instances", minimum=1)
    max_wait_s: float = _opt(2.0, "close a round this long after its first request arrived", "s", minimum=0)
    method: str = _opt("adv_imp", "unlearning method (the baselines neggrad, random_label and boundary_shrink run at "
                       "their own step size in the default preset)",
                       choices=_ROUND_METHODS)
    preset: str = _opt("default", "engine preset", choices=tuple(PRESETS))
    accumulation: str = _opt("max", "how weight importance accumulates across rounds", choices=ACCUMULATIONS)
    memory_energy: float = _opt(0.99999, "subspace memory across rounds: share of each round's input energy "
                                         "(per layer, on its instances) later rounds leave untouched; near 1 "
                                         "keeps forgotten instances forgotten (0: off)", "ratio", minimum=0, below=1)
    memory_copies: int = _opt(0, "affine copies of each instance the subspace memory also protects", minimum=0)
    held_impressions: int = _opt(0, "class impressions of the model held beside each round's own examples "
                                    "(data-free anchors over every class; for rounds of one or a few "
                                    "instances; 0: the preset's)", minimum=0)
    device: str = _opt("cpu", "torch device of the engine (cpu, cuda, cuda:N)")
    threads: int = _opt(0, "torch intra-op threads (0: torch's default)", minimum=0)
    cpu_policy: str = _opt("normal", "CPU scheduling of the rounds and publishes (their thread and torch's "
                                     "workers): normal; batch; idle, only on CPU nothing else wants (Linux), for "
                                     "a daemon that shares its host with servers", choices=POLICIES)
    retention_max_drop: float = _opt(0.02, "the retention gate: largest allowed fall of probe accuracy "
                                           "below the original model's", "ratio", minimum=0)
    split_failed: bool = _opt(True, "retry a failed round of several requests as two rounds of half its requests "
                                    "(again while one fails), so a request that cannot be unlearned fails alone "
                                    "and the others are applied")
    grace_period_s: float = _opt(30.0, "on SIGTERM, how long a running round may take to finish before "
                                       "it is aborted", "s", minimum=0)


@dataclass(frozen=True)
class LimitsSection:
    """Bounds on what one message may ask."""

    max_instances: int = _opt(256, "instances per request at most", minimum=1)
    max_message_bytes: int = _opt(1 << 20, "size of one request message at most", "bytes", minimum=1024)


@dataclass(frozen=True)
class MetricsSection:
    """The Prometheus endpoint."""

    host: str = _opt("127.0.0.1", "address /metrics listens on")
    port: int = _opt(9464, "port /metrics listens on (0 disables it)", minimum=0)
    token_file: str = _opt("", "file of the bearer token scrapes must send (401 without it); empty: none")
    tls_cert_file: str = _opt("", "serve /metrics over HTTPS with this certificate chain (PEM); empty: plain HTTP")
    tls_key_file: str = _opt("", "the certificate's private key (PEM)")
    tls_client_ca_file: str = _opt("", "mutual TLS: scrapers need a client certificate signed by this CA")


@dataclass(frozen=True)
class ServingSection:
    """What the daemon tells servers after a publish."""

    notify_urls: list[str] = _opt([], "reload URLs called after each publish "
                                      "(POST /v2/repository/models/{name}/load; {name} is filled in)")
    notify_timeout_s: float = _opt(2.0, "timeout of one notify call", "s", minimum=0)
    notify_token_file: str = _opt("", "file of the servers' bearer token (serve --token-file) sent with each notify")
    notify_ca_file: str = _opt("", "CA of the servers' certificates for https:// notify URLs (empty: the system's)")


@dataclass(frozen=True)
class LogSection:
    """Structured logs (structlog) on standard error."""

    level: str = _opt("info", "lowest level logged", choices=("debug", "info", "warning", "error"))
    format: str = _opt("json", "json for machines, console for people", choices=("json", "console"))


@dataclass(frozen=True)
class DaemonSection:
    """Process-wide behaviour."""

    outbox_interval_s: float = _opt(0.5, "how often unacknowledged receipts are retried", "s", minimum=0.01)
    stranded_after_s: float = _opt(30.0, "how long an accepted request that the broker can no longer redeliver "
                                         "(its round lost with the daemon, its message lost with the broker) "
                                         "waits before its failed receipt tells the publisher to resubmit it",
                                   "s", minimum=0)


@dataclass(frozen=True)
class KeysSection:
    """The daemon's secrets at rest (issue 23): a key file holds 64 hex characters (openssl rand -hex 32)."""

    state_key_file: str = _opt("", "AES-256-GCM key that seals each version's continual state (session files) in "
                               "the registry, so a server cannot read which instances a round forgot; every "
                               "daemon resuming a model needs the key that sealed it. Empty: "
                               "<state.dir>/keys/state.key, made (mode 0600) on first start")
    id_key_file: str = _opt("", "HMAC-SHA256 key of instance ids (receipts, ledger) and content hashes (rebase "
                            "exclusion); a ledger keeps the one it was first opened with. Empty: "
                            "<state.dir>/keys/id.key, made (mode 0600) on first start")

    def state_key_path(self, state_dir: str) -> tuple[Path, bool]:
        """The state key's file, and True when it is the default one (made when missing)."""
        return (Path(self.state_key_file), False) if self.state_key_file else (Path(state_dir) / "keys" /
                                                                               "state.key", True)

    def id_key_path(self, state_dir: str) -> tuple[Path, bool]:
        """The id key's file, and True when it is the default one (made when missing)."""
        return (Path(self.id_key_file), False) if self.id_key_file else (Path(state_dir) / "keys" / "id.key", True)


SOURCE_KINDS = ("builtin", "folder", "array")


@dataclass(frozen=True)
class SourceSection:
    """One source the model's refs may name and its probe may come from ([[models.sources]] in the file)."""

    kind: str = _opt("builtin", "builtin: a dataset's <dataset>-train and <dataset>-test; folder: class subfolders "
                     "of images (as torchvision's ImageFolder), refs by index or by path (photos:cats/001.png); "
                     "array: an .npz (uncompressed, np.savez) or .safetensors file holding images and labels",
                     choices=SOURCE_KINDS)
    name: str = _opt("", "the source's name in refs (folder and array; a builtin's names come from its dataset)")
    path: str = _opt("", "the folder (folder) or the file (array)")
    dataset: str = _opt("mnist", "the built-in dataset (builtin)", choices=KNOWN_DATASETS)
    data_root: str = _opt("", "folder holding cifar-10-batches-py (builtin cifar10 only)")
    resize: bool = _opt(False, "resize folder images to the model's H×W (bilinear); otherwise an image of "
                               "another size is rejected per request (wrong_shape)")

    def names(self) -> tuple[str, ...]:
        """The ref source names this entry brings."""
        return (f"{self.dataset}-train", f"{self.dataset}-test") if self.kind == "builtin" else (self.name,)


@dataclass(frozen=True)
class RebaseSection:
    """Exact rebases: retrain from scratch on the training source minus every forgotten instance ([models.rebase]).

    Off unless ``source`` is set. With it, ``unlearnd rebase`` asks for one, and each policy setting that is not 0
    schedules one by itself.
    """

    source: str = _opt("", "the training set: one of the model's sources by name (mnist-train), or a slice of one "
                           "(<source>:<start>-<end>, inclusive); empty: no rebases")
    epochs: int = _opt(2, "the recipe: epochs of unlearnd's training (one-cycle Adam, seed 0, as pretrain), from "
                          "freshly initialised weights of the model's own factory", minimum=1)
    every_deletions: int = _opt(0, "rebase after this many instances were forgotten since the last rebase "
                                   "(0: off)", minimum=0)
    probe_margin: float = _opt(0.0, "rebase once the probe accuracy is within this of the retention gate's floor "
                                    "(0: off)", "ratio", minimum=0, below=1)
    memory_fill: float = _opt(0.0, "rebase once every layer of the continual memory is filled this far (1 - "
                                   "unlearnd_memory_free_ratio: the roomiest layer's fill; 0: off)", "ratio",
                              minimum=0)

    def enabled(self) -> bool:
        return bool(self.source)


@dataclass(frozen=True)
class ModelSection:
    """One live model this daemon owns ([[models]] in the file)."""

    name: str = _opt("mnist-cnn", "model name: the registry folder and the requests' key")
    dataset: str = _opt("mnist", "shorthand for one builtin source: the dataset whose <dataset>-train and "
                                 "<dataset>-test refs may name (default mnist, none when [[models.sources]] is "
                                 "given and dataset is not)", choices=KNOWN_DATASETS)
    data_root: str = _opt("", "folder holding cifar-10-batches-py (cifar10 only)")
    probe: str = _opt("mnist-test:0-1999", "the operator's probe set: <source>:<start>-<end> (inclusive), "
                                           "or <source>:all")
    pretrain_epochs: int = _opt(0, "train the model if the registry has none (0: refuse to start instead; "
                                   "built-in datasets only)", minimum=0)
    settings: list[str] = _opt([], "engine settings for this model's rounds, KEY=VALUE over the preset's (e.g. "
                                   "lr=3e-5): a classifier unlike the one the preset was measured on may need its "
                                   "own step size (benchmarks/results/byo.md)")
    goal: str = _opt("misclassify", "what a forget request asks when it names no goal (contract §2): misclassify "
                                    "(the zero rule) or unseen (stop once its instances look like the probe set's "
                                    "held-out data; docs/operations.md, membership evidence)", choices=GOALS)
    references: str = _opt("", "a folder of reference models for the membership check (docs/operations.md): "
                               "state dicts of this model's architecture trained without the instances (e.g. "
                               "on random halves of the training set), each <name>.safetensors with an optional "
                               "<name>.idx.npy of the references_source indices it trained on; empty: the probe "
                               "check")
    references_source: str = _opt("", "the source the references' .idx.npy files number (one of the model's, "
                                      "e.g. mnist-train)")
    head: str = _opt("", "the classifier head, as the model's own named_modules() names it (e.g. heads.head); "
                         "must agree with the one unlearnd import recorded (empty: that one, else found by "
                         "output width)")
    sources: list[SourceSection] = field(default_factory=list, metadata={
        "doc": "the sources refs may name, besides dataset's ([[models.sources]])", "unit": "",
        "minimum": None, "below": None, "choices": None})
    rebase: RebaseSection = field(default_factory=RebaseSection, metadata={
        "doc": "exact rebases ([models.rebase])", "unit": "", "minimum": None, "below": None, "choices": None})

    def round_settings(self) -> dict[str, Any]:
        """``settings`` as overrides of the engine preset; ValueError naming an unknown setting or a value of
        the wrong kind."""
        out = parse_settings(self.settings)
        PRESETS["default"].with_overrides(**out)      # unknown names and values of the wrong kind are refused here
        if out.get("stop") == "unseen":               # it would reach relabel and forget_class rounds too
            raise ValueError('stop=unseen is a goal: set goal = "unseen" (it applies to forget rounds only)')
        return out

    def source_sections(self) -> list[SourceSection]:
        """Every source entry: the dataset shorthand (when set) first, then [[models.sources]]."""
        shorthand = [SourceSection(kind="builtin", dataset=self.dataset, data_root=self.data_root)]
        return (shorthand if self.dataset else []) + list(self.sources)


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    kafka: KafkaSection = field(default_factory=KafkaSection)
    state: StateSection = field(default_factory=StateSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    serving: ServingSection = field(default_factory=ServingSection)
    log: LogSection = field(default_factory=LogSection)
    daemon: DaemonSection = field(default_factory=DaemonSection)
    keys: KeysSection = field(default_factory=KeysSection)
    models: list[ModelSection] = field(default_factory=lambda: [ModelSection()])

    def model(self, name: str) -> ModelSection | None:
        return next((m for m in self.models if m.name == name), None)


SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__  # type: ignore[misc]
                              for f in dataclasses.fields(Config) if f.name != "models"}
_PROBE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*):([0-9]+)-([0-9]+)$")
_WHOLE_PROBE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*):all$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def parse_probe(spec: str) -> tuple[str, int, int | None]:
    """``"mnist-test:0-1999"`` -> (source, start, end_exclusive); ``"photos:all"`` -> (source, 0, None)."""
    whole = _WHOLE_PROBE.match(spec)
    if whole:
        return whole.group(1), 0, None
    m = _PROBE.match(spec)
    if not m or int(m.group(3)) < int(m.group(2)):
        raise ValueError(f"probe must look like <source>:<start>-<end> with end >= start, or <source>:all, "
                         f"got {spec!r}")
    return m.group(1), int(m.group(2)), int(m.group(3)) + 1


# -- parsing -------------------------------------------------------------------------------------------
def _convert(setting: str, f: dataclasses.Field, value: Any, from_env: bool) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    meta = f.metadata
    try:
        if kind == "bool":
            if from_env:
                low = str(value).strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"expected a boolean, got {value!r}")
                value = low in ("1", "true", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError(f"expected a boolean, got {value!r}")
        elif kind == "int":
            if isinstance(value, bool) or (not from_env and not isinstance(value, int)):
                raise ValueError(f"expected an integer, got {value!r}")
            value = int(value)
        elif kind == "float":
            if isinstance(value, bool) or (not from_env and not isinstance(value, (int, float))):
                raise ValueError(f"expected a number, got {value!r}")
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError("expected a finite number")
        elif kind == "list[str]":
            if from_env:
                value = [v.strip() for v in str(value).split(",") if v.strip()]
            elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"expected a list of strings, got {value!r}")
        else:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
    except ValueError as exc:
        raise ConfigError(setting, str(exc)) from None
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ConfigError(setting, f"must be >= {meta['minimum']}, got {value!r}")
    if meta.get("below") is not None and not value < meta["below"]:
        raise ConfigError(setting, f"must be < {meta['below']}, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(setting, f"must be one of {', '.join(c or repr(c) for c in meta['choices'])}, got {value!r}")
    return value


def _build(cls: type, prefix: str, table: Mapping[str, Any], env: Mapping[str, str], env_prefix: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(prefix, f"must be a table, got {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown setting (known: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        setting = f"{prefix}.{name}"
        env_name = f"{env_prefix}_{name.upper()}"
        if f.type == "list[SourceSection]":
            values[name] = _build_sources(setting, table.get(name, []), env, env_name)
        elif f.type == "RebaseSection":
            values[name] = _build(RebaseSection, setting, table.get(name, {}), env, env_name)
        elif f.metadata.get("secret") and name in table:
            raise ConfigError(setting, f"a secret is never read from the file: set {env_name} or {setting}_file")
        elif env_name in env:
            values[name] = _convert(f"{setting} (from {env_name})", f, env[env_name], True)
        elif name in table:
            values[name] = _convert(setting, f, table[name], False)
    return cls(**values)


def _build_sources(setting: str, raw: Any, env: Mapping[str, str], env_prefix: str) -> list[SourceSection]:
    if not isinstance(raw, list):
        raise ConfigError(setting, "must be an array of tables ([[models.sources]])")
    return [_build(SourceSection, f"{setting}[{j}]", t, env, f"{env_prefix}_{j}") for j, t in enumerate(raw)]


def _build_model(i: int, table: Any, env: Mapping[str, str]) -> ModelSection:
    """A [[models]] table; listing sources and no dataset means no built-in dataset."""
    prefix = f"{ENV_PREFIX}_MODELS_{i}"
    model = _build(ModelSection, f"models[{i}]", table, env, prefix)
    if model.sources and "dataset" not in table and f"{prefix}_DATASET" not in env:
        model = dataclasses.replace(model, dataset="")
    return model


def load_config(path: Path | str | None, env: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (or only defaults when ``path`` is None), apply the environment, validate."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(SECTIONS) - {"models"})
    if unknown:
        raise ConfigError(unknown[0], f"unknown section (known: {', '.join([*SECTIONS, 'models'])})")
    sections = {name: _build(cls, name, data.get(name, {}), env, f"{ENV_PREFIX}_{name.upper()}")
                for name, cls in SECTIONS.items()}
    raw_models = data.get("models", [{}]) if path is None or "models" in data else []
    if not isinstance(raw_models, list):
        raise ConfigError("models", "must be an array of tables ([[models]])")
    models = [_build_model(i, t, env) for i, t in enumerate(raw_models)]
    config = Config(**sections, models=models)
    _check(config)
    return config


def _check(config: Config) -> None:
    topics = [config.kafka.requests_topic, config.kafka.receipts_topic, config.kafka.dlq_topic,
              config.kafka.models_topic]
    if len(set(topics)) != len(topics):
        raise ConfigError("kafka", "the four topics must have distinct names")
    if config.kafka.heartbeat_interval_ms * 3 > config.kafka.session_timeout_ms:
        raise ConfigError("kafka.heartbeat_interval_ms", "must be at most a third of kafka.session_timeout_ms")
    problem = check_security(config.kafka)
    if problem is not None:
        raise ConfigError(*problem)
    if not config.models:
        raise ConfigError("models", "at least one [[models]] table is needed")
    seen: set[str] = set()
    for i, m in enumerate(config.models):
        if not _MODEL_NAME.match(m.name):
            raise ConfigError(f"models[{i}].name", f"must be a plain name (letters, digits, . _ -), got {m.name!r}")
        if m.name in seen:
            raise ConfigError(f"models[{i}].name", f"model {m.name!r} is listed twice")
        seen.add(m.name)
        _check_model_sources(i, m)
        try:
            m.round_settings()
        except ValueError as exc:
            raise ConfigError(f"models[{i}].settings", str(exc)) from None
    from daemon.pipeline.config_checks import check_values      # it imports this module

    check_values(config)


def _check_model_sources(i: int, m: ModelSection) -> None:
    """Each source entry has what its kind needs, names are unique, the probe names one of them."""
    names: dict[str, str] = {}
    for j, src in enumerate(m.sources):
        where = f"models[{i}].sources[{j}]"
        if src.kind == "builtin":
            if src.name or src.path:
                raise ConfigError(f"{where}.{'name' if src.name else 'path'}",
                                  f"a builtin source takes no {'name' if src.name else 'path'}: its sources "
                                  f"are {' and '.join(src.names())}")
        else:
            if not check_source_name(src.name):
                raise ConfigError(f"{where}.name", f"a {src.kind} source needs a name of letters, digits, "
                                                   f". _ - (refs say <name>:<index>), got {src.name!r}")
            if not src.path:
                what = "the folder of class folders" if src.kind == "folder" else "the .npz or .safetensors file"
                raise ConfigError(f"{where}.path", f"a {src.kind} source needs a path ({what})")
        if src.resize and src.kind != "folder":
            raise ConfigError(f"{where}.resize", "only a folder source resizes its images")
    entries = [(f"models[{i}].dataset", f"models[{i}].data_root", src) for src in m.source_sections()[:1] if m.dataset]
    entries += [(f"models[{i}].sources[{j}]", f"models[{i}].sources[{j}].data_root", src)
                for j, src in enumerate(m.sources)]
    for where, data_root, src in entries:
        if src.kind == "builtin" and src.dataset == "cifar10" and not src.data_root:
            raise ConfigError(data_root, "cifar10 needs the folder holding cifar-10-batches-py")
        for name in src.names():
            if name in names:
                raise ConfigError(where, f"source {name!r} is already given by {names[name]}")
            names[name] = where
    if not names:
        raise ConfigError(f"models[{i}].sources", "a model needs a source: set dataset or add [[models.sources]]")
    try:
        source = parse_probe(m.probe)[0]
    except ValueError as exc:
        raise ConfigError(f"models[{i}].probe", str(exc)) from None
    if source not in names:
        raise ConfigError(f"models[{i}].probe", f"names source {source!r}, not one of this model's "
                                                f"({', '.join(names)})")
    _check_rebase(i, m, names)
    if m.references_source and m.references_source not in names:
        raise ConfigError(f"models[{i}].references_source", f"unknown source {m.references_source!r}, not one "
                                                            f"of this model's ({', '.join(names)})")
    if m.pretrain_epochs and not any(s.kind == "builtin" for s in m.source_sections()):
        raise ConfigError(f"models[{i}].pretrain_epochs", "pretraining needs a built-in dataset "
                                                          "(set dataset); import or publish the model instead")


def parse_rebase_source(spec: str) -> tuple[str, int, int | None]:
    """``"mnist-train"`` -> (source, 0, None); ``"mnist-train:0-9999"`` -> (source, 0, 10000) (end exclusive)."""
    if ":" not in spec:
        return spec, 0, None
    return parse_probe(spec)


def _check_rebase(i: int, m: ModelSection, names: Mapping[str, str]) -> None:
    """The rebase source is one of the model's; a policy without a source is a mistake, not a silent no-op."""
    r, where = m.rebase, f"models[{i}].rebase"
    if not r.enabled():
        for key in ("every_deletions", "probe_margin", "memory_fill"):
            if getattr(r, key):
                raise ConfigError(f"{where}.{key}", f"a rebase policy needs {where}.source (the training set)")
        return
    try:
        source = parse_rebase_source(r.source)[0]
    except ValueError as exc:
        raise ConfigError(f"{where}.source", str(exc).replace("probe", "a rebase source")) from None
    if source not in names:
        raise ConfigError(f"{where}.source", f"unknown source {source!r}, not one of this model's "
                                             f"({', '.join(names)})")
    if r.memory_fill > 1:
        raise ConfigError(f"{where}.memory_fill", f"a fill is a share, at most 1, got {r.memory_fill!r}")
