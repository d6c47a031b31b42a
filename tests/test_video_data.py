"""Video data and the video task: PyAV decoding, frame folders, sampling, layouts, bad clips, train/eval/predict.

Every clip is generated here: a few 32x32 frames, written as real video files (H.264 MP4, MJPEG AVI) or frame
folders, so the decoder path runs in every test that reads a video.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sidetune.cli import main
from sidetune.data import DataError
from sidetune.data.video import (
    build_video_dataset,
    build_video_transforms,
    find_clips,
    probe_clip,
    read_clip,
    sample_indices,
    write_video,
)
from sidetune.errors import ConfigError
from sidetune.train import TrainConfig, fit

SIZE = 32
LOSSLESS = {"qp": "0"}  # H.264 at quantiser 0: decoded frames equal the written ones (up to colour conversion)


def frames(n: int, seed: int = 0) -> np.ndarray:
    """(n, 32, 32, 3) uint8: a texture of random 4x4 blocks panned 2 pixels per frame (blocks survive the 4:2:0
    colour subsampling of video codecs, so decoded frames can be compared with the written ones)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (SIZE // 4, (SIZE + 2 * n) // 4 + 1, 3), dtype=np.uint8)
    texture = np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8))
    return np.stack([texture[:, 2 * k : 2 * k + SIZE] for k in range(n)])


def frame_folder(folder: Path, clip: np.ndarray, numbers=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, f in zip(numbers or range(1, len(clip) + 1), clip, strict=True):
        Image.fromarray(f).save(folder / f"img_{k:05d}.png")
    return folder


def video_tree(root: Path, per_class: int = 3, n: int = 6) -> Path:
    """root/{train,val}/{left,right}/clip: mp4, avi and frame folders; 'right' clips are 'left' ones reversed."""
    for s, split in enumerate(("train", "val")):
        for label, name in enumerate(("left", "right")):
            for i in range(per_class):
                clip = frames(n, seed=10 * s + i)
                clip = clip[::-1] if label else clip
                kind = i % 3
                if kind == 0:
                    write_video(root / split / name / f"c{i}.mp4", clip, options=LOSSLESS)
                elif kind == 1:
                    write_video(root / split / name / f"c{i}.avi", clip)
                else:
                    frame_folder(root / split / name / f"c{i}", clip)
    return root


# -- sampling ------------------------------------------------------------------------------------------------------
def test_uniform_sampling_spans_the_clip_and_is_mirror_symmetric():
    assert sample_indices(16, 8) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert sample_indices(8, 8) == list(range(8))
    # a reversed clip samples the mirrored frames: a clip and its reversal hold the same frames
    assert sorted(15 - i for i in sample_indices(16, 8)) == sample_indices(16, 8)
    assert sample_indices(20, 4, frame_stride=3) == [5, 8, 11, 14]  # frames 5-14: a centred window


def test_random_offset_sampling_keeps_the_spacing_and_reaches_every_frame():
    torch.manual_seed(0)
    draws = [sample_indices(16, 4, "random") for _ in range(200)]
    assert all(np.diff(d).min() >= 3 and np.diff(d).max() <= 5 for d in draws)  # even spacing (16 / 4 = 4)
    assert {i for d in draws for i in d} == set(range(16))
    starts = {sample_indices(20, 4, "random", frame_stride=3)[0] for _ in range(200)}
    assert starts == set(range(20 - 10 + 1))  # a window of 10 frames at every start


def test_short_clips_are_refused_looped_or_padded():
    with pytest.raises(DataError, match=r"3 frame\(s\), fewer than the 5 that 5 frames need"):
        sample_indices(3, 5)
    assert sample_indices(3, 5, short_clips="loop") == [0, 1, 2, 0, 1]
    assert sample_indices(3, 5, short_clips="pad") == [0, 1, 2, 2, 2]
    assert sample_indices(4, 3, frame_stride=2, short_clips="loop") == [0, 2, 0]
    with pytest.raises(ConfigError, match="short_clips must be one of"):
        sample_indices(3, 5, short_clips="stretch")


# -- decoding ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".mkv"])
def test_videos_decode_to_the_written_frames_in_order(tmp_path, suffix):
    clip = frames(7)
    path = write_video(tmp_path / f"c{suffix}", clip, options=LOSSLESS if suffix != ".avi" else None)
    source = probe_clip(path)
    assert source.num_frames == 7 and source.frames is None
    wanted = [6, 0, 3, 3]
    got = read_clip(source, wanted).permute(0, 2, 3, 1).numpy().astype(int)
    # error of each decoded frame against every written frame: lossy colour (4:2:0, JPEG), but each decoded frame
    # is by far the closest to the one written at its index
    error = np.abs(got[:, None] - clip[None].astype(int)).mean(axis=(2, 3, 4))  # (4, 7)
    assert error.argmin(1).tolist() == wanted
    margin = 2.0 if suffix != ".avi" else 1.2  # lossless H.264 / MJPEG at its default quality
    assert all(error[k, i] < 20 and np.delete(error[k], i).min() > margin * error[k, i] for k, i in enumerate(wanted))


def test_frame_folders_read_exactly_in_frame_number_order(tmp_path):
    clip = frames(5)
    folder = frame_folder(tmp_path / "clip", clip, numbers=[8, 9, 10, 11, 12])  # any start, consecutive
    source = probe_clip(folder)
    assert source.num_frames == 5 and source.frames[0].name == "img_00008.png"
    assert torch.equal(read_clip(source, [4, 0]), torch.from_numpy(clip[[4, 0]]).permute(0, 3, 1, 2))


def test_frame_folder_with_a_gap_or_a_duplicate_is_refused_naming_the_frame(tmp_path):
    folder = frame_folder(tmp_path / "gap", frames(4), numbers=[1, 2, 4, 5])
    with pytest.raises(DataError, match=r"gap: frame 3 missing between 'img_00002.png' and 'img_00004.png'"):
        probe_clip(folder)
    frame_folder(tmp_path / "dup", frames(2), numbers=[1, 2])
    Image.fromarray(frames(1)[0]).save(tmp_path / "dup" / "img_2.png")
    with pytest.raises(DataError, match="are both frame 2"):
        probe_clip(tmp_path / "dup")


def test_unreadable_and_truncated_videos_name_the_clip(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(DataError, match=r"cannot open video .*junk\.mp4"):
        probe_clip(tmp_path / "junk.mp4")
    whole = write_video(tmp_path / "whole.avi", frames(8)).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole[: len(whole) // 2])
    source = probe_clip(cut)  # the header still announces 8 frames
    assert source.num_frames == 8
    with pytest.raises(DataError, match=r"cut\.avi is truncated or damaged: \d frame\(s\) decode.*verify=True"):
        read_clip(source, [0, 7])
    with pytest.raises(DataError, match=r"cut\.avi is truncated or damaged: \d of the 8 frames"):
        probe_clip(cut, decode=True)


# -- datasets and layouts ------------------------------------------------------------------------------------------
def test_folder_dataset_mixes_videos_and_frame_folders_and_counts_what_it_refuses(tmp_path):
    root = video_tree(tmp_path / "data")
    write_video(root / "train" / "left" / "short.mp4", frames(2))
    (root / "train" / "right" / "broken.mkv").write_bytes(b"\x1a\x45\xdf\xa3 broken")
    frame_folder(root / "train" / "right" / "gappy", frames(6), numbers=[1, 2, 3, 5, 6, 7])
    (root / "train" / "right" / "notes.txt").write_text("not a clip")  # not a clip: ignored
    ds = build_video_dataset(root, "train", None, num_frames=4)
    assert ds.classes == ["left", "right"] and len(ds) == 6 and ds.targets.count(1) == 3
    refused = {Path(p).name: reason for p, reason in ds.skipped}
    assert set(refused) == {"short.mp4", "broken.mkv", "gappy"}
    assert "fewer than the 4" in refused["short.mp4"] and "frame 4 missing" in refused["gappy"]
    clip, label = ds[0]
    assert clip.shape == (4, 3, SIZE, SIZE) and clip.dtype == torch.float32 and label == 0
    looped = build_video_dataset(root, "train", None, num_frames=4, short_clips="loop")
    assert len(looped) == 7 and len(looped.skipped) == 2


def test_verify_refuses_truncated_videos_at_build_time(tmp_path):
    root = video_tree(tmp_path / "data", per_class=1)
    whole = write_video(tmp_path / "whole.avi", frames(8)).read_bytes()
    (root / "train" / "left" / "cut.avi").write_bytes(whole[: len(whole) // 2])
    lazy = build_video_dataset(root, "train", None, num_frames=4)
    index = [p.name for p, _ in lazy.samples].index("cut.avi")
    with pytest.raises(DataError, match=r"cut\.avi is truncated"):
        lazy[index]
    strict = build_video_dataset(root, "train", None, num_frames=4, verify=True)
    assert [Path(p).name for p, _ in strict.skipped] == ["cut.avi"] and len(strict) == len(lazy) - 1


def test_ucf101_lists_with_class_index_and_test_lists_without_labels(tmp_path):
    for name in ("ApplyLipstick", "Archery"):
        write_video(tmp_path / name / f"v_{name}_g01_c01.avi", frames(5))
    (tmp_path / "classInd.txt").write_text("1 ApplyLipstick\n2 Archery\n")
    (tmp_path / "trainlist01.txt").write_text(
        "ApplyLipstick/v_ApplyLipstick_g01_c01.avi 1\nArchery/v_Archery_g01_c01.avi 2\n"
    )
    (tmp_path / "testlist01.txt").write_text("Archery/v_Archery_g01_c01.avi\n")
    train = build_video_dataset(tmp_path, "trainlist01", None, num_frames=4)
    assert train.classes == ["ApplyLipstick", "Archery"] and train.targets == [0, 1]
    test = build_video_dataset(tmp_path, "testlist01", None, num_frames=4, classes=train.classes)
    assert test.targets == [1]
    (tmp_path / "bad.txt").write_text("Archery/v_Archery_g01_c01.avi 7\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 1: label '7' is not one of classInd\.txt's 1\.\.2"):
        build_video_dataset(tmp_path, "bad", None, num_frames=4)


def test_csv_and_kinetics_annotations_count_the_missing_videos(tmp_path):
    write_video(tmp_path / "clips" / "a.mp4", frames(5))
    (tmp_path / "train.csv").write_text("path,label\nclips/a.mp4,jump\n")
    assert build_video_dataset(tmp_path, "train", None, num_frames=4).classes == ["jump"]
    write_video(tmp_path / "val" / "abseiling" / "xyz_000004_000014.mp4", frames(5))
    write_video(tmp_path / "val" / "qqq_000000_000010.mkv", frames(5))
    (tmp_path / "val.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nabseiling,xyz,4,14,val\nzumba,qqq,0,10,val\nzumba,gone,0,10,val\n"
    )
    ds = build_video_dataset(tmp_path, "val", None, layout="csv", num_frames=4)
    assert ds.classes == ["abseiling", "zumba"] and ds.targets == [0, 1]
    assert len(ds.skipped) == 1 and "gone_000000_000010" in ds.skipped[0][0] and "not found" in ds.skipped[0][1]


def test_standard_augmentation_draws_once_per_clip():
    clip = torch.from_numpy(np.repeat(frames(1), 4, axis=0)).permute(0, 3, 1, 2)  # 4 identical frames
    tf = build_video_transforms({"mean": (0.5,) * 3, "std": (0.5,) * 3}, (24, 24), "standard", train=True)
    torch.manual_seed(0)
    outs = [tf(clip) for _ in range(6)]
    assert all(o.shape == (4, 3, 24, 24) and torch.equal(o[0], o[3]) for o in outs)  # one crop/flip per clip
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # and it is random


def test_find_clips_lists_videos_and_frame_folders(tmp_path):
    root = video_tree(tmp_path / "data", per_class=3)
    found = find_clips(root / "val")
    assert [p.name for p in found] == ["c0.mp4", "c1.avi", "c2"] * 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no video files"):
        find_clips(tmp_path / "empty")


# -- the task through the one loop ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = video_tree(tmp_path_factory.mktemp("video") / "data")
    write_video(root / "train" / "left" / "short.mp4", frames(2))
    return root


def test_train_eval_predict_a_video_task_and_report_refused_clips(tree, tmp_path, capsys):
    config = TrainConfig(backbone="test_vit", method="losa", task="video", data=str(tree), img_size=SIZE, epochs=2,
                         batch_size=2, lr=1e-2, warmup_epochs=0.5, workers=0, output=str(tmp_path / "run"),
                         task_options={"num_frames": 3, "frame_chunk": 4})  # fmt: skip
    result = fit(config)
    summary = result.summary
    assert summary["task"] == "video" and summary["data"]["train"] == 6 and summary["data"]["val"] == 6
    assert summary["data"]["skipped"] == 1 and "short.mp4" in summary["data"]["skipped_files"][0]["path"]
    assert any("1 clip(s) refused" in w for w in summary["warnings"])
    assert summary["metrics"]["final_val"]["count"] == 6
    adapter = tmp_path / "run" / "best"
    assert json.loads((adapter / "adapter_config.json").read_text())["num_frames"] == 3

    assert main(["eval", str(adapter), "--data", str(tree), "--split", "train"]) == 0
    metrics = json.loads((adapter / "eval_train.json").read_text())
    assert metrics["count"] == 6 and metrics["refused"] == 1 and "short.mp4" in metrics["refused_clips"][0]["path"]

    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"1 clip\(s\) refused and not predicted: .*short\.mp4"):
        assert main(["predict", str(adapter), str(tree / "train"), "--top-k", "2"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "path,label,score,label_2,score_2" and len(rows) == 1 + 6
    assert {r.split(",")[1] for r in rows[1:]} <= {"left", "right"}


def test_video_flags_belong_to_the_video_task(tree, tmp_path, capsys):
    assert (
        main(["train", "test_vit", "linear", "--data", str(tree), "--num-frames", "4", "--output", str(tmp_path)]) == 2
    )
    assert (
        "--num-frames: not an option of --task classification (it takes: --label-smoothing" in capsys.readouterr().err
    )
    with pytest.raises(ConfigError, match="clip_policy must be one of refuse, loop, pad"):
        TrainConfig(backbone="test_vit", method="linear", task="video", task_options={"clip_policy": "stretch"})


def test_train_and_eval_a_video_task_from_the_command_line_and_from_a_cache(tmp_path, capsys, one_thread):
    """`sidetune train --task video --num-frames T` and `sidetune eval` through the CLI entry point, on frame
    folders; then `sidetune cache build --task video` with the same flags and `sidetune train --cache` reproduce it."""
    from train_data import step_losses

    data = tmp_path / "data"
    for split, n in (("train", 2), ("val", 1)):
        for label, name in enumerate(("left", "right")):
            for i in range(n):
                clip = frames(4, seed=10 * label + i)
                frame_folder(data / split / name / f"c{i}", clip[::-1] if label else clip)
    common = ["test_vit", "--task", "video", "--num-frames", "3", "--frame-sampling", "uniform", "--data", str(data),
              "--img-size", str(SIZE), "--augmentation", "vtab", "--workers", "0", "--threads", "1"]  # fmt: skip
    run = ["train", common[0], "linear", *common[1:], "--epochs", "1", "--batch-size", "2", "--lr", "1e-2",
           "--no-progress"]  # fmt: skip
    assert main([*run, "--output", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1: train loss" in printed
    adapter = tmp_path / "run" / "best"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["task"] == "video" and saved["num_frames"] == 3 and saved["method"] == "linear"
    assert main(["eval", str(adapter), "--data", str(data), "--split", "val", "--workers", "0"]) == 0
    metrics = json.loads((adapter / "eval_val.json").read_text())
    assert metrics["count"] == 2 and metrics["refused"] == 0 and 0.0 <= metrics["top1"] <= 1.0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["top1"] == metrics["top1"]  # the metrics on stdout, the summary on stderr
    assert f"wrote {adapter / 'eval_val.json'}" in printed.err

    cache = tmp_path / "cache"
    assert main(["cache", "build", *common, "--methods", "linear", "--output", str(cache), "--no-progress"]) == 0
    assert "cached 6 samples of train, val for linear" in capsys.readouterr().out
    assert main([*run, "--cache", str(cache), "--output", str(tmp_path / "cached")]) == 0
    assert step_losses(tmp_path / "cached") == pytest.approx(step_losses(tmp_path / "run"), rel=5e-3, abs=5e-3)
