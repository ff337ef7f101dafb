#!/usr/bin/env python3
"""Apply "a day of changes" to a tree made by gen_tree.py, deterministically.

Usage: mutate.py SRC_DIR [--scale S]

  * edit ~200 small files in place (half: overwrite a range in the middle,
    same size; half: append a line)
  * append 1 MiB of new random data to big/random.bin (in place)
  * add ~100 new small files (half in a new directory, half in existing ones)
  * delete ~50 small files
  * rename one directory of small files (content unchanged: tests that a
    move costs no new storage)

Counts are multiplied by --scale (minimum 1); the 1 MiB append is not.
Nothing under small/g00/d000/ is touched: run.sh restores a file from there
in the single-file-restore phase.
"""
import argparse
import hashlib
import os
import random

KiB = 1024
MiB = 1024 * KiB


def shake(key: str, n: int) -> bytes:
    return hashlib.shake_128(key.encode()).digest(n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args()
    root = a.src
    rng = random.Random(4242)

    def sc(n):
        return max(1, round(n * a.scale))

    small_root = os.path.join(root, "small")
    files = []
    for dirpath, dirnames, filenames in os.walk(small_root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel.startswith("small/g00/d000"):
            continue
        files.extend(os.path.join(rel, f) for f in sorted(filenames))
    files.sort()

    # 1. edit small files in place
    edited = rng.sample(files, min(len(files), sc(200)))
    for i, rel in enumerate(edited):
        p = os.path.join(root, rel)
        if i % 2 == 0:
            size = os.path.getsize(p)
            ln = min(size, rng.randint(16, 512))
            off = rng.randrange(0, size - ln + 1)
            with open(p, "r+b") as f:
                f.seek(off)
                f.write(shake(f"edit-{i}", ln))
        else:
            with open(p, "ab") as f:
                f.write(f"edited on day 1, change #{i}\n".encode())

    # 2. append 1 MiB to the big random file
    with open(os.path.join(root, "big/random.bin"), "ab") as f:
        f.write(shake("append-day1", MiB))

    # 3. new files
    dirs = sorted({os.path.dirname(f) for f in files})
    n_new = sc(100)
    for i in range(n_new):
        d = "small/new-day1" if i % 2 == 0 else rng.choice(dirs)
        p = os.path.join(root, d, f"new{i:04d}.dat")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(shake(f"new-{i}", rng.randint(1 * KiB, 64 * KiB)))

    # 4. delete files (not among the edited ones)
    rest = sorted(set(files) - set(edited))
    for rel in rng.sample(rest, min(len(rest), sc(50))):
        os.remove(os.path.join(root, rel))

    # 5. rename one directory (the last one in sorted order)
    victim = dirs[-1]
    os.rename(os.path.join(root, victim), os.path.join(root, victim + "-renamed"))


if __name__ == "__main__":
    main()
