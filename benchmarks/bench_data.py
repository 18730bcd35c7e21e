"""The uint8 input cache: first load (JPEG decode + resize + cache write) against a cached reload, in one run.

    python benchmarks/bench_data.py [--images 1000] [--size 224]

Fabricates an EuroSAT-layout folder of random 256x256 JPEGs in a temp dir (outside the timing), points
TVTOOL_CACHE at a fresh temp dir, and times `tvtool.datasets.load_split("eurosat", "test", root, size)` twice.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    import numpy as np
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="tvdata-"))
    os.environ["TVTOOL_CACHE"] = tempfile.mkdtemp(prefix="tvcache-")
    from tvtool.datasets import get_dataset, load_split

    classes = len(get_dataset("eurosat").classnames)
    rng = np.random.default_rng(0)
    folders = sorted(f"class{c:02d}" for c in range(classes))
    for split in ("train", "val", "test"):
        for name in folders:
            (root / "EuroSAT_splits" / split / name).mkdir(parents=True, exist_ok=True)
    for i in range(args.images):
        img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "EuroSAT_splits" / "test" / folders[i % classes] / f"{i}.jpg", quality=90)
    t0 = time.perf_counter()
    x, _ = load_split("eurosat", "test", root, args.size)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    x2, _ = load_split("eurosat", "test", root, args.size)
    checksum = int(x2.sum())  # touch every byte: a lazily mapped file must not look free
    cached = time.perf_counter() - t0
    assert checksum == int(x.sum())
    assert x.shape == x2.shape
    print(f"{x.shape[0]} images at {args.size}px: first load {first:.2f} s ({x.shape[0] / first:.0f} img/s), "
          f"cached reload {cached:.3f} s ({x.shape[0] / cached:.0f} img/s), {first / cached:.0f}x")
    print(json.dumps({"images": x.shape[0], "size": args.size, "first_s": first, "cached_s": cached,
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
