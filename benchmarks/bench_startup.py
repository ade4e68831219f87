"""How fast the command line answers: wall time and peak memory of ``hierclass --help`` and
``hierclass taxonomy stats`` against ``python -c pass``, measured in the same run.

    python benchmarks/bench_startup.py [--runs 5] [--taxonomy category_names.csv]

Each command runs ``--runs`` times in a fresh interpreter, interleaved with the others so that a
change of load hits them all alike; the table gives the median wall time, the median over
``python -c pass`` and the peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cli(args: list[str]) -> list[str]:
    code = f"import sys; sys.argv = ['hierclass', *{args!r}]; from hierclass.cli import main; main()"
    return [sys.executable, "-c", code]


def run_once(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one run."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--taxonomy", type=Path, help="a category_names.csv (default: a small generated one)")
    args = parser.parse_args()
    taxonomy = args.taxonomy
    if taxonomy is None:
        taxonomy = Path(tempfile.mkdtemp()) / "category_names.csv"
        taxonomy.write_text(
            "category_id,category_level1,category_level2,category_level3\n"
            + "".join(f"{k},B{k % 7},M{k % 31},L{k}\n" for k in range(1000))
        )
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "hierclass --help": cli(["--help"]),
        "hierclass taxonomy stats": cli(["taxonomy", "stats", str(taxonomy)]),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for cmd in commands.values():  # warm the page cache
        run_once(cmd)
    for _ in range(args.runs):
        for name, cmd in commands.items():
            results[name].append(run_once(cmd))
    base = statistics.median(w for w, _ in results["python -c pass"])
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, {args.runs} runs each, median")
    print(f"{'command':<38} {'wall s':>8} {'x pass':>8} {'peak MiB':>9}")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = statistics.median(r for _, r in runs)
        print(f"{name:<38} {wall:>8.3f} {wall / base:>8.1f} {rss:>9.0f}")


if __name__ == "__main__":
    main()
