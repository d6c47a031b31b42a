"""benchmarks/side_profile.py on a tiny ViT: the side step now against the former code, and the parts per stage."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO


def test_side_profile_writes_the_side_steps_and_the_parts(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("side_profile", REPO / "benchmarks" / "side_profile.py")
    side_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(side_profile)
    argv = ["--backbones", "test_vit", "--img-size", "64", "--batch-size", "2", "--rounds", "1", "--warmup", "0"]
    argv += ["--precisions", "fp32", "--methods", "losa", "--out", str(tmp_path), "--name", "sp"]
    assert side_profile.main(argv) == 0
    data = json.loads((tmp_path / "sp.json").read_text())
    assert data["command"].startswith("python benchmarks/side_profile.py --backbones test_vit")
    (result,) = data["results"]
    side = {r["variant"]: r for r in result["side"]}
    assert list(side) == ["former", "recompute=false", "default"]
    # the default keeps one mixer input per block; the former code and recompute=false keep about four
    assert side["default"]["saved_bytes"] < side["recompute=false"]["saved_bytes"] == side["former"]["saved_bytes"]
    parts = {r["part"] for r in result["parts"]}
    assert parts == {"token mixing", "channel mixing", "mixer", "mixer, recomputed"}
    assert all(r["count"] == 6 and r["median_s"] > 0 for r in result["parts"])  # test_vit: 6 blocks, one stage
    text = (tmp_path / "sp.md").read_text()
    assert "## test_vit, fp32" in text and "| losa | default |" in text and "x inference" in text
