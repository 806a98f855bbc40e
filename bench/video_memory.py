"""Peak host memory of refseg.VideoPredictor propagating one object through a 512 x 512 CT (CPU).

    python bench/video_memory.py --sam sam2.1_hiera_t sam2.1_hiera_b+ --slices 8 16 --extrapolate 300

Each (model, slice count) runs in a fresh subprocess (peak resident memory, ``VmHWM``) on a random
official-format checkpoint (written once by the parent) at the model's own input (1024): an int16
volume of ``--slices`` slices (the TotalSegmentator sample CT resized to 512 x 512, slices repeated;
memory does not depend on the content), one click on the middle slice, propagation forward then
backward. It prints one JSON line per run (peak after each stage, memory-bank bytes per frame, seconds
per frame) and one per model: the peak for ``--extrapolate`` slices, i.e. the last run's peak plus, per
further slice, what a slice adds for good (its memory-bank entry, measured, and the caller's int16
slice, which lives in the measured process as in a real run); the rest (model, one frame's encoder
activations, the memory attention over at most 7 memories, the two cached frames' features) does not
grow with the volume. With two slice counts it also prints the measured growth per slice.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_ct" / "example_ct_sm.nii.gz"


def peak_mib() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` (Linux; ``ru_maxrss`` would carry the
    forking parent's peak over ``exec``), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def volume(slices: int, side: int = 512):
    """(slices of (side, side) int16): the sample CT resized, or a synthetic body when it is absent."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    if DATA.is_file():
        import nibabel as nib
        ct = np.asanyarray(nib.load(str(DATA)).dataobj).astype(np.float32)
        source = torch.from_numpy(ct).permute(2, 0, 1)[:, None]
    else:
        y, x = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
        source = torch.where((y - 64) ** 2 + (x - 64) ** 2 < 50 ** 2, 40.0, -1000.0)[None, None].repeat(4, 1, 1, 1)
    big = F.interpolate(source, size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    return [big[k % big.shape[0]].round().to(torch.int16).numpy() for k in range(slices)]


def child(checkpoint: str, slices: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    import refseg
    stages = {"imports": peak_mib()}
    predictor = refseg.VideoPredictor(checkpoint, device="cpu")
    stages["model"] = peak_mib()
    frames = volume(slices)
    stages["volume"] = peak_mib()
    state = predictor.init_state(frames=frames)
    stages["init_state"] = peak_mib()
    middle = slices // 2
    predictor.add_new_points_or_box(state, middle, 1, points=[[256, 256]], labels=[1])
    stages["first_frame"] = peak_mib()
    start = time.perf_counter()
    visited = sum(1 for _ in predictor.propagate_in_video(state)) + \
        sum(1 for _ in predictor.propagate_in_video(state, reverse=True))
    seconds = time.perf_counter() - start
    stages["propagated"] = peak_mib()
    bank = state.banks[0]
    outputs = list(bank.cond.values()) + list(bank.non_cond.values())
    tensors = [t for out in outputs for t in (out.pred_masks, out.obj_ptr, out.object_score_logits,
                                              out.maskmem_features)]
    per_frame = sum(t.numel() * t.element_size() for t in tensors) / len(outputs)
    cache = sum(t.numel() * t.element_size() for f in state.features.values() for t in f)
    slice_bytes = sum(f.nbytes for f in frames) / len(frames)
    return {"sam": predictor.model.spec.name, "slices": slices, "slice_kib": slice_bytes / 1024,
            "image_size": predictor.image_size, "peak_mib": stages,
            "bank_kib_per_frame": per_frame / 1024, "feature_cache_mib": cache / 2 ** 20,
            "seconds_per_frame": seconds / max(1, visited - 2), "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sam", nargs="+", default=["sam2.1_hiera_t", "sam2.1_hiera_b+"])
    parser.add_argument("--slices", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--extrapolate", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.slices[0], args.threads)))
        return
    from refseg.testing.random_checkpoints import write_random_checkpoints
    folder = tempfile.TemporaryDirectory()
    for sam in args.sam:
        checkpoint = write_random_checkpoints(Path(folder.name), sam=[sam], seed=0)[0]
        runs = []
        for slices in args.slices:
            out = subprocess.run([sys.executable, __file__, "--child", str(checkpoint), "--slices", str(slices),
                                  "--threads", str(args.threads)], check=True, capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONWARNINGS="ignore"))
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
        last = runs[-1]  # what grows per slice: its memory-bank entry and the caller's slice
        per_slice = (last["bank_kib_per_frame"] + last["slice_kib"]) / 1024
        extrapolated = last["peak_mib"]["propagated"] + per_slice * (args.extrapolate - last["slices"])
        line = {"sam": sam, "mib_per_slice": per_slice, "extrapolated_slices": args.extrapolate,
                "extrapolated_peak_mib": extrapolated}
        if len(runs) >= 2:  # the measured growth, for comparison (allocator noise of a few MiB)
            (n0, p0), (n1, p1) = [(r["slices"], r["peak_mib"]["propagated"]) for r in (runs[0], last)]
            line["measured_mib_per_slice"] = (p1 - p0) / (n1 - n0)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
