"""Time the AutoV2 model hash (gguf_dit/hashes.py): sha256 of a whole file, cold cache vs the cached lookup.

Writes a file of random bytes (``--mib``), hashes it ``--repeat`` times with the hash cache in a temporary folder
(the first call computes and caches, the later ones only look up), and prints MB/s. The file is in the page cache
after writing, as `convert`'s outputs are when it hashes them; a file read from disk is bounded by the disk too.
It is a benchmark and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = tmp
        from gguf_dit import hashes

        f = Path(tmp) / "model.gguf"
        with open(f, "wb") as out:
            for _ in range(args.mib):
                out.write(os.urandom(1 << 20))
        size = f.stat().st_size
        for i in range(args.repeat):
            t = time.perf_counter()
            hashes.sha256_file(f)
            dt = time.perf_counter() - t
            print(f"sha256_file  {size / 1e6:8.1f} MB  {dt:6.3f} s  {size / 1e6 / dt:7.0f} MB/s")
        for i in range(2):
            t = time.perf_counter()
            h = hashes.autov2(f)
            print(f"autov2 {'first (hash + cache)' if i == 0 else 'cached lookup       '}  {time.perf_counter() - t:8.4f} s  {h}")


if __name__ == "__main__":
    main()
