#!/usr/bin/env python3
"""Deterministically generate the Brickbox benchmark source tree.

Usage: gen_tree.py DEST_DIR [--scale S]

The same (scale, GEN_VERSION) always yields byte-identical content.  At
scale 1.0 the tree is ~2 GiB:

  small/gXX/dNNN/fNNNNN.*  ~20,000 files of 1-64 KiB in ~300 directories,
                           ~60% text-like (compressible), ~40% random
  big/random.bin           400 MiB of random data
  big/text.log             400 MiB of "compressible-ish" data (text + 20% random)
  media/*.jpg|zip|gz       ~300 already-compressed files (random content with
                           a realistic magic header), 0.5-2.5 MiB each
  dup/...                  ~300 exact copies of small files (other names/dirs)
  video/clip.bin           50 MiB random file ...
  backup/clip-copy.bin     ... and an exact copy of it

Counts and the large-file sizes are multiplied by --scale (small-file sizes
and media-file sizes are not, they are "small" / "medium" by nature).

Speed: random data comes from SHAKE-128 (~300 MB/s in CPython) keyed per
file/block, so it never repeats across files and never compresses; text comes
from a 4 MiB pseudo-text pool, sliced at random offsets and passed through one
of 32 letter permutations (bytes.translate is very fast), so it compresses
like text (~2-3x) without being trivially deduplicable.
"""
import argparse
import hashlib
import os
import random
import shutil
import string

GEN_VERSION = 1  # bump when the output changes (run.sh uses it as cache key)

KiB = 1024
MiB = 1024 * KiB


def shake(key: str, n: int) -> bytes:
    """n deterministic, unique, incompressible bytes for a key."""
    return hashlib.shake_128(key.encode()).digest(n)


class TextSource:
    """Produces text-like compressible bytes quickly."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        letters = string.ascii_lowercase
        # Vocabulary with a Zipf-like frequency distribution.
        vocab = []
        for _ in range(3000):
            ln = rng.choice([2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 9, 11])
            vocab.append("".join(rng.choice(letters) for _ in range(ln)))
        vocab[:8] = ["the", "of", "and", "to", "in", "is", "that", "for"]
        weights = [1.0 / (i + 1) for i in range(len(vocab))]
        words = rng.choices(vocab, weights=weights, k=700_000)
        # Break into lines of 4-16 words, a few with digits (log-ish).
        out, i = [], 0
        while i < len(words):
            n = rng.randint(4, 16)
            line = " ".join(words[i:i + n])
            if rng.random() < 0.2:
                line = f"{rng.randint(0, 99999):05d} INFO {line}"
            out.append(line)
            i += n
        self.pool = ("\n".join(out) + "\n").encode()
        # Letter permutations: same statistics, different bytes.
        self.tables = []
        for _ in range(32):
            perm = list(letters)
            rng.shuffle(perm)
            self.tables.append(bytes.maketrans(letters.encode(), "".join(perm).encode()))

    def get(self, rng: random.Random, n: int) -> bytes:
        parts, got = [], 0
        pool, plen = self.pool, len(self.pool)
        while got < n:
            ln = min(n - got, rng.randint(512, 8 * KiB))
            off = rng.randrange(0, plen - ln)
            parts.append(pool[off:off + ln].translate(rng.choice(self.tables)))
            got += ln
        return b"".join(parts)


def write(path: str, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_big(path: str, size: int, block_fn):
    """Write a large file block by block (1 MiB blocks)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        blk = 0
        left = size
        while left > 0:
            n = min(MiB, left)
            f.write(block_fn(blk, n))
            left -= n
            blk += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dest")
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args()
    s = a.scale
    dest = a.dest
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)

    rng = random.Random(20240601)
    text = TextSource(seed=7)

    def sc(n, lo=1):
        return max(lo, round(n * s))

    # --- small files -----------------------------------------------------
    n_small = sc(20_000, 10)
    n_dirs = sc(300, 3)
    dirs = [f"small/g{d // 20:02d}/d{d:03d}" for d in range(n_dirs)]
    text_ext = [".txt", ".log", ".csv", ".json", ".md", ".rs"]
    rand_ext = [".bin", ".dat", ".o", ".db"]
    small_paths = []
    for i in range(n_small):
        d = dirs[i % n_dirs]
        size = rng.randint(1 * KiB, 64 * KiB)
        if rng.random() < 0.6:
            rel = f"{d}/f{i:05d}{rng.choice(text_ext)}"
            data = text.get(rng, size)
        else:
            rel = f"{d}/f{i:05d}{rng.choice(rand_ext)}"
            data = shake(f"small-{i}", size)
        write(os.path.join(dest, rel), data)
        small_paths.append(rel)

    # --- two big files -----------------------------------------------------
    big = max(MiB, round(400 * MiB * s))
    write_big(os.path.join(dest, "big/random.bin"), big,
              lambda b, n: shake(f"bigrand-{b}", n))

    brng = random.Random(99)

    def text_block(b, n):
        # ~80% text, ~20% random, interleaved in 4-64 KiB pieces.
        parts, got = [], 0
        rnd = shake(f"bigtext-{b}", n)
        while got < n:
            ln = min(n - got, brng.randint(4 * KiB, 64 * KiB))
            if brng.random() < 0.2:
                parts.append(rnd[got:got + ln])
            else:
                parts.append(text.get(brng, ln))
            got += ln
        return b"".join(parts)

    write_big(os.path.join(dest, "big/text.log"), big, text_block)

    # --- already-compressed files ---------------------------------------------
    magic = {".jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", ".zip": b"PK\x03\x04\x14\x00",
             ".gz": b"\x1f\x8b\x08\x00"}
    for i in range(sc(300)):
        ext = [".jpg", ".zip", ".gz"][i % 3]
        size = rng.randint(512 * KiB, 2560 * KiB)
        rel = f"media/album{i % 10:02d}/item{i:04d}{ext}"
        write(os.path.join(dest, rel), magic[ext] + shake(f"media-{i}", size))

    # --- duplicates -----------------------------------------------------------
    for i, src in enumerate(rng.sample(small_paths, min(len(small_paths), sc(300)))):
        dst = os.path.join(dest, f"dup/copy{i % 7}/{os.path.basename(src)}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(dest, src), dst)
    clip = max(256 * KiB, round(50 * MiB * s))
    write_big(os.path.join(dest, "video/clip.bin"), clip, lambda b, n: shake(f"clip-{b}", n))
    os.makedirs(os.path.join(dest, "backup"), exist_ok=True)
    shutil.copyfile(os.path.join(dest, "video/clip.bin"), os.path.join(dest, "backup/clip-copy.bin"))


if __name__ == "__main__":
    main()
