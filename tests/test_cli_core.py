"""The core CLI commands (methods, backbones) and the demo's training path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sidetune
from sidetune.cli import main
from sidetune.data import DataError
from sidetune.demo import IMG_SIZE, DemoResult, format_table, load_digits, run_demo, train_one


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


def test_an_unread_positional_argument_is_named_with_how_to_give_it(capsys) -> None:
    def error(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        return capsys.readouterr().err.strip()

    err = error(["train", "test_vit", "--data", "somewhere", "losa"])  # argparse reads 'test_vit' alone
    assert err.startswith("usage: sidetune train")  # the command's usage, not the top level's
    assert err.endswith(
        "sidetune train: error: unrecognized arguments: losa; 'losa' was not read as METHOD: give the positional "
        "arguments together, before the options: sidetune train BACKBONE METHOD [options]"
    )
    # no hint where every positional argument was read, or where the word is an unknown option's value
    assert error(["train", "test_vit", "losa", "--data", "d", "extra"]).endswith("unrecognized arguments: extra")
    assert error(["train", "test_vit", "--bogus", "3"]).endswith("unrecognized arguments: --bogus 3")
    assert error(["methods", "--bogus"]).endswith("sidetune methods: error: unrecognized arguments: --bogus")
    nested = error(["cache", "info", "a", "b"])  # a subcommand's own usage
    assert nested.startswith("usage: sidetune cache info") and nested.endswith("unrecognized arguments: b")


class _BrokenImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise DataError(f"image {i}.png is truncated: run `sidetune data check`")


def test_an_error_from_a_data_loader_worker_reads_as_with_workers_0() -> None:
    with pytest.raises(DataError) as info:
        list(torch.utils.data.DataLoader(_BrokenImages(), num_workers=1))
    assert str(info.value) == "image 0.png is truncated: run `sidetune data check`"  # not torch's wrapper text
    assert "Caught DataError in DataLoader worker process 0" in info.value.worker_traceback


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


@pytest.mark.slow
def test_demo_ends_with_a_bench_of_its_vit(monkeypatch) -> None:
    """The bench part of ``sidetune demo`` (training stubbed): a row per method with sane values, the table,
    how to read it and the command for one's own model."""
    import sidetune.demo as commands

    def fake_train(backbone, method, data, steps):
        return DemoResult(backbone, method, trainable=1, train_acc=0.5, test_acc=0.5, ms_per_step=1.0, steps=1)

    reports = []
    real_bench = commands.demo_bench

    def bench(**kwargs):
        reports.append(real_bench(**kwargs))
        return reports[-1]

    monkeypatch.setattr("sidetune.demo.train_one", fake_train)
    monkeypatch.setattr(commands, "demo_bench", bench)
    lines: list[str] = []
    tiny_bench = dict(batch_size=4, warmup=0, rounds=1)
    run_demo(steps=1, backbones=("vit",), methods=("linear",), log=lines.append, bench_options=tiny_bench)
    (report,) = reports
    known = {m["name"] for m in sidetune.list_methods()}
    expected = [m for m in ("full", "lora", "linear", "losa", "e3va") if m in known]
    assert [r.name for r in report.rows] == expected
    assert report.config.img_size == IMG_SIZE and report.config.backbone_kwargs["embed_dim"] == 64
    rows = {r.name: r for r in report.rows}
    assert all(r.status == "ok" and r.step_time_s > 0 and r.trainable_params > 0 for r in rows.values())
    assert rows["full"].saved_activation_bytes > rows["losa"].saved_activation_bytes > 0
    assert rows["e3va"].trainable_params < rows["full"].trainable_params
    assert rows["linear"].saved_vs_ref < 0.1 and rows["full"].time_vs_ref == 1.0
    assert all(rows[m].floor_kind == "side" and rows[m].time_vs_floor > 0 for m in ("linear", "losa", "e3va"))
    out = "\n".join(lines)
    assert "| losa " in out and "x full saved" in out and "How to read it" in out
    assert "sidetune bench --backbone vit_base_patch16_224 --methods full,lora,linear,losa,e3va" in out
