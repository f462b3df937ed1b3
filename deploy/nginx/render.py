"""Render ``unlearnd-serve.conf.template`` into an nginx.conf (stdlib only, so it runs where nginx runs).

Why not envsubst: it replaces every ``$name`` it knows, nginx's own ``$binary_remote_addr`` included, and says
nothing about a placeholder left empty. Here only ``${UPPER_CASE}`` placeholders are filled, each must have a
value, and a value for a placeholder the template lacks is refused (a misspelt option would otherwise be lost).

Defaults equal ``unlearnd serve``'s own limits; ``python deploy/nginx/render.py --help`` lists them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().with_name("unlearnd-serve.conf.template")
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")

#: every placeholder with its default (None: must be given)
DEFAULTS: dict[str, str | None] = {
    "PREFIX": None,                       # absolute directory for pid, logs and temp files
    "LISTEN": "127.0.0.1:8080",           # where clients connect
    "LISTEN_OPTIONS": "reuseport",        # one accept queue per worker
    "UPSTREAM": "127.0.0.1:8000",         # `unlearnd serve --host/--port`
    "UPSTREAM_KEEPALIVE": "32",
    "WORKER_PROCESSES": "auto",
    "WORKER_CONNECTIONS": "32768",
    "WORKER_RLIMIT_NOFILE": "65536",
    "BACKLOG": "4096",                    # the kernel caps it at net.core.somaxconn
    "HEADER_TIMEOUT_S": "10",             # serve --header-timeout
    "BODY_TIMEOUT_S": "30",               # serve --body-timeout
    "MAX_BODY_BYTES": str(16 * 1024 * 1024),   # serve --max-body-bytes
    "MAX_HEADER_BYTES": str(64 * 1024),    # serve --max-header-bytes
    "CLIENT_KEY": "$binary_remote_addr",  # what the per-client limits count by; '""' switches them off
    "CONN_PER_CLIENT": "64",              # requests in progress per client address
    "REQ_PER_S": "200",                   # sustained requests per second per client address
    "REQ_BURST": "400",                   # requests over the rate a client may send at once (>= 1)
    "ZONE_SIZE": "10m",                   # shared memory per limit zone (~16,000 addresses per MB)
    "ERROR_LOG_LEVEL": "error",
    "ACCESS_LOG": "off",                  # or e.g. "/srv/unlearnd-nginx/logs/access.log combined buffer=64k"
}


def placeholders(text: str) -> set[str]:
    """The ``${NAME}`` placeholders a template uses."""
    return set(_PLACEHOLDER.findall(text))


def render(values: dict[str, str], text: str | None = None) -> str:
    """The template with every placeholder filled from ``values`` over ``DEFAULTS``.

    Raises ValueError naming the placeholders without a value, or the values the template has no place for.
    """
    text = TEMPLATE.read_text() if text is None else text
    used = placeholders(text)
    unknown = sorted(set(values) - used)
    if unknown:
        raise ValueError(f"the template has no placeholder for {unknown}; it uses {sorted(used)}")
    merged = {k: v for k, v in DEFAULTS.items() if v is not None} | {k: str(v) for k, v in values.items()}
    missing = sorted(used - set(merged))
    if missing:
        raise ValueError(f"no value for {missing} (pass them, e.g. --{missing[0].lower().replace('_', '-')})")
    bad = sorted(k for k in used if any(c in merged[k] for c in ";{}\n"))
    if bad:
        raise ValueError(f"values for {bad} contain ';', '{{', '}}' or a newline, which would change the config")
    return _PLACEHOLDER.sub(lambda m: merged[m.group(1)], text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in DEFAULTS.items():
        p.add_argument("--" + name.lower().replace("_", "-"), dest=name, default=default,
                       required=default is None, help=f"${{{name}}} (default: {default})")
    p.add_argument("--template", type=Path, default=TEMPLATE)
    args = vars(p.parse_args(argv))
    template = args.pop("template").read_text()
    try:
        sys.stdout.write(render(args, template))
    except ValueError as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
