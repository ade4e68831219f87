"""What the two most intricate pieces of the data layer buy, end to end, as whole commands.

* The batch handover (``hierclass.data.handover``): DataLoader workers hand uint8 batches to the
  main process through shared segments they reuse, instead of torch's fresh segment per batch.
  Figure: ``hierclass extract-features --workers 2`` on a dump, with the handover and with
  ``HIERCLASS_HANDOVER=0`` (torch's own path).
* The index pass's helper thread (``hierclass.data.bson_index``): it unmaps the window behind the
  scan and maps the next one in while the compiled loop scans. Figure: ``hierclass index`` on a
  dump of about 1 GB (copies of Fashion's train.bson), cold (the file dropped from the page cache
  before each run) and warm, with the thread and with ``HIERCLASS_INDEX_HELPER=0`` (each window
  mapped in by the scan itself).

The two variants of each command run in turn, A B A B ..., each in a fresh process, so that both
see the same machine; the figure is the median of the per-pair ratios (without / with: above 1
means the piece saves time). Run it on an idle machine.

    .venv/bin/python benchmarks/bench_intricate.py [--pairs 5] [--work /tmp/hierclass-bench-intricate]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO.parent / "shared" / "data" / "fashion"
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_data import drop_from_page_cache, make_big_dump  # noqa: E402


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return seconds


def pairs(name: str, run, with_env: dict, without_env: dict, n: int, before=None) -> dict:
    """Alternate the two variants ``n`` times after one warm-up of each; per-pair ratios without/with."""
    times: dict[str, list[float]] = {"with": [], "without": []}
    for i in range(n + 1):
        for variant, env in (("with", with_env), ("without", without_env)):
            if before is not None:
                before()
            t = run(env)
            if i:  # the first round warms both up (imports, page cache, compiled scan)
                times[variant].append(t)
    ratios = [b / a for a, b in zip(times["with"], times["without"], strict=True)]
    out = {
        "figure": name,
        "with_s": [round(t, 2) for t in times["with"]],
        "without_s": [round(t, 2) for t in times["without"]],
        "median_with_s": round(statistics.median(times["with"]), 2),
        "median_without_s": round(statistics.median(times["without"]), 2),
        "ratio_without_over_with": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
    }
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hierclass-bench-intricate"))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--dump-gb", type=float, default=1.0)
    parser.add_argument("--extract-data", type=Path, default=FASHION / "val.bson")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--only", choices=("index", "extract"), default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    hierclass = [sys.executable, "-m", "hierclass"]
    results = []

    if args.only in (None, "index"):
        big = make_big_dump([FASHION / "train.bson"], args.work / "big.bson", int(args.dump_gb * 1e9))
        cache = args.work / "index-cache"

        def index(env: dict) -> float:
            shutil.rmtree(cache, ignore_errors=True)  # a fresh pass every time, never the saved index
            return timed([*hierclass, "index", str(big), "--cache-dir", str(cache), "--no-progress"], env)

        on, off = {"HIERCLASS_INDEX_HELPER": "1"}, {"HIERCLASS_INDEX_HELPER": "0"}
        mb = big.stat().st_size / 1e6
        for state, before in (("cold", lambda: drop_from_page_cache(big)), ("warm", None)):
            r = pairs(f"hierclass index, {mb:.0f} MB dump, {state}", index, on, off, args.pairs, before)
            results.append(r)

    if args.only in (None, "extract"):
        out_dir = args.work / "features"

        def extract(env: dict) -> float:
            shutil.rmtree(out_dir, ignore_errors=True)
            return timed(
                [*hierclass, "extract-features", "--data", str(args.extract_data),
                 "--taxonomy", str(FASHION / "category_names.csv"), "--out", str(out_dir),
                 "--image-size", str(args.image_size), "--workers", "2", "--no-progress"],
                env,
            )  # fmt: skip

        name = f"hierclass extract-features --workers 2, {args.extract_data.name}, {args.image_size} px"
        results.append(pairs(name, extract, {"HIERCLASS_HANDOVER": "1"}, {"HIERCLASS_HANDOVER": "0"}, args.pairs))

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
