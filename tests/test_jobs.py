"""The job layer's parts without models: one summary schema, the resume store, progress, flag refusals,
the ProtoSAM support-slice rule against the protocol as its papers' code states it, label maps kept."""
import argparse
import json
import logging
import math
import sys

import numpy as np
import pytest

from refseg.jobs.base import JOB_ARGUMENTS, job_arguments, job_files
from refseg.jobs.checks import check_flags
from refseg.jobs.progress import Progress
from refseg.jobs.resume import ResumeStore, run_settings
from refseg.jobs.summary import RunSummary


# ------------------------------------------------------------------------------------------ summary
def test_summary_has_the_same_keys_in_every_mode(tmp_path):
    keys = {}
    for mode in ("folder", "volume", "slide"):
        summary = RunSummary(["a", "b", "c", "d"], config={"preset": "sat"}, mode=mode)
        summary.add_success("b")
        summary.add_success("a")
        summary.add_skipped("c")
        summary.add_failure("d", ValueError("d: file is empty (0 bytes)"))
        summary.items_segmented = 6
        if mode != "folder":
            summary.records += [{"path": "b"}, {"path": "a"}]
        summary.finish()
        data = json.loads(summary.write(tmp_path / f"{mode}.json").read_text())
        assert (data["inputs"], data["succeeded"], data["succeeded_this_run"], data["skipped"]) == (4, 3, 2, 1)
        assert data["failed"] == [{"path": "d", "error": "ValueError: d: file is empty (0 bytes)"}]
        assert data["items_per_second"] == pytest.approx(6 / summary.elapsed, rel=1e-3)
        assert data["mode"] == mode and data["item"] == {"folder": "image", "volume": "slice", "slide": "tile"}[mode]
        if mode != "folder":
            assert [r["path"] for r in data.pop(f"{mode}s")] == ["a", "b"]  # the mode's records, by path
        keys[mode] = set(data)
    assert keys["folder"] == keys["volume"] == keys["slide"]
    assert RunSummary(3).items_per_second == 0.0


def test_failures_are_listed_by_path_whatever_finished_first(tmp_path):
    summary = RunSummary(3)
    for name in ("c.png", "a.png", "b.png"):  # completion order of parallel readers
        summary.add_failure(name, "ValueError: bad")
    assert [f["path"] for f in json.loads(summary.write(tmp_path / "s.json").read_text())["failed"]] == \
        ["a.png", "b.png", "c.png"]


def test_a_single_output_file_keeps_its_book_keeping_beside_it(tmp_path):
    files = job_files(tmp_path / "out" / "ct.nii.gz", "ct")
    assert (files.summary.name, files.run_config.name) == ("ct.summary.json", "ct.run_config.json")
    assert files.folder == tmp_path / "out"
    assert job_files(tmp_path / "o").summary == tmp_path / "o" / "summary.json"


# ------------------------------------------------------------------------------------------ resume
class _Config:
    def __init__(self, **values):
        self.values = {"name": "sat", "batch_size": 4, "device": None, "metric": "cosine", **values}

    def to_dict(self):
        return dict(self.values)


def test_resume_store_refuses_other_settings_naming_them_and_force_recomputes(tmp_path, caplog):
    old = run_settings(_Config(), ["ref1"], mode={"labels": [5], "window": None, "classes": {1: "Glomerulus"}})
    ResumeStore(tmp_path / "run_config.json", old).write()
    same = run_settings(_Config(batch_size=16, device="cuda"), ["ref1"],
                        mode={"labels": [5], "window": None, "classes": {1: "Glomerulus"}})
    assert ResumeStore(tmp_path / "run_config.json", same).reuse(True, False, True)  # batch/device: same masks
    new = run_settings(_Config(metric="euclidean"), ["ref2"],
                       mode={"labels": [6], "window": None, "classes": {1: "Gland"}})
    store = ResumeStore(tmp_path / "run_config.json", new)
    with pytest.raises(ValueError) as info:
        store.reuse(True, False, True)
    message = str(info.value)
    for words in ("config.metric: 'cosine' -> 'euclidean'", "mode.labels: [5] -> [6]", "references",
                  "mode.classes.1: 'Glomerulus' -> 'Gland'",
                  "--resume --force"):
        assert words in message
    with caplog.at_level(logging.WARNING):
        assert store.reuse(True, True, True) is False  # --force: recompute
    assert "recomputing every input" in caplog.text
    assert store.reuse(False, False, True) is False  # no --resume: every input is computed
    (tmp_path / "run_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="unreadable"):
        store.reuse(True, False, True)


# ------------------------------------------------------------------------------------------ progress
def test_progress_lines_without_a_terminal_grow_with_the_total(caplog):
    with caplog.at_level(logging.INFO, logger="refseg.progress"):
        bar = Progress(3, "log", every_n=2, every_s=1e9, unit="slices")
        for _ in range(3):
            bar.update()
        bar.grow(2)  # the next volume's slices are known once it is read
        for _ in range(2):
            bar.update()
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" slices")[0] for line in lines] == ["progress: 2/3", "progress: 4/5", "progress: 5/5"]
    assert all(r.levelno == logging.INFO and "slices/s" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ flags
def _args(**given):
    return job_arguments(reference=["r.png"], reference_mask=["m.png"], input="in", output="out", **given)


@pytest.mark.parametrize("mode, given, flag", [
    ("folder", {"label": [5]}, "--label"), ("folder", {"tile_size": 256}, "--tile-size"),
    ("folder", {"pool_references": True}, "--pool-references"), ("folder", {"pair_by": "order"}, "--pair-by"),
    ("volume", {"save_prompts": True}, "--save-prompts"), ("volume", {"overlay": True}, "--overlay"),
    ("volume", {"region": ["0,0,8,8"]}, "--region"), ("volume", {"keep_tiles": True}, "--keep-tiles"),
    ("slide", {"save_prompts": True}, "--save-prompts"), ("slide", {"window": "abdomen"}, "--window"),
    ("slide", {"slices": "0:3"}, "--slices"), ("slide", {"axis": 1}, "--axis"),
])
def test_options_a_mode_would_ignore_are_refused(mode, given, flag):
    with pytest.raises(ValueError, match=f"{flag}: not used for"):
        check_flags(_args(**given), mode)


def test_options_that_need_another_are_refused():
    with pytest.raises(ValueError, match="--force goes with --resume"):
        check_flags(_args(force=True), "volume")
    with pytest.raises(ValueError, match="--ray-workers / --gpus-per-worker go with --ray"):
        check_flags(_args(ray_workers=2), "slide")
    check_flags(_args(force=True, resume=True, ray="local", ray_workers=2, overlay=True), "slide")


def test_job_arguments_match_the_parser_defaults():
    from refseg.cli import build_parser

    args = build_parser().parse_args(["segment", "-r", "r", "-m", "m", "-i", "i", "-o", "o"])
    parsed = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose", "quiet")}
    assert set(parsed) == set(JOB_ARGUMENTS)
    assert {k: v for k, v in parsed.items() if k not in ("reference", "reference_mask", "input", "output")} == \
        {k: v for k, v in JOB_ARGUMENTS.items() if k not in ("reference", "reference_mask", "input", "output")}
    with pytest.raises(TypeError, match="unknown job argument"):
        job_arguments(labels=[5])
    assert isinstance(job_arguments(), argparse.Namespace)


# ------------------------------------------------------------------------------------------ temporaries
def test_stale_temporaries_of_the_targets_are_removed(tmp_path):
    from refseg.io.writers import atomic_writer, remove_temporaries

    target = tmp_path / "a.png"
    with pytest.raises(RuntimeError):
        with atomic_writer(target):
            raise RuntimeError("killed")
    leftover = tmp_path / ".a.png.x1y2.tmp"
    leftover.write_bytes(b"half")  # what a SIGKILL mid-write leaves
    other = tmp_path / ".b.png.z.tmp"
    other.write_bytes(b"not ours")
    folder = tmp_path / "tiles"
    folder.mkdir()
    (folder / ".r0_c0.png.q.tmp").write_bytes(b"half")
    assert remove_temporaries([target, folder]) == 2
    assert not leftover.exists() and other.exists() and not list(folder.iterdir())


# ------------------------------------------------------------------------------------------ ProtoSAM rule
def _protocol_support(n: int, chunks: int, part: int) -> int:
    """SSL-ALPNet / ProtoSAM evaluation code, as published: support chunk ``part`` uses labelled slice
    ``int(pct * n)`` with pct = 1 / (2C) + part * (1 - 1/C) / (C - 1) (0.5 for C = 1)."""
    if chunks == 1:
        pct = 0.5
    else:
        pct = 1 / (chunks * 2) + (1.0 - 1.0 / chunks) / (chunks - 1) * part
    return int(pct * n)


def _protocol_part(z: int, z_min: int, z_max: int, chunks: int) -> int:
    """The query's chunk in the same code: int((z - z_min) // ((z_max - z_min) / C)), clamped to 0..C-1."""
    try:
        part = int((z - z_min) // ((z_max - z_min) / chunks))
    except ZeroDivisionError:
        part = 0
    return min(max(part, 0), chunks - 1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13])
@pytest.mark.parametrize("chunks", [1, 3, 5])
def test_support_slice_follows_the_protocol(n, chunks):
    from refseg.jobs.volume_plan import plan_volume, support_slice

    labelled = [2 + 3 * i for i in range(n)]  # spaced reference slices 2, 5, 8, ...
    for part in range(chunks):
        position = part / chunks  # the start of query chunk `part`
        assert support_slice(position, labelled, chunks) == labelled[_protocol_support(n, chunks, part)]
    # the whole plan: every target slice of a 17-slice range gets the protocol's reference slice
    depth = max(labelled) + 1
    ref = np.zeros((16, 16, depth), np.int16)
    ref[0, 0, 0] = 100
    labels = np.zeros(ref.shape, np.int64)
    labels[2:14, 2:14, labelled] = 5
    target = np.zeros((16, 16, 17), np.int16)
    plan = plan_volume(target, labels, reference=ref, labels=[5], chunks=chunks)
    got = {t: s for slices, members in plan.groups.items() for t in members for s in slices}
    expected = {z: labelled[_protocol_support(n, chunks, _protocol_part(z, 0, 16, chunks))] for z in range(17)}
    assert got == expected


def test_support_slice_where_the_old_chunking_disagreed():
    from refseg.jobs.volume_plan import support_slice

    # 4 labelled slices, 3 chunks: the protocol takes slices 0, 2, 3 (array_split's middles were 1, 2, 3)
    assert [support_slice(p, [10, 11, 12, 13], 3) for p in (0.0, 0.5, 0.99)] == [10, 12, 13]
    assert math.floor(3 * 0.34) == 1 and support_slice(0.34, [10, 11, 12, 13], 3) == 12


# ------------------------------------------------------------------------------------------ labels
def test_a_label_map_keeps_its_values_where_a_two_valued_mask_is_binary():
    from refseg.io.masks import as_label_map, mask_from_array
    from refseg.segmenter import check_reference

    mask = np.zeros((20, 20), np.int64)
    mask[4:12, 4:12] = 5
    assert set(np.unique(mask_from_array(mask))) == {0, 1}  # a 2-D mask file or array: binary, class 1
    assert set(np.unique(mask_from_array(as_label_map(mask)))) == {0, 5}  # a volume's label slice: 5 stays 5
    image = np.zeros((20, 20, 3), np.uint8)
    assert set(np.unique(check_reference(image, as_label_map(mask))[1])) == {0, 5}


# ------------------------------------------------------------------------------------------ folder CLI, no model
@pytest.fixture
def pair(tmp_path, monkeypatch):
    """A reference pair and an input folder; loading a model fails the test."""
    from PIL import Image

    import refseg.segmenter

    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(image).save(tmp_path / "ref.png")
    Image.fromarray(mask).save(tmp_path / "ref_mask.png")
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    monkeypatch.setattr(refseg.segmenter.Segmenter, "__init__", lambda *a, **k: pytest.fail("models loaded"))
    return ["segment", "-r", str(tmp_path / "ref.png"), "-m", str(tmp_path / "ref_mask.png"), "-i",
            str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--sam-checkpoint", str(tmp_path / "none.pth")]


def test_folder_options_it_would_ignore_are_refused(pair, caplog):
    from refseg.cli import main

    for flags, words in ((["--label", "5"], "--label: not used for a folder"),
                         (["--mpp", "2"], "--mpp: read a slide reference; -r"),
                         (["--force"], "--force goes with --resume"),
                         (["--ray-workers", "2"], "--ray-workers / --gpus-per-worker go with --ray")):
        caplog.clear()
        assert main([*pair, *flags]) == 2
        assert words in caplog.text


def test_without_ray_one_line_and_exit_2_before_any_model(pair, monkeypatch, caplog):
    from refseg.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # the dist extra is not installed
    assert main([*pair, "--ray"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "pip install 'refseg[dist]'" in errors[0] and "\n" not in errors[0]


def test_compile_reaches_the_segmenter_of_a_folder_job(pair, monkeypatch):
    import refseg.segmenter
    from refseg.cli import main
    from refseg.jobs.segmenter_spec import SegmenterSpec

    monkeypatch.setattr(SegmenterSpec, "check", lambda self: None)  # no checkpoint needed to get that far
    seen = {}

    def record(self, config, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop after recording")

    monkeypatch.setattr(refseg.segmenter.Segmenter, "__init__", record)
    assert main([*pair, "--compile", "--backend", "torch"]) == 2 and seen["compile"] is True
