#!/usr/bin/env python3
"""Timing helpers for bench/mount.sh (standard library only).

  mount_probe.py start LOG PROBE -- CMD...  start CMD (a mount that stays in the foreground) in
                                            its own session, wait until PROBE can be listed;
                                            print "<seconds> <pid>"
  mount_probe.py random FILE N SIZE SEED    N preads of SIZE bytes at random aligned offsets;
                                            print "<p50 ms> <p95 ms> <max ms>"
  mount_probe.py hwm PID                    peak resident set of PID in MiB (VmHWM)
  mount_probe.py stop PID MOUNTPOINT        unmount, wait for PID to exit (SIGKILL after 20 s)
"""
import os
import random
import signal
import subprocess
import sys
import time


def start(log, probe, cmd):
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            if p.poll() is not None:
                print(f"error: {cmd[0]} exited with {p.returncode} before the mount was ready", file=sys.stderr)
                sys.exit(1)
            try:
                os.listdir(probe)
                break
            except OSError:
                pass
            if time.perf_counter() - t0 > 600:
                print("error: mount not ready after 600 s", file=sys.stderr)
                sys.exit(1)
            time.sleep(0.002)
        print(f"{time.perf_counter() - t0:.3f} {p.pid}")


def rand_reads(path, n, size, seed):
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        length = os.fstat(fd).st_size
        times = []
        for _ in range(n):
            off = rng.randrange(0, max(1, length - size)) // size * size
            t0 = time.perf_counter()
            data = os.pread(fd, size, off)
            times.append((time.perf_counter() - t0) * 1000)
            if len(data) != size:
                print(f"error: short read at {off}", file=sys.stderr)
                sys.exit(1)
    finally:
        os.close(fd)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    print(f"{pick(0.50):.2f} {pick(0.95):.2f} {times[-1]:.2f}")


def hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                print(f"{int(line.split()[1]) / 1024:.0f}")
                return
    print("?")


def stop(pid, mountpoint):
    subprocess.run(["umount", mountpoint], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 20:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    subprocess.run(["umount", "-l", mountpoint], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    a = sys.argv[1:]
    if a[:1] == ["start"] and "--" in a:
        i = a.index("--")
        start(a[1], a[2], a[i + 1:])
    elif a[:1] == ["random"] and len(a) == 5:
        rand_reads(a[1], int(a[2]), int(a[3]), int(a[4]))
    elif a[:1] == ["hwm"] and len(a) == 2:
        hwm(int(a[1]))
    elif a[:1] == ["stop"] and len(a) == 3:
        stop(int(a[1]), a[2])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
