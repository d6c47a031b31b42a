"""`sidetune data check --task video` (issue 16.2 for video): clips read with training's readers and clip policy,
counts and balance per split, frames per clip and frame sizes, and every refusal with its reason.

Clips are a few 32x32 frames written as real videos (H.264 MP4, MJPEG AVI, via PyAV) or frame folders."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sidetune.data import DataError, check_dataset
from sidetune.data import commands as data_commands
from sidetune.data.video import CLIP_POLICIES, write_video
from sidetune.errors import ConfigError

SIZE = 32


def frames(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def frame_folder(folder: Path, clip: np.ndarray, numbers=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, f in zip(numbers or range(1, len(clip) + 1), clip, strict=True):
        Image.fromarray(f).save(folder / f"img_{k:05d}.png")
    return folder


def truncated_avi(path: Path, n: int = 8) -> Path:
    whole = write_video(path.with_name("whole.avi"), frames(n)).read_bytes()
    path.with_name("whole.avi").unlink()
    path.write_bytes(whole[: len(whole) // 2])  # the header still announces n frames
    return path


def tree(root: Path) -> Path:
    """train: left 3 clips (mp4 of 6 frames, avi of 5, folder of 7), right 1 (mp4 of 6, 48x32 frames), and one clip
    of each refusal: too short, unreadable, a gap, a truncated video; val: left only."""
    t = root / "train"
    write_video(t / "left" / "a.mp4", frames(6))
    write_video(t / "left" / "b.avi", frames(5, 1))
    frame_folder(t / "left" / "c", frames(7, 2))
    write_video(t / "right" / "d.mp4", np.zeros((6, 32, 48, 3), np.uint8))
    write_video(t / "right" / "short.mp4", frames(2, 3))
    (t / "right" / "broken.mkv").write_bytes(b"\x1a\x45\xdf\xa3 broken")
    frame_folder(t / "right" / "gappy", frames(6, 4), numbers=[1, 2, 3, 5, 6, 7])
    truncated_avi(t / "left" / "cut.avi")
    write_video(root / "val" / "left" / "e.mp4", frames(4, 5))
    return root


def split_of(report, name):
    return next(s for s in report.splits if s.split == name)


def test_folder_layout_counts_clips_frames_and_sizes_and_gives_each_refusal_its_reason(tmp_path: Path) -> None:
    report = check_dataset(tree(tmp_path), "video", num_frames=4, imbalance_ratio=2.5)
    assert report.layout == "folder" and [s.split for s in report.splits] == ["train", "val"]
    train, val = report.splits
    c = train.counts
    assert (c.task, c.unit, c.classes, c.counts, c.images) == ("video", "clips", ["left", "right"], [3, 1], 4)
    assert train.facts["frames_per_clip"] == {"min": 5, "median": 6, "max": 7}
    assert train.facts["clips"] == 4 and train.facts["short_clips_used"] == 0
    assert train.sizes == {
        "width": {"min": 32, "median": 32, "max": 48},
        "height": {"min": 32, "median": 32, "max": 32},
    }
    skipped = {Path(p).name: r for p, r in train.skipped}
    assert set(skipped) == {"short.mp4", "broken.mkv", "gappy"}
    assert skipped["short.mp4"].startswith("too short (2 frame(s), fewer than the 4")
    assert skipped["broken.mkv"].startswith("unreadable (cannot open video")
    assert skipped["gappy"].startswith("gap in frame folder (") and "frame 4 missing" in skipped["gappy"]
    # the truncated video opens and announces 8 frames: training would stop at it, so the data is not OK
    assert [(Path(p).name, r.split(" (")[0]) for p, r in train.problems] == [("cut.avi", "truncated")]
    assert not report.ok
    codes = {(w.split, w.code) for w in report.warnings}
    assert {("train", "imbalance"), ("train", "skipped_files"), ("train", "unreadable")} <= codes
    assert {("val", "single_class"), ("val", "class_absent")} <= codes
    skipped_warning = next(w for w in train.warnings if w.code == "skipped_files")
    assert "3 file(s) skipped" in skipped_warning.message and "1 too short" in skipped_warning.message
    assert val.counts.counts == [1, 0] and val.facts["frames_per_clip"] == {"min": 4, "median": 4, "max": 4}
    text = report.format()
    assert "split train: 4 clips; frame sizes (W x H) min 32x32, median 32x32, max 48x32" in text
    assert "frames per clip: min 5, median 6, max 7 (T = 4, clip policy refuse)" in text
    assert "imbalance (most / least frequent class present): 3.0x" in text
    assert "gappy: gap in frame folder" in text and "NOT OK" in text


def test_the_clip_policy_stride_and_verify_change_what_is_refused_as_training_would(tmp_path: Path) -> None:
    root = tree(tmp_path)
    looped = split_of(check_dataset(root, "video", num_frames=4, clip_policy="loop", splits=["train"]), "train")
    assert looped.counts.counts == [3, 2] and looped.facts["short_clips_used"] == 1
    assert looped.facts["frames_per_clip"]["min"] == 2
    assert {Path(p).name for p, _ in looped.skipped} == {"broken.mkv", "gappy"}
    # a stride of 2 needs (4 - 1) * 2 + 1 = 7 frames: only the 7-frame folder is long enough
    strided = split_of(check_dataset(root, "video", num_frames=4, frame_stride=2, splits=["train"]), "train")
    assert (
        strided.counts.counts == [1, 0]
        and "fewer than the 7 that 4 frames at stride 2 need"
        in dict((Path(p).name, r) for p, r in strided.skipped)["a.mp4"]
    )
    verified = check_dataset(root, "video", num_frames=4, verify=True)
    train = split_of(verified, "train")
    assert train.problems == [] and verified.ok
    assert dict((Path(p).name, r.split(" (")[0]) for p, r in train.skipped)["cut.avi"] == "truncated"
    quick = split_of(check_dataset(root, "video", num_frames=4, decode=False, splits=["train"]), "train")
    assert quick.problems == [] and quick.counts.counts == [4, 1]  # headers only: the truncated clip goes unseen


def test_ucf101_lists_a_missing_clip_and_a_one_class_training_list(tmp_path: Path) -> None:
    for name in ("ApplyLipstick", "Archery"):
        write_video(tmp_path / name / f"v_{name}_g01_c01.avi", frames(5))
    (tmp_path / "classInd.txt").write_text("1 ApplyLipstick\n2 Archery\n")
    (tmp_path / "README.txt").write_text("UCF101 action recognition\n")  # not a clip list: not a split
    (tmp_path / "trainlist01.txt").write_text(
        "ApplyLipstick/v_ApplyLipstick_g01_c01.avi 1\nArchery/v_Archery_g01_c01.avi 2\n"
        "Archery/v_Archery_g02_c01.avi 2\n"
    )
    (tmp_path / "testlist01.txt").write_text("Archery/v_Archery_g01_c01.avi\n")
    report = check_dataset(tmp_path, "video", num_frames=4)
    assert report.layout == "list" and [s.split for s in report.splits] == ["testlist01", "trainlist01"]
    train, test = split_of(report, "trainlist01"), split_of(report, "testlist01")
    assert train.counts.classes == ["ApplyLipstick", "Archery"] and train.counts.counts == [1, 1]
    assert [(Path(p).name, r.split(" (")[0]) for p, r in train.skipped] == [("v_Archery_g02_c01.avi", "not found")]
    assert test.counts.counts == [0, 1] and report.ok
    (tmp_path / "trainlist01.txt").write_text("Archery/v_Archery_g01_c01.avi 2\n")
    refused = check_dataset(tmp_path, "video", num_frames=4, splits=["trainlist01"])
    assert not refused.ok and "every training clip is of class 'Archery'" in refused.errors[0]


def test_a_dataset_of_class_folders_without_splits_and_bad_clip_options(tmp_path: Path) -> None:
    write_video(tmp_path / "jump" / "a.mp4", frames(5))
    frame_folder(tmp_path / "run" / "b", frames(5, 1))
    report = check_dataset(tmp_path, "video", num_frames=4)
    (only,) = report.splits
    assert only.split is None and only.counts.counts == [1, 1] and report.ok
    with pytest.raises(ConfigError, match="clip_policy must be one of"):
        check_dataset(tmp_path, "video", clip_policy="stretch")
    with pytest.raises(DataError, match="no split found"):
        check_dataset(tmp_path, "video", layout="csv")


def test_data_check_command_for_video(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_commands._CLIP_POLICIES == CLIP_POLICIES
    root = tree(tmp_path / "data")
    parser = argparse.ArgumentParser(prog="sidetune")
    data_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "check", str(root), "--task", "video", "--num-frames", "4"])
    assert args.func(args) == 1  # the truncated video would stop training
    out = capsys.readouterr().out
    assert "task video, layout folder" in out and "frames per clip: min 5" in out and "cut.avi: truncated" in out
    args = parser.parse_args(["data", "check", str(root), "--task", "video", "--num-frames", "4", "--verify"])
    assert args.func(args) == 0
    assert "OK: every split was read" in capsys.readouterr().out
    args = parser.parse_args(["data", "check", str(root), "--task", "classification", "--num-frames", "4"])
    with pytest.raises(ConfigError, match="--num-frames: clip options apply to --task video only"):
        args.func(args)


# -- training checks its clips as the image tasks check their images ------------------------------------------------
def small_tree(root: Path, train: dict[str, int]) -> Path:
    for name, n in train.items():
        for i in range(n):
            frame_folder(root / "train" / name / f"c{i}", frames(4, i))
    for i, name in enumerate(("left", "right")):
        frame_folder(root / "val" / name / "v", frames(4, 10 + i))
    return root


def test_video_training_counts_clips_for_class_weights_and_refuses_a_one_class_split(tmp_path: Path) -> None:
    from sidetune.data import build_video_dataset, class_weights, count_classes
    from sidetune.train import TrainConfig, fit

    root = small_tree(tmp_path / "data", {"left": 3, "right": 1})
    counts = count_classes(build_video_dataset(root, "train", None, num_frames=4))
    assert (counts.task, counts.unit, counts.counts) == ("video", "clips", [3, 1])
    # inverse frequency [1/3, 1], mean 2/3
    torch_weights = class_weights(None, "auto", counts=counts)
    assert torch_weights.tolist() == pytest.approx([0.5, 1.5])

    def config(data: Path, out: str) -> TrainConfig:
        return TrainConfig(backbone="test_vit", method="linear", task="video", data=str(data), img_size=SIZE,
                           epochs=1, batch_size=2, lr=1e-2, workers=0, output=str(tmp_path / out),
                           task_options={"num_frames": 4, "class_weights": "auto"})  # fmt: skip

    summary = fit(config(root, "run")).summary
    assert summary["data"]["class_counts"]["counts"] == [3, 1] and summary["data"]["class_counts"]["unit"] == "clips"
    one = small_tree(tmp_path / "one", {"left": 2})
    frame_folder(one / "train" / "right" / "too_short", frames(2))  # its class exists, but its only clip is refused
    with pytest.raises(DataError, match=r"refusing to train on training split 'train': every training clip is of "):
        fit(config(one, "run_one"))
