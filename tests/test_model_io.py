"""save_adapter / load: adapter-only files, identical logits after a round trip, fingerprint refusal."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sidetune
from sidetune.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS

from conftest import images, tiny

CASES = [("vit", "linear"), ("vit_reg", "losa"), ("dinov2_reg", "e3va+"), ("swin", "e3va"), ("swin", "losa")]


def _train_a_little(model, key: str) -> None:
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for step in range(2):
        loss = model(images(key, 2, seed=step)).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize(("key", "method"), CASES)
def test_round_trip_gives_identical_logits(tmp_path, key: str, method: str) -> None:
    model = tiny(key, method, seed=7)
    _train_a_little(model, key)
    model.eval()
    x = images(key, 3, seed=9)
    with torch.no_grad():
        expected = model(x)
    model.save_adapter(tmp_path / "adapter")

    torch.manual_seed(7)  # the random backbone is rebuilt from the same seed (weights=None)
    loaded = sidetune.load(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert loaded.config == model.config


def test_adapter_file_holds_only_trained_tensors(tmp_path) -> None:
    model = tiny("swin", "e3va")
    model.save_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert set(tensors) == {n for n, _ in model.named_trainable_parameters()}
    assert not any(name.startswith("method.backbone.") for name in tensors)
    backbone = {id(p) for p in model.backbone.parameters()}
    assert not any(id(p) in backbone for p in model.trainable_parameters())
    assert sum(t.numel() for t in tensors.values()) == model.num_parameters() == 30997


def test_adapter_config_records_what_rebuilds_the_model(tmp_path) -> None:
    model = tiny("dinov2_reg", "losa", channel_rank=4)
    model.save_adapter(tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["sidetune_version"] == sidetune.__version__
    assert config["backbone"] == "vit_small_patch14_dinov2"
    assert config["img_size"] == [56, 56]
    assert config["backbone_fingerprint"] == model.config.backbone_fingerprint
    assert config["backbone_fingerprint"].startswith("sha256:") and len(config["backbone_fingerprint"]) == 71
    assert config["method"] == "losa" and config["method_config"]["channel_rank"] == 4
    assert config["backbone_kwargs"]["reg_tokens"] == 4


def test_load_refuses_a_backbone_with_another_fingerprint(tmp_path) -> None:
    model = tiny("vit", "losa", seed=1)
    model.save_adapter(tmp_path)
    torch.manual_seed(2)  # another random backbone
    with pytest.raises(sidetune.FingerprintMismatchError, match=r"trained on test_vit weights with fingerprint sha256"):
        sidetune.load(tmp_path)


def test_load_onto_explicit_weights_file(tmp_path) -> None:
    source = tiny("vit", "linear", seed=5).backbone.model
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    model = tiny("vit", "e3va", weights=weights)
    model.save_adapter(tmp_path / "a")
    loaded = sidetune.load(tmp_path / "a", weights=weights)
    x = images("vit", 2)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() + 1 for k, v in source.state_dict().items()}, str(other))
    with pytest.raises(sidetune.FingerprintMismatchError):
        sidetune.load(tmp_path / "a", weights=other)


def test_load_from_a_folder_that_is_not_an_adapter(tmp_path) -> None:
    with pytest.raises(sidetune.WeightsError, match=r"adapter_config.json' not found.*not an adapter directory"):
        sidetune.load(tmp_path)


def test_save_leaves_no_temporary_files_and_overwrites_cleanly(tmp_path) -> None:
    model = tiny("vit", "losa")
    model.save_adapter(tmp_path)
    model.save_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch) -> None:
    model = tiny("vit", "losa")
    model.save_adapter(tmp_path)
    before = (tmp_path / ADAPTER_WEIGHTS).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sidetune.model.save_file", crash)
    with torch.no_grad():
        model.head.fc.bias += 1
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter(tmp_path)
    assert (tmp_path / ADAPTER_WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_save_to_a_file_path_is_refused(tmp_path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="it is a file, not a directory"):
        tiny("vit", "linear").save_adapter(target)


@pytest.mark.parametrize(
    ("key", "method"), [("swin", "losa"), ("swin", "e3va"), ("vit", "adapter"), ("vit", "adaptformer"), ("vit", "vpt")]
)
def test_deepcopy_and_pickle_give_independent_working_models(tmp_path, key: str, method: str) -> None:
    """Hooks must follow the copy (an EMA or best-model snapshot is a deepcopy)."""
    import copy

    model = tiny(key, method)
    _train_a_little(model, key)
    model.zero_grad(set_to_none=True)
    x = images(key, 2)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x))
    clone(x).sum().backward()
    assert all(p.grad is not None for p in clone.trainable_parameters())
    assert all(p.grad is None for p in model.trainable_parameters())  # the original is untouched
    torch.save(model, tmp_path / "model.pt")
    restored = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(restored(x), model(x))


def test_concurrent_forwards_do_not_mix_taps() -> None:
    import threading

    model = tiny("swin", "losa").eval()
    x = images("swin", 2)
    with torch.no_grad():
        expected = model(x)
    failures: list[str] = []

    def work() -> None:
        for _ in range(5):
            try:
                with torch.no_grad():
                    if not torch.allclose(model(x), expected):
                        failures.append("mismatch")
            except Exception as err:  # collected and asserted below
                failures.append(repr(err))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_saved_adapter_files_are_readable_by_others(tmp_path) -> None:
    import os
    import stat

    tiny("vit", "linear").save_adapter(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
