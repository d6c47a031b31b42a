"""``--compile``: torch.compile of the side network trains as the uncompiled model does (same losses, same adapter
files), and is refused for in-place methods."""

from __future__ import annotations

import json

import pytest
import torch

from sidetune.cache.build import build
from sidetune.cli import main
from sidetune.errors import ConfigError
from sidetune.train import fit
from train_data import config, make_image_folder


@pytest.fixture
def quick_compile(monkeypatch):
    """Dynamo and AOTAutograd without inductor's C++ code generation: the plumbing, in a few seconds."""
    monkeypatch.setattr("sidetune.train.setup.COMPILE_OPTIONS", {"backend": "aot_eager"})


def _losses(run) -> list[float]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("type") == "step"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), train_per_class=4, test_per_class=1)


def _same_run(data, tmp_path, method: str) -> None:
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"c{int(compiled)}"
        runs[compiled] = (out, fit(config(data, out, method=method, epochs=1, compile=compiled)))
    plain, compiled = _losses(runs[False][0]), _losses(runs[True][0])
    assert len(plain) > 1 and torch.allclose(torch.tensor(compiled), torch.tensor(plain), atol=1e-4)
    assert runs[True][1].summary["metrics"]["test"]["top1"] == runs[False][1].summary["metrics"]["test"]["top1"]
    # the adapter holds the same tensors: compiling the side network changed no name or shape
    from safetensors.torch import load_file

    a, b = (load_file(runs[c][0] / "best" / "adapter_model.safetensors") for c in (False, True))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.slow
def test_an_inductor_compiled_side_network_trains_as_the_uncompiled_one(data, tmp_path):
    _same_run(data, tmp_path, "e3va")  # the real backend (C++ code generation), on the quicker method to compile


def test_a_compiled_losa_trains_as_the_uncompiled_one(data, tmp_path, quick_compile):
    _same_run(data, tmp_path, "losa")


def test_compile_is_refused_for_in_place_methods_and_bad_values(data, tmp_path):
    with pytest.raises(ConfigError, match=r"--compile compiles a side method's side network; 'lora' changes"):
        fit(config(data, tmp_path / "l", method="lora", epochs=1, compile=True))
    assert not (tmp_path / "l" / "log.jsonl").exists()
    with pytest.raises(ConfigError, match="compile must be true or false"):
        config(data, tmp_path / "v", compile="yes")


def test_train_compile_from_a_tap_cache_on_the_command_line(data, tmp_path, quick_compile):
    """`sidetune train --cache DIR --compile`: the compiled side network on cached taps, as the plain cached run."""
    torch._dynamo.reset()
    cache = tmp_path / "cache"
    build(config(data, tmp_path / "x", method="losa"), ["losa"], cache)
    c = config(data, tmp_path / "plain", method="losa", epochs=1, cache=str(cache))
    fit(c)
    out = tmp_path / "cli"
    argv = ["train", "test_vit", "losa", "--data", str(data), "--img-size", str(c.img_size), "--epochs", "1"]
    argv += ["--batch-size", str(c.batch_size), "--lr", str(c.lr), "--warmup-epochs", str(c.warmup_epochs)]
    assert main([*argv, "--cache", str(cache), "--output", str(out), "--compile", "--no-progress"]) == 0
    assert "compile: true" in (out / "train_config.yaml").read_text()
    assert torch.allclose(torch.tensor(_losses(out)), torch.tensor(_losses(tmp_path / "plain")), atol=1e-4)
