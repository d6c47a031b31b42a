"""Tests for sidetune.data: classification datasets (ImageFolder, VTAB-1k lists, CSV), splits and transforms."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from sidetune.data import (
    ClassificationDataset,
    ClassificationSubset,
    DataError,
    ToRGB,
    build_classification_dataset,
    build_transforms,
    check_num_classes,
    resolve_backbone_data_config,
    split_train_val,
    verify_images,
)
from sidetune.errors import ConfigError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "data"


def colour(label: int) -> tuple[int, int, int]:
    """A distinct RGB colour per label, so a loaded pixel tells which file was read."""
    return (10 + 30 * label, 200 - 20 * label, 5 * label)


def write_png(path: Path, label: int = 0, mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour(label))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def make_tree(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/<i>.png, each image filled with the colour of its class's sorted index."""
    for label, name in enumerate(sorted(counts)):
        for i in range(counts[name]):
            write_png(root / name / f"{i}.png", label)
    return root


def make_vtab(root: Path, lists: dict[str, list[tuple[str, int]]]) -> Path:
    for name, entries in lists.items():
        for rel, label in entries:
            if not (root / rel).exists():
                write_png(root / rel, label)
        (root / f"{name}.txt").write_text("".join(f"{rel} {label}\n" for rel, label in entries))
    return root


def fake_dataset(counts: list[int]) -> ClassificationDataset:
    """A dataset of non-existent files: enough for anything that only reads labels."""
    samples = [(Path(f"c{y}/{i}.png"), y) for y, n in enumerate(counts) for i in range(n)]
    return ClassificationDataset(samples, [f"c{y}" for y in range(len(counts))])


# ----------------------------------------------------------------------------------------- ImageFolder


def test_imagefolder_sorted_classes_labels_and_pixels(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data", {"zebra": 2, "ant": 3, "moth": 1})
    ds = build_classification_dataset(root)
    assert ds.classes == ["ant", "moth", "zebra"]
    assert len(ds) == 6
    assert Counter(ds.targets) == {0: 3, 1: 1, 2: 2}
    assert all(isinstance(p, Path) and p.parent.name == ds.classes[y] for p, y in ds.samples)
    for index in (0, 3, 5):
        image, label = ds[index]
        assert isinstance(label, int) and label == ds.samples[index][1]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        expected = torch.tensor(colour(label), dtype=torch.float32) / 255
        torch.testing.assert_close(image[:, 0, 0], expected)


def test_imagefolder_ignores_non_images_and_hidden_files(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"a": 2, "b": 1})
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".DS_Store").write_bytes(b"\0\1")
    write_png(root / "b" / "._resource_fork.png")
    write_png(root / "b" / "UPPER.PNG", 1)  # extensions match case-insensitively
    (root / ".ipynb_checkpoints").mkdir()
    ds = build_classification_dataset(root)
    assert ds.classes == ["a", "b"]
    assert sorted(p.name for p, _ in ds.samples) == ["0.png", "0.png", "1.png", "UPPER.PNG"]


def test_imagefolder_split_subfolders(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", {"cat": 3, "dog": 2})
    make_tree(tmp_path / "test", {"cat": 1, "dog": 1})
    train = build_classification_dataset(tmp_path, split="train")
    test = build_classification_dataset(tmp_path, split="test")
    assert (len(train), len(test)) == (5, 2)
    assert train.classes == test.classes == ["cat", "dog"]
    # Without split, "train"/"test" would silently become two classes.
    with pytest.raises(DataError, match=r"split='test'"):
        build_classification_dataset(tmp_path)
    with pytest.raises(DataError, match="no split 'val'"):
        build_classification_dataset(tmp_path, split="val")


def test_imagefolder_given_classes_align_test_with_train(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    make_tree(tmp_path / "test", {"c": 2})  # the test split lacks classes a and b
    train = build_classification_dataset(tmp_path, split="train")
    test = build_classification_dataset(tmp_path, split="test", classes=train.classes)
    assert test.classes == ["a", "b", "c"] and test.targets == [2, 2]
    make_tree(tmp_path / "test", {"d": 1})
    with pytest.raises(DataError, match=r"\['d'\].*not among the given classes"):
        build_classification_dataset(tmp_path, split="test", classes=train.classes)


def test_imagefolder_missing_empty_and_imageless_class(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.*does not exist"):
        build_classification_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no class folders"):
        build_classification_dataset(tmp_path / "empty")
    root = make_tree(tmp_path / "d", {"full": 2})
    (root / "hollow").mkdir()
    (root / "hollow" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"hollow.*contain no images") as info:
        build_classification_dataset(root)
    assert str(root / "hollow") in str(info.value)


def test_grayscale_and_rgba_load_as_rgb(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "gray.png", 2, mode="L")
    write_png(tmp_path / "a" / "rgba.png", 2, mode="RGBA")
    write_png(tmp_path / "a" / "palette.png", 2, mode="P")
    ds = build_classification_dataset(tmp_path)
    for i in range(len(ds)):
        image, _ = ds[i]
        assert image.shape == (3, 8, 8)
    gray = ds[[p.name for p, _ in ds.samples].index("gray.png")][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


# ----------------------------------------------------------------------------------------- VTAB-1k


def test_vtab_splits_aliases_and_class_count(tmp_path: Path) -> None:
    train800 = [("images/a0.png", 0), ("images/a1.png", 1), ("images/a2.png", 2)]
    val200 = [("images/b0.png", 1)]
    test = [("images/t0.png", 3), ("images/t1.png", 0)]  # label 3 only occurs in the test list
    lists = {"train800": train800, "val200": val200, "train800val200": train800 + val200, "test": test}
    root = make_vtab(tmp_path / "caltech101", lists)
    ds = build_classification_dataset(root, split="train800")
    assert [(p.relative_to(root).as_posix(), y) for p, y in ds.samples] == train800
    assert ds.classes == ["0", "1", "2", "3"]  # the class count covers every list of the task
    assert len(build_classification_dataset(root, split="train")) == 4  # alias of train800val200
    assert len(build_classification_dataset(root, split="val")) == 1  # alias of val200
    assert build_classification_dataset(root, split="test").targets == [3, 0]
    image, label = ds[2]
    assert label == 2
    torch.testing.assert_close(image[:, 0, 0], torch.tensor(colour(2), dtype=torch.float32) / 255)
    # A list file may be passed directly.
    assert len(build_classification_dataset(root / "val200.txt")) == 1
    with pytest.raises(DataError, match="VTAB-1k folder: pass split="):
        build_classification_dataset(root)
    with pytest.raises(DataError, match=r"no list file for split 'val300'"):
        build_classification_dataset(root, split="val300", layout="vtab")


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ("images/a.png", r"line 2: expected 'relative/path label'"),
        ("images/a.png cat", r"line 2: label 'cat' is not an integer"),
        ("images/a.png -1", r"line 2: label -1 is negative"),
    ],
)
def test_vtab_malformed_line_names_file_and_line(tmp_path: Path, line: str, pattern: str) -> None:
    write_png(tmp_path / "images" / "a.png")
    (tmp_path / "test.txt").write_text(f"images/a.png 0\n{line}\n")
    with pytest.raises(DataError, match=pattern) as info:
        build_classification_dataset(tmp_path, split="test")
    assert str(tmp_path / "test.txt") in str(info.value)


def test_vtab_missing_image_label_range_and_empty_list(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png")
    (tmp_path / "test.txt").write_text("images/a.png 0\n\nimages/gone.png 1\n")
    with pytest.raises(DataError, match=r"1 image file\(s\) listed in .*test.txt do not exist: line 3: .*gone.png"):
        build_classification_dataset(tmp_path, split="test")
    (tmp_path / "test.txt").write_text("images/a.png 5\n")
    with pytest.raises(DataError, match=r"line 1: label 5 is outside the 3 classes"):
        build_classification_dataset(tmp_path, split="test", num_classes=3)
    (tmp_path / "test.txt").write_text("\n")
    with pytest.raises(DataError, match=r"test.txt is empty"):
        build_classification_dataset(tmp_path, split="test")


# ----------------------------------------------------------------------------------------- CSV


def test_csv_class_names_map_to_sorted_indices(tmp_path: Path) -> None:
    write_png(tmp_path / "imgs" / "x.png", 0)
    write_png(tmp_path / "imgs" / "y.png", 1)
    absolute = write_png(tmp_path / "elsewhere" / "z.png", 2)
    csv_file = tmp_path / "meta" / "train.csv"
    csv_file.parent.mkdir()
    csv_file.write_text(f"path,label,note\n../imgs/x.png,tulip,a\n../imgs/y.png,daisy,b\n{absolute},rose,c\n")
    ds = build_classification_dataset(csv_file)
    assert ds.classes == ["daisy", "rose", "tulip"]
    assert ds.targets == [2, 0, 1]
    assert ds.samples[2][0] == absolute
    # A folder + split finds <split>.csv.
    assert build_classification_dataset(tmp_path / "meta", split="train").targets == [2, 0, 1]
    # Given classes fix the mapping; unknown names are rejected with the line.
    assert build_classification_dataset(csv_file, classes=["tulip", "rose", "daisy"]).targets == [0, 2, 1]
    with pytest.raises(DataError, match=r"line 3: label 'daisy' is neither one of the classes"):
        build_classification_dataset(csv_file, classes=["tulip", "rose"])
    with pytest.raises(DataError, match=r"3 class names .* --num-classes is 4"):
        build_classification_dataset(csv_file, num_classes=4)


def test_csv_integer_labels(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / f"{i}.png", i)
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("path,label\n0.png,2\n1.png,0\n2.png,2\n")
    ds = build_classification_dataset(csv_file)
    assert ds.classes == ["0", "1", "2"] and ds.targets == [2, 0, 2]
    assert build_classification_dataset(csv_file, num_classes=5).classes == ["0", "1", "2", "3", "4"]
    with pytest.raises(DataError, match=r"line 2: label 2 is outside the class indices 0..1"):
        build_classification_dataset(csv_file, num_classes=2)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("file,class\na.png,0\n", r"line 1: expected a header with columns 'path' and 'label'"),
        ("path,label\na.png,0\na.png\n", r"line 3: expected 2 fields"),
        ("path,label\na.png,0\na.png,\n", r"line 3: empty path or label"),
        ("path,label\na.png,0\na.png,cat\n", r"mixes integer labels \(line 2\) and class-name labels \(line 3\)"),
        ("path,label\na.png,0\nb.png,1\n", r"listed in .*d.csv do not exist: line 3: .*b.png"),
        ("path,label\n", r"no rows after its header"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path: Path, text: str, pattern: str) -> None:
    write_png(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(DataError, match=pattern) as info:
        build_classification_dataset(tmp_path / "d.csv")
    assert "d.csv" in str(info.value)


@pytest.mark.parametrize("name", ["d.csv", "test.txt"])
def test_a_list_or_csv_that_is_not_utf8_is_named(tmp_path: Path, name: str) -> None:
    write_png(tmp_path / "a.png")
    (tmp_path / name).write_bytes("path,label\na.png,caf\u00e9\n".encode("latin-1"))  # a Latin-1 'é' (0xe9)
    with pytest.raises(DataError, match=rf"{name} is not UTF-8 text \(byte 0xe9 cannot be decoded\)"):
        build_classification_dataset(tmp_path / name if name.endswith(".csv") else tmp_path, split="test")


# ----------------------------------------------------------------------------------------- corrupt files


def test_corrupt_image_fails_on_read_and_skip_corrupt_drops_it(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"a": 2, "b": 2})
    bad = root / "b" / "broken.png"
    bad.write_bytes(b"this is not a png")
    truncated = root / "a" / "truncated.png"
    truncated.write_bytes((root / "a" / "0.png").read_bytes()[:40])

    ds = build_classification_dataset(root)  # construction does not decode images
    assert len(ds) == 6
    index = [p for p, _ in ds.samples].index(bad)
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png.*skip_corrupt=True"):
        ds[index]
    assert sorted(verify_images(ds)) == sorted([bad, truncated])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clean = build_classification_dataset(root, skip_corrupt=True)
    messages = [str(w.message) for w in caught if "could not be decoded" in str(w.message)]
    assert len(messages) == 1 and "skipped 2 of 6 images" in messages[0]
    assert len(clean) == 4 and bad not in [p for p, _ in clean.samples]
    assert clean.classes == ["a", "b"]


# ----------------------------------------------------------------------------------------- num_classes, splits


def test_check_num_classes(tmp_path: Path) -> None:
    ds = fake_dataset([2, 2, 2])
    check_num_classes(ds, 3)
    with pytest.raises(DataError, match=r"--num-classes 5 but .* has 3 classes \['c0', 'c1', 'c2'\].*--num-classes 3"):
        check_num_classes(ds, 5)
    root = make_tree(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"--num-classes 10 but the data at .* has 2 classes"):
        build_classification_dataset(root, num_classes=10)
    with pytest.raises(DataError, match=r"label 3 of .* is outside the 2 classes"):
        ClassificationDataset([(Path("x.png"), 3)], ["a", "b"])


def test_split_train_val_per_class_is_stratified_disjoint_and_seeded() -> None:
    ds = fake_dataset([10, 7, 5])
    train, val = split_train_val(ds, val_per_class=2, seed=3)
    assert isinstance(train, ClassificationSubset) and train.classes == ds.classes
    assert Counter(val.targets) == {0: 2, 1: 2, 2: 2}
    assert Counter(train.targets) == {0: 8, 1: 5, 2: 3}
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted([*train.indices, *val.indices]) == list(range(len(ds)))
    assert val.samples == [ds.samples[i] for i in val.indices]
    again = split_train_val(ds, val_per_class=2, seed=3)[1]
    other = split_train_val(ds, val_per_class=2, seed=4)[1]
    assert list(again.indices) == list(val.indices)
    assert list(other.indices) != list(val.indices)


def test_split_train_val_fraction_and_errors() -> None:
    ds = fake_dataset([100, 50, 1])
    train, val = split_train_val(ds, val_fraction=0.2, seed=0)
    assert Counter(val.targets) == {0: 20, 1: 10}  # the single-image class stays in train
    assert Counter(train.targets) == {0: 80, 1: 40, 2: 1}
    # A split of a split keeps the labels.
    _, inner_val = split_train_val(train, val_fraction=0.5, seed=0)
    assert Counter(inner_val.targets) == {0: 40, 1: 20}
    assert set(inner_val.indices) <= set(range(len(train)))
    assert inner_val.samples[0] in train.samples
    with pytest.raises(DataError, match=r"class 'c2' has 1 images; val_per_class=1 needs at least 2"):
        split_train_val(ds, val_per_class=1)
    with pytest.raises(ConfigError, match="exactly one"):
        split_train_val(ds, val_fraction=0.1, val_per_class=1)
    with pytest.raises(ConfigError, match=r"val_fraction must be in \(0, 1\)"):
        split_train_val(ds, val_fraction=1.5)


# ----------------------------------------------------------------------------------------- transforms

CONFIG = {"input_size": (3, 16, 16), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.25, 0.2), "interpolation": "bilinear"}


def test_vtab_transform_resizes_without_crop_and_normalises() -> None:
    tf = build_transforms(CONFIG, img_size=(12, 20), augmentation="vtab", train=True)
    assert not any(isinstance(t, (T.CenterCrop, T.RandomHorizontalFlip, T.RandomResizedCrop)) for t in tf.transforms)
    img = Image.new("RGB", (40, 10), (51, 102, 153))  # wide image: a crop would be needed to keep the aspect
    out = tf(img)
    assert out.shape == (3, 12, 20)
    expected = (torch.tensor([51, 102, 153]) / 255 - torch.tensor(CONFIG["mean"])) / torch.tensor(CONFIG["std"])
    torch.testing.assert_close(out[:, 5, 5], expected)
    # No flip: the left half stays left, on every call.
    half = Image.new("RGB", (16, 16), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 8, 16))
    for _ in range(10):
        out = tf(half)
        assert out[0, 8, 1] > out[0, 8, 18]


def test_none_and_standard_transforms() -> None:
    img = Image.new("RGB", (30, 24), (200, 10, 10))
    none = build_transforms(CONFIG, augmentation="none", train=True)
    assert any(isinstance(t, T.CenterCrop) for t in none.transforms)
    assert none(img).shape == (3, 16, 16)
    standard = build_transforms(CONFIG, augmentation="standard", train=True)
    kinds = {type(t).__name__ for t in standard.transforms}
    assert {"RandomResizedCropAndInterpolation", "RandomHorizontalFlip"} <= kinds
    assert standard(img).shape == (3, 16, 16)
    eval_tf = build_transforms(CONFIG, augmentation="standard", train=False)
    torch.testing.assert_close(eval_tf(img), none(img))
    no_flip = build_transforms(CONFIG, augmentation="standard", train=True, hflip=0.0)
    assert "RandomHorizontalFlip" not in {type(t).__name__ for t in no_flip.transforms}  # kwargs reach timm
    with pytest.raises(ConfigError, match="unknown augmentation 'flip'"):
        build_transforms(CONFIG, augmentation="flip")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_transforms_always_give_rgb(mode: str) -> None:
    img = Image.new("RGB", (10, 10), (90, 90, 90)).convert(mode)
    for augmentation in ("vtab", "none", "standard"):
        assert build_transforms(CONFIG, augmentation=augmentation, train=True)(img).shape == (3, 16, 16)
    assert ToRGB()(torch.zeros(1, 4, 4)).shape == (3, 4, 4)
    assert ToRGB()(torch.zeros(4, 4, 4)).shape == (3, 4, 4)


def test_transforms_from_model_and_model_name() -> None:
    model = timm.create_model("test_vit", pretrained=False, img_size=64, num_classes=0)
    config = resolve_backbone_data_config(model)
    assert config["input_size"] == (3, 64, 64)  # the built size, not the pretrained config's 160
    assert config["mean"] == model.pretrained_cfg["mean"]
    out = build_transforms(model, augmentation="vtab")(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert out.shape == (3, 64, 64)
    torch.testing.assert_close(out, torch.ones_like(out))  # (1 - 0.5) / 0.5 with test_vit's mean = std = 0.5

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

    assert resolve_backbone_data_config(Wrapper(), img_size=32)["input_size"] == (3, 32, 32)
    with pytest.warns(UserWarning, match="no timm pretrained_cfg"):
        resolve_backbone_data_config(nn.Linear(2, 2))
    named = resolve_backbone_data_config("vit_small_patch14_dinov2", img_size=224)
    assert named["input_size"] == (3, 224, 224) and named["mean"] == (0.485, 0.456, 0.406)
    with pytest.raises(ConfigError, match="unknown timm model"):
        resolve_backbone_data_config("no_such_model_xyz")


# ----------------------------------------------------------------------------------------- real data


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (it lives in ../shared/assets/data beside the repository)")
    return path


@pytest.mark.e2e
def test_cifar10_1k_from_shared_assets() -> None:
    root = shared_dataset("cifar10-1k")
    tf = build_transforms(CONFIG, img_size=32, augmentation="vtab")
    train = build_classification_dataset(root, split="train", transform=tf, num_classes=10)
    test = build_classification_dataset(root, split="test", classes=train.classes, num_classes=10)
    assert train.classes[:3] == ["airplane", "automobile", "bird"] and len(train.classes) == 10
    assert len(train) == 1000 and set(Counter(train.targets).values()) == {100}
    assert len(test) == 2000 and set(Counter(test.targets).values()) == {200}
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == 0
    fit, val = split_train_val(train, val_per_class=20, seed=0)
    assert (len(fit), len(val)) == (800, 200) and set(Counter(val.targets).values()) == {20}


@pytest.mark.e2e
def test_sign_digits_from_shared_assets() -> None:
    root = shared_dataset("sign-digits")
    train = build_classification_dataset(root, split="train")
    assert train.classes == [str(d) for d in range(10)] and len(train) == 1000
    image, label = train[len(train) - 1]
    assert image.shape == (3, 100, 100) and label == 9
