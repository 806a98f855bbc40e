"""Benchmark: ``refseg outlines`` against the OpenCV reference on synthetic tiled label TIFFs.

    python bench/bench_outlines.py                       # 16 and 256 Mpx (needs ~1 GB RAM, a few minutes)
    python bench/bench_outlines.py --sizes 4,16 --markdown table.md

For each size a square uint8 label TIFF (tiles of 512 px, deflate) of discs, rings (one hole each) and
long bands crossing many tiles (classes 1-3) is generated into a temporary folder (removed afterwards,
never committed). Each row runs in its own subprocess, timed by wall clock, with its peak resident
memory from ``wait4``:

- ``opencv``: the reference: the whole mask read with tifffile, then per class
  ``cv2.findContours(RETR_CCOMP, CHAIN_APPROX_SIMPLE)`` + ``cv2.approxPolyDP(eps=1)`` (no file written);
- ``refseg outlines --simplify 1``: streamed tile by tile, one QuPath feature per object, GeoJSON written;
- ``refseg outlines --simplify 0``: the same with exact pixel-edge outlines;
- ``--workers 2``: tiles traced in two processes (peak RSS is then the largest process, not the sum).

Each row keeps its fastest of ``--repeats`` runs; repeats go round all rows in turn.

Needs ``pip install 'refseg[slides]'`` (OpenCV is part of it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_outlines")

TILE = 512

REFERENCE = r"""
import sys, tifffile, cv2, numpy as np
mask = tifffile.imread(sys.argv[1])
objects = vertices = 0
for value in (1, 2, 3):
    contours, _ = cv2.findContours((mask == value).astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    simple = [cv2.approxPolyDP(c, 1.0, True) for c in contours]
    objects += len(simple)
    vertices += sum(len(c) for c in simple)
print(objects, vertices)
"""


def scene_objects(side: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Object parameters for a side x side mask, density independent of size: about one disc per
    70 x 70 px, one ring per 250 x 250 px, one horizontal, vertical and diagonal band per 2048 px."""
    rng = np.random.default_rng(seed)
    n_disc, n_ring, n_band = side * side // 4900, side * side // 62500, max(side // 2048, 1)
    discs = np.stack([rng.uniform(0, side, n_disc), rng.uniform(0, side, n_disc), rng.uniform(5, 24, n_disc),
                      rng.integers(1, 4, n_disc)], 1)
    rings = np.stack([rng.uniform(0, side, n_ring), rng.uniform(0, side, n_ring), rng.uniform(30, 80, n_ring),
                      rng.uniform(5, 12, n_ring), rng.integers(1, 4, n_ring)], 1)
    bands = np.stack([rng.uniform(0, side, 3 * n_band), rng.uniform(8, 30, 3 * n_band),
                      np.repeat([0, 1, 2], n_band), rng.integers(1, 4, 3 * n_band)], 1)
    return {"discs": discs, "rings": rings, "bands": bands}


def render_rows(objects: dict[str, np.ndarray], side: int, y0: int, y1: int) -> np.ndarray:
    """Rows [y0, y1) of the synthetic mask, (y1 - y0, side) uint8."""
    band = np.zeros((y1 - y0, side), np.uint8)
    for kind in ("rings", "discs"):
        table = objects[kind]
        reach = table[:, 2]
        for obj in table[np.flatnonzero((table[:, 1] + reach > y0) & (table[:, 1] - reach < y1))]:
            cx, cy, r = obj[0], obj[1], obj[2]
            ya, yb = max(int(cy - r), y0), min(int(cy + r) + 1, y1)
            xa, xb = max(int(cx - r), 0), min(int(cx + r) + 1, side)
            yy, xx = np.ogrid[ya:yb, xa:xb]
            d = np.hypot(xx - cx, yy - cy)
            hit = (d < r) & (d >= r - obj[3]) if kind == "rings" else d < r
            band[ya - y0:yb - y0, xa:xb][hit] = int(obj[-1])
    for pos, width, direction, value in objects["bands"]:
        half = width / 2
        if direction == 0:  # horizontal: crosses every vertical seam
            a, b = max(int(pos - half), y0), min(int(pos + half), y1)
            band[max(a - y0, 0):max(b - y0, 0)] = int(value)
        elif direction == 1:  # vertical: crosses every horizontal seam
            band[:, max(int(pos - half), 0):min(int(pos + half), side)] = int(value)
        else:  # diagonal, wrapping: crosses both
            for y in range(y0, y1):
                x = int(pos + 0.7 * y) % side
                band[y - y0, max(x - int(half), 0):min(x + int(half), side)] = int(value)
    return band


def write_scene(path: Path, side: int, seed: int = 0) -> None:
    """A side x side tiled (512 px, deflate) uint8 label TIFF, written band by band."""
    import tifffile

    objects = scene_objects(side, seed)

    def tiles():
        for y0 in range(0, side, TILE):
            rows = render_rows(objects, side, y0, min(y0 + TILE, side))
            rows = np.pad(rows, ((0, TILE - rows.shape[0]), (0, 0)))
            for x0 in range(0, side, TILE):
                tile = rows[:, x0:x0 + TILE]
                yield np.pad(tile, ((0, 0), (0, TILE - tile.shape[1])))

    tifffile.imwrite(path, tiles(), shape=(side, side), dtype=np.uint8, tile=(TILE, TILE), compression="zlib")


def measure(command: list[str], folder: Path) -> dict:
    """Run ``command``: wall seconds, peak resident memory (MB, the child's own ``wait4`` record) and its
    stdout's last line."""
    with open(folder / "stdout.txt", "w+") as out, open(folder / "stderr.txt", "w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        lines, errors = out.read().strip().splitlines(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{errors[-2000:]}")
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "stdout": lines[-1] if lines else ""}


def run(sizes_mpx: list[int], folder: Path, repeats: int) -> list[dict]:
    rows = []
    for mpx in sizes_mpx:
        side = int(round((mpx * 2 ** 20) ** 0.5))
        mask = folder / f"labels_{mpx}mpx.tif"
        t0 = time.perf_counter()
        write_scene(mask, side)
        log.info("%s: %d x %d written in %.1f s (%.1f MB)", mask.name, side, side, time.perf_counter() - t0,
                 mask.stat().st_size / 2 ** 20)
        out = folder / "out.geojson"
        refseg = [sys.executable, "-m", "refseg.cli", "-q", "outlines", str(mask), "-o", str(out)]
        commands = {
            "opencv reference": [sys.executable, "-c", REFERENCE, str(mask)],
            "refseg outlines --simplify 1 --workers 1": refseg + ["--simplify", "1", "--workers", "1"],
            "refseg outlines --simplify 0 --workers 1": refseg + ["--simplify", "0", "--workers", "1"],
            "refseg outlines --simplify 1 --workers 2": refseg + ["--simplify", "1", "--workers", "2"],
        }
        best: dict[str, dict] = {}
        for _ in range(repeats):  # rows interleaved, so that a burst of load on the shared CPU hits all alike
            for name, command in commands.items():
                result = measure(command, folder)
                if name.startswith("refseg"):
                    result["features"] = sum(1 for line in out.open() if line.startswith('{"type": "Feature"'))
                    result["geojson_mb"] = round(out.stat().st_size / 2 ** 20, 1)
                    out.unlink()
                else:
                    result["features"] = int(result["stdout"].split()[0])
                if name not in best or result["seconds"] < best[name]["seconds"]:
                    best[name] = result
        for name in commands:
            row = {"mpx": mpx, "side": side, "run": name, **best[name]}
            log.info("%s", row)
            rows.append(row)
        mask.unlink()
    return rows


def markdown(rows: list[dict]) -> str:
    reference = {r["mpx"]: r["seconds"] for r in rows if r["run"] == "opencv reference"}
    lines = ["| mask | run | time (s) | x reference | Mpx/s | peak RSS (MB) | features |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mpx']} Mpx ({r['side']}^2) | {r['run']} | {r['seconds']:.2f} | "
                     f"{r['seconds'] / reference[r['mpx']]:.2f} | {r['mpx'] / r['seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['features']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,256", help="mask sizes in Mpx (2^20 px), comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row; the fastest is kept")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="bench_outlines_") as tmp:
        rows = run([int(s) for s in args.sizes.split(",")], Path(tmp), args.repeats)
    table = markdown(rows)
    sys.stdout.write(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
