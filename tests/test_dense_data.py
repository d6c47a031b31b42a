"""Tests for sidetune.data segmentation and detection datasets: layouts, joint transforms, bad-data policies, COCO."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from sidetune.data import (
    ADE20K_CLASSES,
    BCCD_CLASSES,
    CAMVID_CLASSES,
    IGNORE_INDEX,
    VOC_CLASSES,
    ADE20KDataset,
    CamVidDataset,
    CocoDetectionDataset,
    DataError,
    MaskFolderDataset,
    SegNetDataset,
    VOCDetectionDataset,
    VOCSegmentationDataset,
    build_detection_transforms,
    build_segmentation_dataset,
    build_segmentation_transforms,
    detection_collate,
    to_coco,
)

from conftest import DATA, require_asset

# A colour per label: the joint-transform test reads the label back from the image.
COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], dtype=np.uint8)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_pair(image_path: Path, mask_path: Path, labels: np.ndarray, *, mode: str = "L", palette=None) -> None:
    """An image coloured by ``labels`` (void pixels grey) and the label PNG."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.full((*labels.shape, 3), 128, dtype=np.uint8)
    valid = labels < len(COLOURS)
    rgb[valid] = COLOURS[labels[valid]]
    Image.fromarray(rgb).save(image_path)
    mask = Image.fromarray(labels.astype(np.uint8), mode="L")
    if mode == "P":
        mask = mask.convert("P")
        mask.putpalette(palette)
    mask.save(mask_path)


def quadrants(h: int = 40, w: int = 48, void: int = 11) -> np.ndarray:
    labels = np.zeros((h, w), dtype=np.int64)
    labels[: h // 2, w // 2 :] = 1
    labels[h // 2 :, : w // 2] = 2
    labels[h // 2 :, w // 2 :] = 3
    labels[:2] = void  # a void border
    return labels


@pytest.fixture
def segnet(tmp_path: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            write_pair(tmp_path / split / f"f{i}.png", tmp_path / f"{split}annot" / f"f{i}.png", quadrants())
    return tmp_path


# -- segmentation ---------------------------------------------------------------------------------------------
def test_segnet_layout_maps_void_to_ignore(segnet: Path):
    ds = SegNetDataset(segnet, "train")
    assert len(ds) == 3 and ds.classes == list(CAMVID_CLASSES) and ds.num_classes == 11
    image, mask = ds[0]
    assert image.shape == (3, 40, 48) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert mask.shape == (40, 48) and mask.dtype == torch.long
    assert sorted(mask.unique().tolist()) == [0, 1, 2, 3, IGNORE_INDEX]
    assert (mask[:2] == IGNORE_INDEX).all()
    assert ds.validate() == []
    assert isinstance(build_segmentation_dataset(segnet, "val"), SegNetDataset)


def test_joint_transforms_keep_image_and_mask_aligned(segnet: Path):
    torch.manual_seed(0)
    tf = build_segmentation_transforms(32, train=True, mean=(0, 0, 0), std=(1, 1, 1), scale_range=(0.6, 1.6))
    ds = SegNetDataset(segnet, "train", tf)
    colours = torch.tensor(COLOURS, dtype=torch.float32) / 255
    for i in range(6):
        image, mask = ds[i % len(ds)]
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.long
        valid = mask != IGNORE_INDEX
        # nearest colour of each scored pixel = its label, except along blurred region edges
        dist = ((image.permute(1, 2, 0)[..., None, :] - colours) ** 2).sum(-1)
        agree = (dist.argmin(-1) == mask)[valid].float().mean()
        assert agree > 0.9, agree
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}  # nearest: no blended labels


def test_eval_transform_resizes_masks_with_nearest(segnet: Path):
    tf = build_segmentation_transforms((20, 24), train=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    image, mask = SegNetDataset(segnet, "val", tf)[0]
    assert image.shape == (3, 20, 24) and mask.shape == (20, 24)
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
    keep = build_segmentation_transforms(20, train=False, mean=(0.5,) * 3, std=(0.5,) * 3, resize_eval=False)
    assert SegNetDataset(segnet, "val", keep)[0][1].shape == (40, 48)


def test_bad_masks_fail_with_the_file_name(segnet: Path):
    (segnet / "trainannot" / "f1.png").unlink()
    with pytest.raises(DataError, match=r"f1\.png"):
        SegNetDataset(segnet, "train")
    write_pair(segnet / "train" / "f1.png", segnet / "trainannot" / "f1.png", quadrants(30, 30))  # image too
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(segnet / "trainannot" / "f1.png")  # wrong size
    labels = quadrants()
    labels[5, 5] = 42
    Image.fromarray(labels.astype(np.uint8)).save(segnet / "trainannot" / "f2.png")  # value 42 > 11 classes
    ds = SegNetDataset(segnet, "train")
    with pytest.raises(DataError, match=r"f1\.png is 10x10 but its image .*f1\.png is 30x30"):
        ds[1]
    with pytest.raises(DataError, match=r"f2\.png has label value\(s\) 42 .*valid file values are 0-11, 255"):
        ds[2]
    problems = ds.validate()
    assert len(problems) == 2 and "f1.png" in problems[0] and "42" in problems[1]
    Image.new("RGB", (48, 40)).save(segnet / "trainannot" / "f0.png")
    with pytest.raises(DataError, match=r"f0\.png is a RGB image"):
        ds[0]


def test_ade20k_layout_shifts_labels(tmp_path: Path):
    labels = np.array([[0, 1, 150], [2, 0, 3]], dtype=np.int64).repeat(4, 0).repeat(4, 1)
    for split in ("training", "validation"):
        write_pair(tmp_path / "images" / split / "a.jpg", tmp_path / "annotations" / split / "a.png", labels)
    ds = ADE20KDataset(tmp_path, "val")
    assert ds.num_classes == 150 and ds.classes == list(ADE20K_CLASSES)
    mask = ds[0][1]
    expected = torch.tensor([[IGNORE_INDEX, 0, 149], [1, IGNORE_INDEX, 2]]).repeat_interleave(4, 0)
    torch.testing.assert_close(mask, expected.repeat_interleave(4, 1))
    assert isinstance(build_segmentation_dataset(tmp_path, "training"), ADE20KDataset)
    labels[0, 0] = 151
    Image.fromarray(labels.astype(np.uint8)).save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(DataError, match="151"):
        ADE20KDataset(tmp_path, "train")[0]


def test_voc_segmentation_reads_palette_indices(tmp_path: Path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    labels = np.array([[0, 15], [255, 20]], dtype=np.int64).repeat(8, 0).repeat(8, 1)
    palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]  # colours unlike the indices
    write_pair(
        root / "JPEGImages" / "2007_000001.jpg",
        root / "SegmentationClass" / "2007_000001.png",
        labels,
        mode="P",
        palette=palette,
    )
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    ds = VOCSegmentationDataset(tmp_path, "val")  # finds VOCdevkit/VOC2012
    assert ds.classes == list(VOC_CLASSES) and len(ds) == 1
    assert sorted(ds[0][1].unique().tolist()) == [0, 15, 20, IGNORE_INDEX]
    with pytest.raises(DataError, match="no split list"):
        VOCSegmentationDataset(root, "train")


def test_mask_folder_with_class_list(tmp_path: Path):
    labels = np.array([[0, 1], [2, 9]]).repeat(4, 0).repeat(4, 1)
    write_pair(tmp_path / "img" / "x.jpg", tmp_path / "masks" / "x_mask.png", labels)
    ds = MaskFolderDataset(
        tmp_path / "img", tmp_path / "masks", ["bg", "a", "b"], ignore_value=9, mask_suffix="_mask.png"
    )
    assert sorted(ds[0][1].unique().tolist()) == [0, 1, 2, IGNORE_INDEX]
    shifted = MaskFolderDataset(
        tmp_path / "img",
        tmp_path / "masks",
        ["a", "b"],
        mask_suffix="_mask.png",
        ignore_value=9,
        reduce_zero_label=True,
    )
    assert sorted(shifted[0][1].unique().tolist()) == [0, 1, IGNORE_INDEX]
    with pytest.raises(DataError, match=r"x\.png"):
        MaskFolderDataset(tmp_path / "img", tmp_path / "masks", ["bg"])  # looks for x.png


def test_no_known_layout_is_reported(tmp_path: Path):
    with pytest.raises(DataError, match="no segmentation layout"):
        build_segmentation_dataset(tmp_path, "train")


# -- detection: Pascal VOC ------------------------------------------------------------------------------------
def voc_xml(filename: str, size: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b in objects
    )
    w, h = size
    size_xml = f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
    return f"<annotation><filename>{filename}</filename>{size_xml}{body}</annotation>"


def make_voc(root: Path, items: dict[str, list], size=(64, 48), splits=None) -> Path:
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for name, objects in items.items():
        Image.new("RGB", size, (40, 40, 40)).save(root / "JPEGImages" / f"{name}.jpg")
        (root / "Annotations" / f"{name}.xml").write_text(voc_xml(f"{name}.jpg", size, objects))
    for split, names in (splits or {"train": list(items)}).items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_voc_detection_targets(tmp_path: Path):
    root = make_voc(tmp_path, {"a": [("WBC", (11, 21, 30, 40)), ("RBC", (1, 1, 64, 48))], "b": []})
    ds = VOCDetectionDataset(root, "train", classes=BCCD_CLASSES)
    assert ds.classes == list(BCCD_CLASSES) and ds.num_classes == 4 and len(ds) == 2
    image, target = ds[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and image.max() <= 1
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.name == "XYXY"
    assert target["boxes"].canvas_size == (48, 64)
    # 1-based inclusive corners -> pixel edges: the whole image is (0, 0, W, H)
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor), torch.tensor([[10.0, 20, 30, 40], [0, 0, 64, 48]])
    )
    assert target["labels"].tolist() == [2, 1] and target["image_id"] == 0
    assert ds[1][1]["boxes"].shape == (0, 4)  # an image without objects is kept
    assert VOCDetectionDataset(root, None).classes == ["RBC", "WBC"]  # default: sorted names in every XML


def test_voc_unknown_class_names_the_file(tmp_path: Path):
    root = make_voc(tmp_path, {"a": [("RBC", (1, 1, 9, 9))], "b": [("Neutrophil", (1, 1, 9, 9))]})
    with pytest.raises(
        DataError, match=r"b\.xml: unknown class name 'Neutrophil'; known classes: \['RBC', 'WBC', 'Platelets'\]"
    ):
        VOCDetectionDataset(root, "train", classes=BCCD_CLASSES)


def test_voc_boxes_clipped_and_zero_area_dropped_with_one_warning(tmp_path: Path):
    objects = [("RBC", (-5, 1, 30, 20)), ("RBC", (50, 30, 90, 60)), ("RBC", (20, 20, 20, 30)), ("WBC", (70, 1, 80, 9))]
    root = make_voc(tmp_path, {"a": objects, "b": [("RBC", (5, 5, 5, 5))]})
    with pytest.warns(
        UserWarning, match=r"clipped 2 of 5 boxes .* dropped 3 of 5 boxes of zero area \(first in .*a\.xml\)"
    ) as rec:
        ds = VOCDetectionDataset(root, "train", classes=BCCD_CLASSES)
    assert len(rec) == 1
    boxes = ds[0][1]["boxes"].as_subclass(torch.Tensor)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0, 30, 20], [49, 29, 64, 48]]))
    assert len(ds[1][1]["boxes"]) == 0


def test_voc_missing_image_fails_at_construction(tmp_path: Path):
    root = make_voc(tmp_path, {"a": [], "b": []}, splits={"train": ["a", "b", "c"]})
    with pytest.raises(DataError, match=r"c\.xml"):
        VOCDetectionDataset(root, "train", classes=BCCD_CLASSES)
    (root / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"b\.jpg"):
        VOCDetectionDataset(root, None, classes=BCCD_CLASSES)


def test_detection_transforms_move_boxes_with_the_image(tmp_path: Path):
    root = make_voc(tmp_path, {"a": [("RBC", (11, 21, 30, 40))]})
    flip = v2.Compose([v2.RandomHorizontalFlip(1.0), v2.ToDtype(torch.float32, scale=True)])
    _, target = VOCDetectionDataset(root, "train", flip)[0]
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor([[34.0, 20, 54, 40]]))
    torch.manual_seed(0)
    ds = VOCDetectionDataset(root, "train", build_detection_transforms(train=True, img_size=32))
    for _ in range(5):
        image, target = ds[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        boxes = target["boxes"].as_subclass(torch.Tensor)
        assert len(boxes) == len(target["labels"]) <= 1
        assert ((boxes >= 0) & (boxes <= 32)).all()
    image, _ = VOCDetectionDataset(root, "train", build_detection_transforms(train=False))[0]
    assert image.shape == (3, 48, 64)  # eval keeps the original size: the detector letterboxes


def test_collate_and_to_coco(tmp_path: Path):
    root = make_voc(tmp_path, {"a": [("WBC", (11, 21, 30, 40)), ("RBC", (1, 1, 10, 10))], "b": [("RBC", (5, 5, 9, 9))]})
    ds = VOCDetectionDataset(root, "train", classes=BCCD_CLASSES)
    images, targets = next(iter(DataLoader(ds, batch_size=2, collate_fn=detection_collate)))
    assert len(images) == 2 and type(targets[0]["boxes"]) is torch.Tensor and targets[1]["image_id"] == 1
    gt = to_coco(ds)
    assert sorted(gt.imgs) == [0, 1] and len(gt.anns) == 3
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == list(BCCD_CLASSES)
    ann = gt.loadAnns(gt.getAnnIds(imgIds=[0], catIds=[2]))[0]
    assert ann["bbox"] == [10.0, 20.0, 20.0, 20.0] and ann["area"] == 400.0
    sub = to_coco(Subset(ds, [1]))
    assert sorted(sub.imgs) == [1] and len(sub.anns) == 1


# -- detection: COCO ------------------------------------------------------------------------------------------
def make_coco_files(root: Path) -> Path:
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "img" / "one.jpg")
    Image.new("RGB", (20, 20)).save(root / "img" / "two.jpg")
    data = {
        "images": [
            {"id": 10, "file_name": "one.jpg", "width": 40, "height": 30},
            {"id": 11, "file_name": "two.jpg", "width": 20, "height": 20},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 10,
                "category_id": 7,
                "bbox": [2, 2, 10, 8],
                "area": 80,
                "iscrowd": 0,
                "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]],
            },
            {
                "id": 2,
                "image_id": 10,
                "category_id": 3,
                "bbox": [30, 20, 15, 15],
                "area": 225,
                "iscrowd": 0,
                "segmentation": [[30, 20, 40, 20, 40, 30, 30, 30]],
            },
            {
                "id": 3,
                "image_id": 10,
                "category_id": 3,
                "bbox": [0, 0, 5, 5],
                "area": 25,
                "iscrowd": 1,
                "segmentation": {"size": [30, 40], "counts": [0, 5, 25, 5, 25, 5, 25, 5, 25, 5, 1075]},
            },
            {
                "id": 4,
                "image_id": 11,
                "category_id": 3,
                "bbox": [4, 4, 0, 6],
                "area": 0,
                "iscrowd": 0,
                "segmentation": [[4, 4, 4, 10, 4, 10]],
            },
        ],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return root


def test_coco_dataset_maps_categories_and_policies(tmp_path: Path):
    root = make_coco_files(tmp_path)
    with pytest.warns(UserWarning, match=r"clipped 1 of 3 boxes .* dropped 1 of 3 boxes of zero area") as rec:
        ds = CocoDetectionDataset(root / "img", root / "ann.json", masks=True)
    assert len(rec) == 1
    assert ds.classes == ["cat", "dog"] and ds.category_ids == [3, 7] and ds.num_classes == 3
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and target["image_id"] == 10
    assert target["labels"].tolist() == [2, 1]  # dog (id 7) -> 2, cat (id 3) -> 1; the crowd box is not a target
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor), torch.tensor([[2.0, 2, 12, 10], [30, 20, 40, 30]])
    )
    assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].shape == (2, 30, 40)
    assert target["masks"][0, 4:9, 4:11].all() and target["masks"][0].sum() < 120
    assert len(ds[1][1]["boxes"]) == 0 and ds[1][1]["masks"].shape == (0, 20, 20)
    gt = to_coco(ds)
    crowd = [a for a in gt.anns.values() if a["iscrowd"]]
    assert len(gt.anns) == 3 and len(crowd) == 1 and crowd[0]["category_id"] == 1
    assert all("segmentation" in a for a in gt.anns.values())


def test_coco_missing_images_name_the_file(tmp_path: Path):
    root = make_coco_files(tmp_path)
    (root / "img" / "two.jpg").unlink()
    with pytest.raises(DataError, match=r"ann\.json references 1 image\(s\) .*two\.jpg"):
        CocoDetectionDataset(root / "img", root / "ann.json")


def test_image_size_must_match_its_annotation(tmp_path: Path):
    root = make_voc(tmp_path, {"a": [("RBC", (1, 1, 9, 9))]})
    Image.new("RGB", (10, 10)).save(root / "JPEGImages" / "a.jpg")
    with pytest.raises(DataError, match=r"a\.jpg is 10x10 but .*a\.xml declares 64x48"):
        VOCDetectionDataset(root, "train")[0]


# -- the shared real data -------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_shared_camvid():
    root = require_asset(DATA / "camvid-240x180")
    sizes = {split: len(CamVidDataset(root, split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 367, "val": 101, "test": 233}
    ds = build_segmentation_dataset(
        root, "val", build_segmentation_transforms(64, train=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    )
    image, mask = ds[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
    assert set(mask.unique().tolist()) <= {*range(11), IGNORE_INDEX}
    assert CamVidDataset(root, "test").validate() == []


@pytest.mark.e2e
def test_shared_bccd():
    root = require_asset(DATA / "bccd")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        full = VOCDetectionDataset(root, None, classes=BCCD_CLASSES)
    assert len(full) == 364 and any(
        "dropped 2 of 4888 boxes of zero area" in str(w.message) for w in rec
    )  # two point boxes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = {s: len(VOCDetectionDataset(root, s, classes=BCCD_CLASSES)) for s in ("train", "val", "test")}
    assert splits == {"train": 205, "val": 87, "test": 72}
    ds = VOCDetectionDataset(root, "test", classes=BCCD_CLASSES)
    image, target = ds[0]
    assert image.shape == (3, 480, 640) and set(target["labels"].tolist()) <= {1, 2, 3}
    gt = to_coco(ds)
    assert len(gt.imgs) == 72 and len(gt.anns) == sum(len(r.boxes) for r in ds.records)
