"""How fast this machine takes a large file write: buffered (what tvtool and the naive script do) vs O_DIRECT.

    python benchmarks/bench_write.py --dir /tmp --gb 1.2 --trials 4

`tvtool add` of 8 ViT-L-14-size vectors writes a 1.2 GB result; its time beyond reading the inputs is that write.
This script writes the same number of bytes from one 64 MB buffer, `--trials` times each way, syncing and pausing
before every write, and prints each time: the spread of the buffered writes is the noise floor of the add
benchmark (benchmarks/bench_vectors.py) on this machine.
"""
from __future__ import annotations

import argparse
import mmap
import os
import time

CHUNK = 64 << 20


def timed_write(path: str, buf, chunks: int, direct: bool) -> float:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        t = time.perf_counter()
        for i in range(chunks):
            os.pwrite(fd, buf, i * CHUNK)
        return time.perf_counter() - t
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--gb", type=float, default=1.2)
    ap.add_argument("--trials", type=int, default=4)
    args = ap.parse_args()
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1 << 20) * (CHUNK >> 20))
    chunks = max(1, round(args.gb * 1e9 / CHUNK))
    path = os.path.join(args.dir, f".bench-write-{os.getpid()}")
    for trial in range(args.trials):
        row = []
        for direct in (False, True):
            os.sync()
            time.sleep(0.5)
            try:
                row.append(f"{'direct' if direct else 'buffered'} {timed_write(path, buf, chunks, direct):.3f} s")
            except OSError as exc:  # e.g. tmpfs refuses O_DIRECT
                row.append(f"{'direct' if direct else 'buffered'} unavailable ({exc.strerror})")
        print(f"trial {trial}: {chunks * CHUNK / 1e9:.2f} GB  " + "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
