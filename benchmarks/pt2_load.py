"""Load time of ``model.pt`` (TorchScript) against ``model.pt2`` (torch.export), as ``unlearnd serve`` loads them.

For each model: publish one version (both files), then in fresh processes (one per format and repeat, so each
load is a cold one, as a server's first, and the import of torch's export machinery is counted separately):
load the file's bytes, warm up as the holder does (3 calls on a 1-image batch), and run the probe batch. Also
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
import io, json, sys, time, warnings
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
t_torch = time.perf_counter() - t0
path, kind, shape = sys.argv[1], sys.argv[2], tuple(json.loads(sys.argv[3]))
data = open(path, "rb").read()
caught = []
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    t = time.perf_counter()
    if kind == "pt":
        module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    else:
        module = torch.export.load(io.BytesIO(data)).module()
    load = time.perf_counter() - t
    caught = [f"{x.category.__name__}: {str(x.message).splitlines()[0]}" for x in w]
probe = torch.full((1, *shape), 0.5)
t = time.perf_counter()
with torch.inference_mode():
    for _ in range(3):
        module(probe)
warm = time.perf_counter() - t
batch = torch.rand((4, *shape))
t = time.perf_counter()
with torch.inference_mode():
    module(batch)
steady = time.perf_counter() - t
print(json.dumps({"load_s": load, "warmup_s": warm, "steady_batch4_s": steady, "import_torch_s": t_torch,
                  "warnings": caught}))
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
                row[kind] = {
                    "load_s_median": round(statistics.median(r["load_s"] for r in runs), 4),
                    "load_s_min": round(min(r["load_s"] for r in runs), 4),
                    "warmup_s_median": round(statistics.median(r["warmup_s"] for r in runs), 4),
                    "steady_batch4_s_median": round(statistics.median(r["steady_batch4_s"] for r in runs), 5),
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
