"""A folder source of a million images: what listing it costs, and that resolving a ref reads only its file.

Issue 20 asks that sources be read lazily ("a 1M-image folder must not be loaded into memory to resolve one
ref"). The folder is 10 class folders of N/10 files each, every one a hard link to a real MNIST PNG (a
million real files on disk, one inode's worth of bytes). In a fresh process: the listing's seconds and the
resident memory it adds, then three refs (by path and by index) resolved and decoded, counting the files
opened. Writes ``benchmarks/results/byo_sources.json`` (the byo report shows it).

    .venv/bin/python benchmarks/sources_scale.py --n 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


LINKS_PER_INODE = 60_000


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(root: Path, n: int) -> float:
    """``root/<digit>/<nnnnnnn>.png``, hard links to one PNG per class; returns the seconds it took."""
    import torch
    from PIL import Image

    from daemon.data.mnist import load_mnist

    t = time.perf_counter()
    m = load_mnist()
    per = n // 10
    for digit in range(10):
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        first = folder / f"{0:07d}.png"
        if not first.exists():
            row = int((m.test_y == digit).nonzero()[0])
            Image.fromarray((m.test_x[row, 0] * 255).round().to(torch.uint8).numpy(), mode="L").save(first)
        base = first
        for i in range(1, per):
            path = folder / f"{i:07d}.png"
            if i % LINKS_PER_INODE == 0:           # ext4 allows 65,000 links to one inode: start a real copy
                base = path
                if not path.exists():
                    path.write_bytes(first.read_bytes())
            elif not path.exists():
                os.link(base, path)
    return time.perf_counter() - t


def measure(root: Path) -> dict:
    """In this (fresh) process: list the folder, then resolve three refs, counting the files opened."""
    from daemon.data.folder import ImageFolderSource

    opened: list[str] = []

    def opener(path: Path):  # noqa: ANN202 - a binary file
        opened.append(str(path))
        return open(path, "rb")

    rss0 = _rss_mb()
    t = time.perf_counter()
    source = ImageFolderSource.open(root, opener=opener)
    list_s = time.perf_counter() - t
    rss1 = _rss_mb()
    opened_listing = len(opened)
    refs = ["3/0012345.png", "9/0099999.png"]
    t = time.perf_counter()
    rows = [source.index_of(r) for r in refs] + [len(source) - 1]
    items = source.items(rows, (1, 28, 28))
    resolve_s = time.perf_counter() - t
    return {"files": len(source), "list_s": round(list_s, 2), "rss_before_mb": round(rss0, 1),
            "rss_after_list_mb": round(rss1, 1), "list_added_mb": round(rss1 - rss0, 1),
            "bytes_per_file": round((rss1 - rss0) * 2 ** 20 / len(source), 1), "refs": refs + [f"index {rows[-1]}"],
            "resolve_s": round(resolve_s, 4), "files_opened_listing": opened_listing,
            "files_opened_to_resolve": len(opened) - opened_listing,
            "items_shape": list(items.shape)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--root", default="var/sources-scale")
    p.add_argument("--out", default="benchmarks/results/byo_sources.json")
    p.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    root = ROOT / args.root
    if args.measure_only:
        print(json.dumps(measure(root)))
        return 0
    from daemon.registry import atomic_write_bytes

    build_s = build(root, args.n)
    done = subprocess.run([sys.executable, __file__, "--root", args.root, "--measure-only"], capture_output=True,
                          text=True, check=True, cwd=ROOT)
    result = json.loads(done.stdout.strip().splitlines()[-1]) | {"n": args.n, "build_s": round(build_s, 1),
                                                                  "layout": "10 class folders of hard links to "
                                                                            "real MNIST PNGs (a new copy every "
                                                                            f"{LINKS_PER_INODE:,} files)"}
    atomic_write_bytes(ROOT / args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
