"""The configuration's schema as text: a commented example, the settings in force, and the reference table.

Generated from the section dataclasses of ``daemon.pipeline.config`` (their field docs, units, choices and
environment names), so the example file, ``unlearnd config show`` and docs/configuration.md can never drift from
what the loader accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from daemon.pipeline.config import ENV_PREFIX, SECTIONS, Config, ModelSection, RebaseSection, SourceSection

__all__ = ["effective_toml", "example_toml", "reference_rows"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _describe(f: dataclasses.Field) -> str:
    bits = [f.metadata["doc"]]
    if f.metadata.get("unit"):
        bits.append(f"unit: {f.metadata['unit']}")
    if f.metadata.get("choices"):
        bits.append("one of " + ", ".join(c or '""' for c in f.metadata["choices"]))
    return "; ".join(bits)


def example_toml() -> str:
    """A complete, commented, valid configuration for the embedded defaults (``unlearnd config example``)."""
    out = ["# unlearnd configuration. Every setting has an environment override, named in its comment.", ""]
    default = Config()
    for name, cls in SECTIONS.items():
        out.append(f"[{name}]  # {cls.__doc__}")
        for f in dataclasses.fields(cls):
            out.append(f"# {_describe(f)} (env {ENV_PREFIX}_{name.upper()}_{f.name.upper()})")
            if f.metadata.get("secret"):   # refused in the file: commented out, the comment names the way in
                out.append(f'# {f.name} = "..."   (never here: {ENV_PREFIX}_{name.upper()}_{f.name.upper()} or '
                           f'{f.name}_file)')
                continue
            out.append(f"{f.name} = {_toml_value(getattr(getattr(default, name), f.name))}")
        out.append("")
    for i, model in enumerate(default.models):
        out.append(f"[[models]]  # {ModelSection.__doc__}")
        for f in dataclasses.fields(ModelSection):
            if f.name in ("sources", "rebase"):
                continue
            comment = f"# {_describe(f)} (env {ENV_PREFIX}_MODELS_{i}_{f.name.upper()})"
            value = getattr(model, f.name)
            if f.name == "pretrain_epochs":
                value = 2   # the demo model is trained on first run, then cached in the registry
            if f.name in ("dataset", "data_root"):   # the shorthand: this example lists its source instead
                out += [comment, f"# {f.name} = {_toml_value(value)}"]
                continue
            out += [comment, f"{f.name} = {_toml_value(value)}"]
        out += ["", f"[[models.sources]]  # {SourceSection.__doc__}"]
        for f in dataclasses.fields(SourceSection):
            out.append(f"# {_describe(f)} (env {ENV_PREFIX}_MODELS_{i}_SOURCES_0_{f.name.upper()})")
            out.append(f"{f.name} = {_toml_value(getattr(SourceSection(), f.name))}")
        out += ["", f"[models.rebase]  # {RebaseSection.__doc__.splitlines()[0]}"]
        for f in dataclasses.fields(RebaseSection):
            out.append(f"# {_describe(f)} (env {ENV_PREFIX}_MODELS_{i}_REBASE_{f.name.upper()})")
            out.append(f"{f.name} = {_toml_value(getattr(RebaseSection(), f.name))}")
        out += ["", "# Your own data, e.g.:", "# [[models.sources]]", '# kind = "folder"', '# name = "photos"',
                '# path = "/data/photos"      # /data/photos/<class>/<file>.png; refs: photos:12, photos:cats/001.png',
                "# [[models.sources]]", '# kind = "array"', '# name = "scans"',
                '# path = "/data/scans.npz"   # images and labels; refs: scans:12']
    return "\n".join(out) + "\n"


def effective_toml(config: Config) -> str:
    """The configuration in force (file, environment and defaults together) as TOML, secrets shown as ``***``
    (``unlearnd config show``): what the daemon will run with, safe to paste into a ticket."""
    def table(header: str, obj: Any) -> list[str]:
        lines = [header]
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in ("sources", "rebase"):
                continue
            if f.metadata.get("secret"):   # a comment: the output stays a loadable file (secrets are refused in one)
                lines.append(f"# {f.name} = {'***' if value else '(not set)'}  (secret: from the environment only)")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        return lines + [""]

    out: list[str] = []
    for name in SECTIONS:
        out += table(f"[{name}]", getattr(config, name))
    for model in config.models:
        out += table("[[models]]", model)
        for src in model.sources:
            out += table("[[models.sources]]", src)
        out += table("[models.rebase]", model.rebase)
    return "\n".join(out)


def reference_rows() -> list[dict[str, str]]:
    """One row per setting (for the configuration reference): key, env, type, default, unit, meaning."""
    rows = []
    default = Config()
    groups: list[tuple[str, type, Any, str]] = [(n, c, getattr(default, n), f"{ENV_PREFIX}_{n.upper()}")
                                                for n, c in SECTIONS.items()]
    groups.append(("models[i]", ModelSection, ModelSection(), f"{ENV_PREFIX}_MODELS_<i>"))
    groups.append(("models[i].sources[j]", SourceSection, SourceSection(), f"{ENV_PREFIX}_MODELS_<i>_SOURCES_<j>"))
    groups.append(("models[i].rebase", RebaseSection, RebaseSection(), f"{ENV_PREFIX}_MODELS_<i>_REBASE"))
    for name, cls, obj, env_prefix in groups:
        for f in dataclasses.fields(cls):
            if f.name in ("sources", "rebase"):   # tables of their own, listed next
                continue
            rows.append({"key": f"{name}.{f.name}", "env": f"{env_prefix}_{f.name.upper()}",
                         "type": str(f.type), "default": _toml_value(getattr(obj, f.name)),
                         "unit": f.metadata.get("unit") or "", "meaning": _describe(f)})
    return rows
