"""Load time of ``model.pt`` (TorchScript) against ``model.pt2`` (torch.export), as ``unlearnd serve`` loads them.

For each model: publish one version (both files), then in fresh processes (one per format and repeat): import
what ``model.pt2`` needs (``trust.prime()``, which a server does at start-up; timed apart), load the file's bytes
once (a server's first load), warm up as the holder does (3 calls on a 1-image batch), load it 3 times more (a
server's later full loads) and time a 4-image batch. Also
records the warning ``torch.jit.load`` gives, export time and file sizes. Results:
``benchmarks/results/pt2_load.json`` and ``.md``.

    PYTHONPATH=. .venv/bin/python benchmarks/pt2_load.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {
    "mnist_cnn": ("daemon.engine.models:mnist_cnn", {"num_classes": 10, "input_shape": [1, 28, 28]}),
    "resnet18 (torchvision, examples/mnist_zoo)": ("examples.mnist_zoo.models:resnet18", {"num_classes": 10}),
    "vit (torchvision, tests/byo_factories)": ("tests.byo_factories:tiny_vit", {"num_classes": 10}),
}

_CHILD = r"""
import io, json, statistics, sys, time, warnings
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
t_torch = time.perf_counter() - t0
path, kind, shape = sys.argv[1], sys.argv[2], tuple(json.loads(sys.argv[3]))
t = time.perf_counter()
if kind == "pt2":     # what daemon.registry.trust.prime() imports at a server's start-up
    import torch._export.serde.serialize, torch.export._unlift
prime = time.perf_counter() - t
data = open(path, "rb").read()


def load():
    if kind == "pt":
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    return torch.export.load(io.BytesIO(data)).module()


with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    t = time.perf_counter()
    module = load()
    first = time.perf_counter() - t
    caught = [f"{x.category.__name__}: {str(x.message).splitlines()[0]}" for x in w]
probe = torch.full((1, *shape), 0.5)
t = time.perf_counter()
with torch.inference_mode():
    for _ in range(3):
        module(probe)
warm = time.perf_counter() - t
again = []
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for _ in range(3):
        t = time.perf_counter()
        load()
        again.append(time.perf_counter() - t)
batch = torch.rand((4, *shape))
with torch.inference_mode():
    module(batch)
    t = time.perf_counter()
    for _ in range(20):
        module(batch)
steady = (time.perf_counter() - t) / 20
print(json.dumps({"prime_s": prime, "first_load_s": first, "warmup_s": warm, "load_again_s": statistics.median(again),
                  "steady_batch4_s": steady, "import_torch_s": t_torch, "warnings": caught}))
"""


def _publish(reg: Path, name: str, ref: str, kwargs: dict) -> tuple[dict, float]:
    from daemon.engine.models import ModelFactory, build_classifier
    from daemon.registry import write_version

    factory = ModelFactory(ref, kwargs)
    module = build_classifier(factory, mean=[0.1307], std=[0.3081]).eval()
    start = time.perf_counter()
    info = write_version(reg, name, module, input_shape=(1, 28, 28), classes=[str(i) for i in range(10)],
                         parent=None, extra_manifest={"factory": ref, "factory_kwargs": kwargs})
    return info.manifest, time.perf_counter() - start


def _export_time(ref: str, kwargs: dict) -> float:
    import torch

    from daemon.engine.models import ModelFactory, build_classifier
    from daemon.registry.export import _export_pt2

    module = build_classifier(ModelFactory(ref, kwargs), mean=[0.1307], std=[0.3081]).eval()
    start = time.perf_counter()
    data, error = _export_pt2(module, (1, 28, 28))
    if data is None:
        raise RuntimeError(error)
    del torch
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import torch

    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, (ref, kwargs)) in enumerate(MODELS.items()):
            name = f"m{i}"
            manifest, publish_s = _publish(Path(tmp), name, ref, kwargs)
            vdir = Path(tmp) / name / "1"
            row: dict = {"model": label, "factory": ref, "publish_s": round(publish_s, 3),
                         "export_pt2_s": round(_export_time(ref, kwargs), 3),
                         "bytes": {k: v["bytes"] for k, v in manifest["files"].items()}}
            for kind, file in (("pt", "model.pt"), ("pt2", "model.pt2")):
                runs = []
                for _ in range(args.repeats):
                    out = subprocess.run([sys.executable, "-c", _CHILD, str(vdir / file), kind, "[1, 28, 28]"],
                                         capture_output=True, text=True, env=env, check=True)
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                med = {k: statistics.median(r[k] for r in runs)
                       for k in ("prime_s", "first_load_s", "warmup_s", "load_again_s", "steady_batch4_s")}
                row[kind] = {
                    "prime_imports_s_median": round(med["prime_s"], 3),
                    "first_load_s_median": round(med["first_load_s"], 4),
                    "first_load_s_min": round(min(r["first_load_s"] for r in runs), 4),
                    "warmup_3_calls_s_median": round(med["warmup_s"], 4),
                    "load_again_s_median": round(med["load_again_s"], 4),
                    "steady_batch4_s_median": round(med["steady_batch4_s"], 5),
                    "warnings": sorted({w for r in runs for w in r["warnings"]}),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "threads": 1, "repeats": args.repeats,
              "loadavg_at_start": os.getloadavg()[0], "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pt2_load.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
