"""The core CLI commands (methods, backbones) and the demo's training path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sidetune
from sidetune.cli import main
from sidetune.demo import IMG_SIZE, format_table, load_digits, train_one


def test_methods_lists_every_registered_method_with_its_kind(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in sidetune.list_methods():
        line = next(ln for ln in out.splitlines() if ln.startswith(m["name"] + " "))
        assert m["kind"] in line and m["description"] in line
        assert ("yes" if m["backprop_through_backbone"] else "no") in line.split()


def test_list_methods_has_one_line_descriptions() -> None:
    methods = {m["name"]: m for m in sidetune.list_methods()}
    assert {"linear", "losa", "e3va", "e3va+", "e3va++"} <= set(methods)
    assert not methods["losa"]["backprop_through_backbone"] and methods["e3va"]["kind"] == "side"
    assert all(m["description"] and "\n" not in m["description"] for m in methods.values())


def test_backbones_lists_families_and_matching_models(capsys) -> None:
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("vit ") and "swin_*" in out and "stage outputs" in out
    assert main(["backbones", "swin_base*"]) == 0
    assert "swin_base_patch4_window7_224" in capsys.readouterr().out.splitlines()
    assert main(["backbones", "nothing_like_this*"]) == 1


def test_cli_user_errors_are_one_line_without_traceback() -> None:
    code = (
        "import sys; from sidetune.cli import main; from sidetune.errors import ConfigError\n"
        "import sidetune.cli as c\n"
        "def boom(args): raise ConfigError('unknown method lossa. Valid choices: losa')\n"
        "c._cmd_methods = boom\n"
        "sys.exit(main(['methods']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sidetune methods: error: unknown method lossa. Valid choices: losa"


def test_digits_are_the_embedded_real_dataset() -> None:
    x_train, _, x_test, y_test = load_digits()
    assert x_train.shape == (1297, 3, IMG_SIZE, IMG_SIZE) and x_test.shape == (500, 3, IMG_SIZE, IMG_SIZE)
    assert torch.bincount(y_test).tolist() == [50] * 10
    assert x_train.min() >= -1.0 and x_train.max() <= 1.0


@pytest.mark.slow
def test_demo_losa_learns_the_digits_well_above_chance() -> None:
    data = load_digits()
    result = train_one("vit", "losa", data, steps=60)
    assert result.trainable == 14766
    assert result.test_acc > 0.6  # chance is 0.1
    table = format_table([result])
    assert "losa" in table and "14,766" in table
