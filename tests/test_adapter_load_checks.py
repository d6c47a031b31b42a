"""sidetune.load refuses damaged adapters with a message naming the field or tensor at fault (issue 15.4, 15.6, 15.7):
a tampered adapter_config.json (wrong types, missing or unknown fields), an edited img_size (not blamed on the
backbone weights), and an adapter holding NaN or inf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sidetune
from sidetune.errors import FingerprintMismatchError, WeightsError
from sidetune.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, config_from_json

from conftest import tiny


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("adapter")
    tiny("vit", "losa", seed=3).save_adapter(directory)
    return directory


def _copy(adapter: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of the adapter folder, with ``edit(config_dict)`` applied to its adapter_config.json."""
    out = tmp_path / "copy"
    out.mkdir()
    (out / ADAPTER_WEIGHTS).write_bytes((adapter / ADAPTER_WEIGHTS).read_bytes())
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if edit is not None:
        edit(config)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config))
    return out


def _load(directory: Path):
    torch.manual_seed(3)  # the random backbone is rebuilt from its seed
    return sidetune.load(directory)


def test_untouched_adapter_loads(adapter: Path, tmp_path: Path) -> None:
    assert _load(_copy(adapter, tmp_path)).config.method == "losa"


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda c: c.update(num_classes="5"), r"field 'num_classes' must be a positive integer, got \"5\" \(str\)"),
        (lambda c: c.update(img_size="64"), r"field 'img_size' must be \[height, width\]"),
        (lambda c: c.update(img_size=[64, 0]), r"field 'img_size' must be \[height, width\], two positive integers"),
        (lambda c: c.update(method_config=[1, 2]), r"field 'method_config' must be a JSON object"),
        (lambda c: c.update(head_dropout=1.5), r"field 'head_dropout' must be a number in \[0, 1\)"),
        (lambda c: c.update(backbone_fingerprint="abc"), r"field 'backbone_fingerprint' must be 'sha256:'"),
        (lambda c: c.pop("task"), r"missing field\(s\) \['task'\]"),
        (lambda c: c.update(colour="blue"), r"unknown field\(s\) \['colour'\]"),
    ],
)
def test_tampered_config_names_the_field(adapter: Path, tmp_path: Path, edit, pattern: str) -> None:
    with pytest.raises(WeightsError, match=pattern) as info:
        _load(_copy(adapter, tmp_path, edit))
    assert ADAPTER_CONFIG in str(info.value) and "edited or damaged" in str(info.value)


def test_config_that_is_not_an_object_or_not_json(adapter: Path, tmp_path: Path) -> None:
    directory = _copy(adapter, tmp_path)
    (directory / ADAPTER_CONFIG).write_text("[1, 2]")
    with pytest.raises(WeightsError, match="holds list, not a JSON object"):
        _load(directory)
    (directory / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(WeightsError, match="is not valid JSON"):
        _load(directory)


def test_unknown_method_option_in_config_names_the_file(adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=rf"{ADAPTER_CONFIG}' does not describe a model sidetune can build"):
        _load(_copy(adapter, tmp_path, lambda c: c["method_config"].update(no_such_option=1)))


def test_edited_img_size_is_named_not_blamed_on_the_weights(adapter: Path, tmp_path: Path) -> None:
    directory = _copy(adapter, tmp_path, lambda c: c.update(img_size=[48, 48]))
    with pytest.raises(WeightsError, match=r"was edited after the adapter was saved: img_size: \[48, 48\] \(saved "
                       r"with the weights: \[64, 64\]\)") as info:  # fmt: skip
        _load(directory)
    assert not isinstance(info.value, FingerprintMismatchError)


def test_another_backbone_is_still_a_fingerprint_mismatch(adapter: Path, tmp_path: Path) -> None:
    directory = _copy(adapter, tmp_path)
    torch.manual_seed(4)
    with pytest.raises(FingerprintMismatchError, match="trained on test_vit weights"):
        sidetune.load(directory)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_adapter_with_non_finite_values_is_refused(adapter: Path, tmp_path: Path, value: float) -> None:
    directory = _copy(adapter, tmp_path)
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[:3] = value
    save_file(state, str(directory / ADAPTER_WEIGHTS))
    with pytest.raises(WeightsError, match=rf"NaN or infinite values in 1 tensor\(s\): {name} \(3 of \d+ values\)"):
        _load(directory)


def test_config_from_json_round_trips_a_saved_config(adapter: Path) -> None:
    raw = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config_from_json(raw, adapter / ADAPTER_CONFIG).img_size == (64, 64)
