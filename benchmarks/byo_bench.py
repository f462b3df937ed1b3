"""Bring your own model (issue 20): three torchvision classifiers nobody here wrote, trained outside the package
(``examples/mnist_zoo``), imported with ``unlearnd import`` and unlearned, beside the built-in MNIST CNN.

Playing the user, per architecture:

1. **train** it with the example's own script (``python -m mnist_zoo.train``; skipped when its weights exist),
   or, for the built-in ``mnist_cnn``, ``unlearnd pretrain`` (the reference for wall time);
2. **import** it with ``unlearnd import`` (a subprocess, as an operator runs it) into ``<work>/registry``;
3. **single**: a k = 64 ``forget`` round (``adv_imp``, default preset) from version 1, per seed;
   **continual**: 10 rounds of 32 on one session from version 1, per seed (the forget sets are
   ``forget_indices(60000, k, seed)``, the same draw as the MNIST benchmark's);
4. **e2e**: the whole path of the issue's item 4 on the real model: ``unlearnd unlearn`` publishes version 2,
   a daemon on an empty state dir adopts it and applies a Kafka request (sent with ``unlearnd publish``) naming
   two items of a folder source by path, then ``unlearnd serve`` answers tritonclient with the right shapes,
   the logits of the version's TorchScript and the class names.

Rows (one a round) go to ``<work>/parts/<arch>.json`` after every round (so a stopped run resumes with
``--resume``) and are merged, with the e2e records, into ``benchmarks/results/byo.json``; ``--report``
writes ``byo.md`` and the plots. Evaluations are not timed: ``wall_s`` is the round's own time, split into
``attack_s`` (targeted PGD and anchors), ``optimise_s`` (the steps) and ``memory_s`` (extending the subspace
memory), as ``RoundResult`` measures them.

    PYTHONPATH=examples:. .venv/bin/python benchmarks/byo_bench.py --archs vit_tiny --protocols single --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import torch  # noqa: E402

from daemon.bench.runner import _clean, forget_indices, machine_info, make_request  # noqa: E402
from daemon.data.mnist import load_mnist  # noqa: E402
from daemon.engine.config import parse_settings, preset  # noqa: E402
from daemon.engine.evaluate import accuracy, loss_auc, per_sample_loss, predict  # noqa: E402
from daemon.engine.subspace import protectable_layers  # noqa: E402
from daemon.registry import atomic_write_bytes, model_store  # noqa: E402

ZOO = ("resnet18", "mobilenet_v3_small", "vit_tiny")
BUILTIN = "mnist_cnn"
ARCHS = (*ZOO, BUILTIN)
SINGLE_K, CONTINUAL = 64, (10, 32)
# rows from before rows named their commit were made with this engine (self-attention left out of the memory)
FIRST_RUN_COMMIT = "2e09778"
ROW_FIELDS = ("arch", "factory", "params", "protocol", "k", "seed", "round", "acc_test_original", "acc_test_before",
              "acc_test", "acc_forget", "acc_forget_union", "mia_auc", "outcome", "steps", "wall_s", "attack_s",
              "optimise_s", "memory_s")
UNLEARND = [sys.executable, "-m", "daemon.cli"]


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'examples'}", "OMP_NUM_THREADS": str(threads)}


def _run(cmd: list[str], threads: int, **kw: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} … exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return done


# -- 1 + 2: train (the user's script) and import -------------------------------------------------------------------
def prepare(arch: str, work: Path, zoo: Path, threads: int) -> dict[str, Any]:
    """Version 1 of ``arch`` in ``<work>/registry``: trained (if needed) and imported the way a user does."""
    reg = work / "registry"
    record_path = work / "prepared" / f"{arch}.json"
    if record_path.exists() and (reg / arch / "1").is_dir():
        return json.loads(record_path.read_text())
    record: dict[str, Any] = {"arch": arch}
    if arch == BUILTIN:
        t = time.perf_counter()
        _run([*UNLEARND, "pretrain", "--dataset", "mnist", "--registry", str(reg), "--model", arch, "--epochs", "6"],
             threads)
        record.update(train_s=round(time.perf_counter() - t, 1), train="unlearnd pretrain --epochs 6 (the built-in "
                      "recipe, label smoothing 0.2)", note="class names 0-9: a built-in model is not imported")
    else:
        meta_path = zoo / f"{arch}.json"
        if not meta_path.exists():
            _run([sys.executable, "-m", "mnist_zoo.train", "--arch", arch, "--threads", str(threads), "--out", str(zoo)],
                 threads)
        meta = json.loads(meta_path.read_text())
        cmd = [*UNLEARND, "import", "--registry", str(reg), "--model", arch, "--factory", meta["factory"],
               "--factory-kwargs", json.dumps(meta["factory_kwargs"]), "--weights", str(zoo / f"{arch}.safetensors"),
               "--input-shape", ",".join(map(str, meta["input_shape"])), "--mean", ",".join(map(str, meta["mean"])),
               "--std", ",".join(map(str, meta["std"])), "--classes", str(work / "classes.txt")]
        t = time.perf_counter()
        out = _run(cmd, threads).stdout.strip()
        record.update(import_s=round(time.perf_counter() - t, 1), import_output=out, training=meta["train"],
                      trained_test_accuracy=meta["test_accuracy"], factory_kwargs=meta["factory_kwargs"])
    live = model_store.load_live(reg, arch, 1)
    record.update(factory=live.factory.ref, params=sum(p.numel() for p in live.model.parameters()))
    record_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(record_path, json.dumps(record, indent=1).encode())
    return record


# -- 3: rounds -------------------------------------------------------------------------------------------------------
class Part:
    """One architecture's rows, rewritten atomically after each round."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if resume and path.exists() else []

    def has(self, protocol: str, seed: int, rounds: int) -> bool:
        got = {r["round"] for r in self.rows if r["protocol"] == protocol and r["seed"] == seed}
        return all(r in got for r in range(1, rounds + 1))

    def add(self, row: dict[str, Any]) -> None:
        key = ("protocol", "seed", "round")
        self.rows = [r for r in self.rows if any(r[f] != row[f] for f in key)] + [row]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps({"rows": self.rows}, indent=1) + "\n").encode())


def _mia(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Loss AUC of the forgotten instances against 2,000 unseen test images (0.5: they look unseen)."""
    return loss_auc(per_sample_loss(model, x, y), per_sample_loss(model, test_x[:2000], test_y[:2000]))


def run_rounds(arch: str, record: dict[str, Any], work: Path, part: Part, protocol: str, seed: int,
               overrides: dict[str, Any], log: Any, memory_energy: float | None = None) -> None:
    """``single`` (one k = 64 round) or ``continual`` (10 × 32) from version 1, one row a round."""
    rounds, k = (1, SINGLE_K) if protocol == "single" else CONTINUAL
    if part.has(protocol, seed, rounds):
        return
    m = load_mnist()
    live = model_store.load_live(work / "registry", arch, 1)
    if memory_energy is not None:                     # rounds.memory_energy in the daemon's configuration
        live.session.memory.energy = memory_energy
    config = preset("default", "adv_imp", "forget").with_overrides(**overrides)
    acc0 = accuracy(live.model, m.test_x, m.test_y)
    order = forget_indices(m.train_y.shape[0], rounds * k, seed)
    acc_before = acc0
    protected = {f"{name}.{p}" for name in protectable_layers(live.model) for p in ("weight", "bias")}
    for r in range(1, rounds + 1):
        idx = order[(r - 1) * k:r * k]
        request = make_request("forget", m, idx, seed)
        before = {n: p.detach().clone() for n, p in live.model.named_parameters()}
        result, _ = live.session.run_round(request, method="adv_imp", config=config, sentinel=m.test_x[:2000])
        model = live.model
        if not result.succeeded:          # evaluate what the round produced; the session keeps its model
            model = copy.deepcopy(live.model)
            model.load_state_dict(result.state)
        moved = {n: float(((p.detach() - before[n]) ** 2).sum()) for n, p in model.named_parameters()}
        union = order[:r * k]
        row = {
            "arch": arch, "factory": record["factory"], "params": record["params"], "protocol": protocol, "k": k,
            "seed": seed, "round": r, "acc_test_original": acc0, "acc_test_before": acc_before,
            "acc_test": accuracy(model, m.test_x, m.test_y), "acc_forget": accuracy(model, request.x, request.labels),
            "acc_forget_union": accuracy(model, m.train_x[union], m.train_y[union]),
            "mia_auc": _mia(model, m.train_x[union], m.train_y[union], m.test_x, m.test_y),
            "outcome": result.outcome, "steps": result.steps, "wall_s": result.wall_s, "attack_s": result.attack_s,
            "optimise_s": result.optimise_s, "memory_s": result.memory_s,
            "reason": result.reason, "overrides": overrides, "memory_energy": live.session.memory.energy,
            "commit": _commit(),
            # what leaving layers out of the subspace memory costs: their share of the round's squared update
            "left_out_update_share": sum(v for n, v in moved.items() if n not in protected) / max(sum(moved.values()),
                                                                                                   1e-30),
            "memory_fill": round(sum(live.session.memory.dims().values())
                                 / max(1, sum(b.shape[0] for b in live.session.memory.bases.values())), 4),
        }
        row = {key: _clean(v) for key, v in row.items()}
        part.add(row)
        acc_before = row["acc_test"]
        log(f"{arch:18s} {protocol:9s} seed={seed} round={r:2d} k={k} -> {row['outcome']:10s} "
            f"test {100 * acc0:.2f} -> {100 * row['acc_test']:.2f} forget {row['acc_forget']:.3f} "
            f"union {row['acc_forget_union']:.3f} steps {row['steps']} wall {row['wall_s']:.1f}s "
            f"(attack {row['attack_s']:.1f}, optimise {row['optimise_s']:.1f}, memory {row['memory_s']:.1f})")


# -- 4: the whole path ------------------------------------------------------------------------------------------------
PER_CLASS = 20
FOLDER_REFS = (("3/00002.png", 3), ("7/00005.png", 7))


def digits_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``root/<digit>/<nnnnn>.png``: the first 20 MNIST test images of each class (the user's image folder)."""
    from PIL import Image

    m = load_mnist()
    xs, ys = [], []
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
        for n, row in enumerate((m.test_y == digit).nonzero().flatten()[:PER_CLASS].tolist()):
            pixels = (m.test_x[row, 0] * 255).round().to(torch.uint8).numpy()
            path = root / str(digit) / f"{n:05d}.png"
            if not path.exists():
                Image.fromarray(pixels, mode="L").save(path)
            xs.append(torch.from_numpy(pixels.copy()).float().div(255)[None])
            ys.append(digit)
    return torch.stack(xs), torch.tensor(ys)


def e2e(arch: str, work: Path, threads: int, classes: list[str], log: Any,
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """import (done) → ``unlearnd unlearn`` → daemon applying a folder-path request from Kafka → ``unlearnd serve``."""
    import numpy as np
    import tritonclient.http as triton

    from daemon import registry
    from tests.pipeline_harness import (
        Broker,
        DaemonProcess,
        folder_model_table,
        outcome_receipts,
        read_topic,
        write_config,
    )

    base = work / "e2e" / arch
    shutil.rmtree(base, ignore_errors=True)
    reg = base / "registry"
    shutil.copytree(work / "registry" / arch, reg / arch)
    out: dict[str, Any] = {"arch": arch}
    m = load_mnist()

    # (a) unlearnd unlearn: four training digits the model classifies correctly
    live = model_store.load_live(reg, arch)
    pred = predict(live.model, m.train_x[:200])
    picked = [i for i in range(200) if int(pred[i]) == int(m.train_y[i])][:4]
    t = time.perf_counter()
    settings = [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]   # the model's own settings, if any
    _run([*UNLEARND, "unlearn", "--registry", str(reg), "--model", arch, "--dataset", "mnist",
          "--forget-indices", ",".join(map(str, picked)), *[a for kv in settings for a in ("--set", kv)]], threads)
    out["unlearn"] = {"indices": picked, "s": round(time.perf_counter() - t, 1),
                      "version": registry.latest_version(reg, arch)}
    log(f"{arch}: unlearnd unlearn -> v{out['unlearn']['version']} in {out['unlearn']['s']}s")

    # (b) the daemon on an empty state dir adopts v2 and applies a request naming folder items by path
    x, y = digits_folder(work / "digits")
    broker = Broker().start()
    cfg = write_config(base / "unlearnd.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=base / "state",
                       models=(), retention_max_drop=0.02)
    with cfg.open("a") as f:
        f.write(folder_model_table(arch, "digits", work / "digits", settings=settings))
    daemon = DaemonProcess(cfg, base / "daemon.log", env=_env(threads)).start()
    try:
        daemon.wait_assigned(timeout=300)
        refs = [f"digits:{path}" for path, _ in FOLDER_REFS]
        t = time.perf_counter()
        _run([*UNLEARND, "publish", "--bootstrap", broker.bootstrap, "--model", arch, "--request-id", f"byo-{arch}",
              *[a for r in refs for a in ("--ref", r)], *[a for _, lab in FOLDER_REFS for a in ("--label", str(lab))]],
             threads)
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=1800,
                          until=lambda rs: bool(outcome_receipts(rs).get(f"byo-{arch}")))
        receipt = outcome_receipts(recs)[f"byo-{arch}"][0]
        out["daemon"] = {"status": receipt["status"], "reason": receipt.get("reason"),
                         "model_version": receipt.get("model_version"), "s": round(time.perf_counter() - t, 1),
                         "refs": refs}
        if receipt["status"] == "applied":
            ts = torch.jit.load(str(reg / arch / str(receipt["model_version"]) / "model.pt"), map_location="cpu")
            rows = [int(p.split("/")[0]) * PER_CLASS + int(p.split("/")[1][:5]) for p, _ in FOLDER_REFS]
            with torch.no_grad():
                out["daemon"]["forgotten_misclassified"] = bool(
                    (ts(x[rows]).argmax(1) != torch.tensor([lab for _, lab in FOLDER_REFS])).all())
                out["daemon"]["folder_accuracy_after"] = float((ts(x).argmax(1) == y).float().mean())
        out["daemon"]["exit"] = daemon.terminate(timeout=120)
    finally:
        daemon.kill()
        broker.stop()
    log(f"{arch}: daemon -> {out['daemon']}")

    # (c) unlearnd serve answers tritonclient: shapes, the latest version's logits, class names
    latest = registry.latest_version(reg, arch)
    names = registry.read_manifest(reg, arch, latest)["classes"]   # the import's names (a built-in's are 0-9)
    server, port = _serve(reg, arch, threads)
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        meta = client.get_model_metadata(arch)
        batch = m.test_x[:3].numpy()
        inp = triton.InferInput("INPUT__0", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch, binary_data=True)
        res = client.infer(arch, [inp], outputs=[triton.InferRequestedOutput("OUTPUT__0")])
        ts = torch.jit.load(str(reg / arch / str(latest) / "model.pt"), map_location="cpu")
        with torch.no_grad():
            expected = ts(torch.from_numpy(batch)).numpy()
        top = client.infer(arch, [inp], outputs=[triton.InferRequestedOutput("OUTPUT__0", class_count=1)])
        labels = [v.decode().split(":", 2)[2] for v in top.as_numpy("OUTPUT__0").reshape(-1)]
        out["serve"] = {
            "input_shape": meta["inputs"][0]["shape"], "output_shape": meta["outputs"][0]["shape"],
            "model_version": res.get_response()["model_version"], "latest": latest,
            "logits_match": bool(np.allclose(res.as_numpy("OUTPUT__0"), expected, rtol=1e-4, atol=1e-5)),
            "top1_labels": labels, "expected_labels": [names[int(i)] for i in expected.argmax(1)],
        }
    finally:
        server.terminate()
        server.wait(timeout=60)
    s = out["serve"]
    out["ok"] = bool(out["unlearn"]["version"] == 2 and out["daemon"]["status"] == "applied"
                     and out["daemon"].get("forgotten_misclassified") and s["logits_match"]
                     and s["model_version"] == str(latest) and s["top1_labels"] == s["expected_labels"]
                     and s["output_shape"] == [-1, len(names)] and (arch == BUILTIN or names == classes))
    log(f"{arch}: serve -> {s}; e2e ok: {out['ok']}")
    return out


def _serve(reg: Path, arch: str, threads: int, timeout: float = 300.0) -> tuple[subprocess.Popen, int]:
    """``unlearnd serve`` on a free port, once it answers ready (a loaded machine starts it slowly)."""
    from benchmarks.serve_bench import _wait_ready
    from tests.pipeline_harness import free_port

    port = free_port()
    proc = subprocess.Popen([*UNLEARND, "serve", "--registry", str(reg), "--model", arch, "--port", str(port)],
                            cwd=ROOT, env=_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(port, proc, timeout)
    except RuntimeError:
        proc.kill()
        raise
    return proc, port


# -- results, report, plots -------------------------------------------------------------------------------------------
def merge(out: Path, work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """``byo.json``: every part's rows, the e2e records and the preparation records, with machine and settings."""
    path = out / "byo.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    rows = {(r["arch"], r["protocol"], r["seed"], r["round"]): r for r in old.get("rows", [])}
    for part in sorted((work / "parts").glob("*.json")):
        for r in json.loads(part.read_text())["rows"]:
            r.setdefault("commit", FIRST_RUN_COMMIT)
            rows[(r["arch"], r["protocol"], r["seed"], r["round"])] = r
    prepared = dict(old.get("prepared", {}))
    for p in sorted((work / "prepared").glob("*.json")):
        prepared[p.stem] = json.loads(p.read_text())
    e2e_records = dict(old.get("e2e", {}))
    for p in sorted((work / "e2e").glob("*.json")):
        e2e_records[p.stem] = json.loads(p.read_text())
    doc = {"machine": machine_info("cpu") | {"load_1m": os.getloadavg()[0]}, "settings": settings,
           "row_fields": list(ROW_FIELDS), "prepared": prepared, "e2e": e2e_records,
           "rows": sorted(rows.values(), key=lambda r: (ARCHS.index(r["arch"]) if r["arch"] in ARCHS else 99,
                                                       r["protocol"], r["seed"], r["round"]))}
    atomic_write_bytes(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--protocols", default="single,continual,e2e")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="var/byo-bench")
    p.add_argument("--zoo", default="var/mnist_zoo", help="the example's training output (trained when missing)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a default-preset setting for every round (recorded in each row)")
    p.add_argument("--memory-energy", type=float, help="the subspace memory's energy (default: the session's)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report", action="store_true", help="only merge the parts and write byo.md and the plots")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, out = ROOT / args.work, ROOT / args.out
    overrides = _overrides(args.set)
    unknown = sorted(set(args.protocols.split(",")) - {"single", "continual", "e2e"})
    if unknown:
        raise SystemExit(f"--protocols: unknown {', '.join(unknown)} (single, continual, e2e)")
    settings = {"method": "adv_imp", "preset": "default", "preset_settings": preset("default", "adv_imp", "forget")
                .to_dict(), "single_k": SINGLE_K, "continual": list(CONTINUAL), "threads": args.threads,
                "forget_sets": "forget_indices(60000, k, seed): randperm under the seed (MNIST benchmark's draw)",
                "e2e": {"folder": f"{PER_CLASS} MNIST test images per class as PNGs", "refs": [r for r, _ in FOLDER_REFS],
                        "retention_max_drop": 0.02}}
    if not args.report:
        classes = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        work.mkdir(parents=True, exist_ok=True)
        (work / "classes.txt").write_text("\n".join(classes) + "\n")      # the user's own class names
        archs = args.archs.split(",")
        records = {arch: prepare(arch, work, ROOT / args.zoo, args.threads) for arch in archs}
        parts = {arch: Part(work / "parts" / f"{arch}.json", args.resume) for arch in archs}
        for protocol in args.protocols.split(","):       # in the order given: every arch's single rounds first
            for arch in archs:
                if protocol == "e2e":
                    record_path = work / "e2e" / f"{arch}.json"
                    if not (args.resume and record_path.exists()):
                        result = e2e(arch, work, args.threads, classes, _log, overrides)
                        result["overrides"] = overrides
                        atomic_write_bytes(record_path, json.dumps(result, indent=1).encode())
                    continue
                for seed in [int(x) for x in args.seeds.split(",")]:
                    run_rounds(arch, records[arch], work, parts[arch], protocol, seed, overrides, _log,
                               args.memory_energy)
    doc = merge(out, work, settings)
    from benchmarks.byo_report import write_report

    write_report(doc, out)
    return 0


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set`` as the daemon reads ``[[models]] settings``; a bad entry stops the run before any round."""
    try:
        out = parse_settings(pairs)
        preset("default", "adv_imp", "forget").with_overrides(**out)
    except ValueError as exc:
        raise SystemExit(f"--set: {exc}") from None
    return out


def _commit() -> str:
    """The checkout's commit (with ``+`` when the engine has uncommitted changes): which code made a row."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "daemon"], cwd=ROOT, capture_output=True, text=True).stdout
    return head.strip() + ("+" if dirty.strip() else "")


def _log(line: str) -> None:
    print(time.strftime("%H:%M:%S"), line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
