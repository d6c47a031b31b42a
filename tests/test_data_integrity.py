"""Data that must not silently become wrong (issue 15.5, 15.7): deep and float images, directory links that loop,
one file under two labels, skipped files recorded with their reason, float CSV labels, swapped box corners, and
decode errors that advise what a command-line user can do."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sidetune.data import (
    CocoDetectionDataset,
    DataError,
    ImageFolderDataset,
    build_classification_dataset,
    build_detection_dataset,
    build_segmentation_dataset,
    load_rgb,
    skipped_files,
)
from sidetune.data.classification import ClassificationSubset


def rgb(path: Path, value: int = 100, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def tree(root: Path, counts: dict[str, int]) -> Path:
    for label, name in enumerate(sorted(counts)):
        for i in range(counts[name]):
            rgb(root / name / f"{i}.png", 40 * label)
    return root


# -- bit depth ----------------------------------------------------------------------------------------------------
def test_16bit_png_is_scaled_by_its_range_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 10, 257 * 128, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode == "I;16"
    out = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 10, 128, 255]  # PIL alone gives [0, 255, 255, 255]


def test_float_tiff_in_unit_range_is_scaled_to_8_bit(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32).repeat(3, 0)
    Image.fromarray(values).save(tmp_path / "f.tif")
    out = np.asarray(load_rgb(tmp_path / "f.tif"))
    assert out[0, :, 1].tolist() == [0, 64, 128, 255]  # PIL alone gives all black


def test_float_tiff_in_byte_range_is_kept(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0.0, 7.0, 254.6]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(load_rgb(tmp_path / "f.tif"))[0, :, 2].tolist() == [0, 7, 255]


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        (np.array([[-1.0, 0.5]], dtype=np.float32), r"PIL mode 'F' with values in \[-1, 0.5\]"),
        (np.array([[0.0, 900.0]], dtype=np.float32), r"PIL mode 'F' with values in \[0, 900\]"),
        (np.array([[0.0, np.nan]], dtype=np.float32), r"float \(PIL mode 'F'\) image with 1 NaN"),
        (np.array([[0, 70000]], dtype=np.int32), r"PIL mode 'I' with values in \[0, 70000\]"),
    ],
)
def test_float_or_int_images_of_unknown_scale_are_refused_naming_the_mode(tmp_path: Path, values, pattern) -> None:
    Image.fromarray(values).save(tmp_path / "x.tif")
    with pytest.raises(DataError, match=pattern) as info:
        load_rgb(tmp_path / "x.tif")
    assert "x.tif" in str(info.value)


def test_dataset_reads_16bit_images_through_its_loader(tmp_path: Path) -> None:
    tree(tmp_path, {"a": 1, "b": 1})
    Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16)).save(tmp_path / "a" / "deep.png")
    Image.fromarray(np.full((6, 8), 257 * 50, dtype=np.uint16)).save(tmp_path / "b" / "deep.png")
    ds = build_classification_dataset(tmp_path)
    index = [str(p) for p, _ in ds.samples].index(str(tmp_path / "b" / "deep.png"))
    image, _ = ds[index]
    torch.testing.assert_close(image, torch.full((3, 6, 8), 50 / 255))


# -- links, duplicates, skipped files -----------------------------------------------------------------------------
@pytest.mark.parametrize(("where", "target"), [("cat/loop", "root"), ("dog/deeper/up", "../..")])
def test_directory_link_loop_is_not_followed_and_is_recorded(tmp_path: Path, where: str, target: str) -> None:
    root = tree(tmp_path / "data", {"cat": 4, "dog": 4})
    link = root / where
    link.parent.mkdir(exist_ok=True)
    os.symlink(root if target == "root" else target, link)  # the link would read every class again under its own
    ds = build_classification_dataset(root)
    assert len(ds) == 8 and sorted(ds.targets) == [0] * 4 + [1] * 4  # torchvision's make_dataset: 328 samples
    assert dict(ds.skipped)[str(link)] == f"directory link that loops back to its ancestor {root}"


def test_link_making_one_image_two_classes_is_refused(tmp_path: Path) -> None:
    root = tree(tmp_path / "data", {"cat": 2, "dog": 2})
    os.symlink(root / "dog", root / "cat" / "more")  # not a loop, but every dog would also be a cat
    with pytest.raises(DataError, match=r"one image file is read under two classes: .*\(class 'cat'\) and .*"
                       r"\(class 'dog'\)"):  # fmt: skip
        build_classification_dataset(root)


def test_same_file_twice_in_one_class_is_read_once(tmp_path: Path) -> None:
    root = tree(tmp_path / "data", {"cat": 2, "dog": 1})
    (root / "cat" / "sub").mkdir()
    os.symlink(root / "cat" / "0.png", root / "cat" / "sub" / "again.png")
    ds = build_classification_dataset(root)
    assert len(ds) == 3
    assert ds.skipped == [(str(root / "cat" / "sub" / "again.png"), f"duplicate of {root / 'cat' / '0.png'} (the "
                                                                     "same file, reached through a link)")]  # fmt: skip


def test_imagefolder_records_what_it_skips_with_the_reason(tmp_path: Path) -> None:
    root = tree(tmp_path / "data", {"a": 1, "b": 1})
    (root / "a" / "notes.txt").write_text("x")
    (root / "a" / ".DS_Store").write_bytes(b"\0")
    (root / "b" / "raw.cr2").write_bytes(b"\0")
    (root / "README.md").write_text("x")
    (root / ".cache").mkdir()
    os.symlink(root / "nowhere.png", root / "b" / "dangling.png")
    ds = ImageFolderDataset(root)
    reasons = {Path(p).name: r for p, r in ds.skipped}
    assert reasons["notes.txt"].startswith("unsupported format (.txt;")
    assert reasons["raw.cr2"].startswith("unsupported format (.cr2;")
    assert reasons[".DS_Store"] == "hidden file" and reasons[".cache"] == "hidden folder"
    assert reasons["README.md"] == "not inside a class folder"
    assert reasons["dangling.png"] == "broken link"
    assert len(ds.skipped) == 6
    sub = ClassificationSubset(ds, [0])
    assert sub.skipped == ds.skipped == skipped_files(torch.utils.data.Subset(sub, [0]))

    class Seeded(torch.utils.data.Dataset):  # a wrapper as the training loop's: same indices, a .dataset
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

    assert skipped_files(Seeded(torch.utils.data.Subset(ds, [1, 0]))) == ds.skipped


def test_skip_corrupt_records_each_file_with_its_reason(tmp_path: Path) -> None:
    root = tree(tmp_path, {"a": 2, "b": 2})
    (root / "b" / "broken.png").write_bytes(b"not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = build_classification_dataset(root, skip_corrupt=True)
    assert len(ds) == 4
    [(path, reason)] = ds.skipped
    assert path == str(root / "b" / "broken.png") and reason.startswith("unreadable (UnidentifiedImageError")


def test_segmentation_records_unpaired_files(tmp_path: Path) -> None:
    (tmp_path / "trainannot").mkdir()
    for name in ("a", "b", "orphan"):
        Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "trainannot" / f"{name}.png")
    rgb(tmp_path / "train" / "a.jpg")
    rgb(tmp_path / "train" / "a.png")  # a second image with stem "a"
    rgb(tmp_path / "train" / "b.png")
    (tmp_path / "train" / "notes.txt").write_text("x")
    ds = build_segmentation_dataset(tmp_path, "train")
    assert [(i.name, m.name) for i, m in ds.samples] == [("a.jpg", "a.png"), ("b.png", "b.png")]
    reasons = {Path(p).name: r for p, r in ds.skipped}
    assert reasons["notes.txt"].startswith("unsupported format (.txt")
    assert reasons["a.png"] == "another image with the same stem (a.jpg) uses its mask"
    assert reasons["orphan.png"].startswith("mask without an image (no orphan.* in")
    assert len(ds.skipped) == 3


def test_coco_split_records_images_the_json_does_not_list(tmp_path: Path) -> None:
    rgb(tmp_path / "train" / "one.jpg", size=(20, 10))
    rgb(tmp_path / "train" / "extra.jpg")
    data = {
        "images": [{"id": 1, "file_name": "one.jpg", "width": 20, "height": 10}],
        "categories": [{"id": 1, "name": "cell"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(data))
    ds = build_detection_dataset(tmp_path, "train")
    assert isinstance(ds, CocoDetectionDataset) and len(ds) == 1
    assert ds.skipped == [(str(tmp_path / "train" / "extra.jpg"), "not listed in instances_train.json (no annotation "
                                                                  "entry)")]  # fmt: skip


# -- messages -----------------------------------------------------------------------------------------------------
def test_decode_error_advises_the_data_check_command(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png.*`sidetune data check DATA_DIR --task TASK` "
                       r"lists every unreadable file"):  # fmt: skip
        load_rgb(tmp_path / "broken.png")


@pytest.mark.parametrize("labels", [["0.0", "1.0"], ["1", "2.5"], ["0", "1e3"]])
def test_csv_float_labels_are_named_as_decimal_numbers(tmp_path: Path, labels: list[str]) -> None:
    rows = []
    for i, label in enumerate(labels):
        rgb(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{label}")
    (tmp_path / "d.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    bad = next(n for n, label in enumerate(labels, start=2) if not label.isdigit())
    with pytest.raises(DataError, match=rf"d\.csv, line {bad}: label '.*' is a decimal number") as info:
        build_classification_dataset(tmp_path / "d.csv")
    assert "mixes integer" not in str(info.value) and ".astype(int)" in str(info.value)


def voc(root: Path, boxes: list[tuple[int, int, int, int]]) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    rgb(root / "JPEGImages" / "a.jpg", size=(64, 48))
    objects = "".join(
        f"<object><name>cell</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>"
        for b in boxes
    )
    size = "<size><width>64</width><height>48</height></size>"
    (root / "Annotations" / "a.xml").write_text(f"<annotation><filename>a.jpg</filename>{size}{objects}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    return root


def test_voc_swapped_corners_are_reordered_and_counted(tmp_path: Path) -> None:
    root = voc(tmp_path, [(30, 40, 11, 21), (11, 21, 30, 40), (5, 5, 5, 9)])
    with pytest.warns(UserWarning, match=r"reordered 1 of 3 boxes whose corners were swapped .* dropped 1 of 3 boxes "
                      r"of zero area") as rec:  # fmt: skip
        ds = build_detection_dataset(root, "train")
    assert len(rec) == 1
    boxes = ds[0][1]["boxes"].as_subclass(torch.Tensor)
    torch.testing.assert_close(boxes, torch.tensor([[10.0, 20, 30, 40], [10, 20, 30, 40]]))
    assert ds.box_fixes == {"boxes": 3, "swapped": 1, "clipped": 0, "dropped": 1}


def test_coco_negative_width_is_reordered_not_dropped(tmp_path: Path) -> None:
    rgb(tmp_path / "img" / "one.jpg", size=(40, 30))
    data = {
        "images": [{"id": 1, "file_name": "one.jpg", "width": 40, "height": 30}],
        "categories": [{"id": 1, "name": "cell"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 5, -10, 8], "area": 80, "iscrowd": 0}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="reordered 1 of 1 boxes whose corners were swapped"):
        ds = CocoDetectionDataset(tmp_path / "img", tmp_path / "ann.json")
    torch.testing.assert_close(ds[0][1]["boxes"].as_subclass(torch.Tensor), torch.tensor([[10.0, 5, 20, 13]]))


def test_coco_annotation_with_an_unknown_category_is_named(tmp_path: Path) -> None:
    rgb(tmp_path / "img" / "one.jpg")
    data = {
        "images": [{"id": 1, "file_name": "one.jpg", "width": 8, "height": 6}],
        "categories": [{"id": 1, "name": "cell"}],
        "annotations": [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotation id 9 .* category_id 5, which is not among the file's categories"):
        CocoDetectionDataset(tmp_path / "img", tmp_path / "ann.json")
