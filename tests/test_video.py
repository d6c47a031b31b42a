"""Video models: clips through a frozen image backbone; LoSA's factorised space-time mixing; the guarantees of issue 13.

Each guarantee is a test: gradient isolation for clips; the factorised mixer with T = 1 is the image mixer (and the
video LoSA with one frame is the image LoSA); the temporal mixer sees across frames while the spatial mixer never
mixes frames (nor clips); a clip with another frame count fails naming both counts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sidetune
from sidetune.errors import ConfigError
from sidetune.side import LowRankMixer
from sidetune.side.losa import ClipMixer, LoSAConfig

T, IMG, B = 3, 32, 2


def video(method: str, num_frames: int = T, seed: int = 0, **options) -> sidetune.SidetuneModel:
    torch.manual_seed(seed)
    return sidetune.create("test_vit", method, task="video", num_frames=num_frames, num_classes=3, img_size=IMG,
                           **options)  # fmt: skip


def clips(b: int = B, t: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """Random values in every trainable tensor, so zero-initialised paths (LoSA's up-projections) are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def frame_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """(B, T, N, C): each frame's final tokens (LoSA: its side-refined tokens)."""
    tokens = model.features(x).tokens
    return tokens.reshape(x.shape[0], x.shape[1], -1, tokens.shape[-1])


# -- gradient isolation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["losa", "linear", "e3va"])
def test_no_gradient_enters_the_backbone_for_clips(method):
    model = video(method)
    perturb(model)
    grad_modes = []
    model.backbone.blocks[0].module.register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
    F.cross_entropy(model(clips()), torch.tensor([0, 2])).backward()
    assert grad_modes == [False]  # one backbone forward of B*T frames, without autograd
    backbone = list(model.backbone.parameters())
    assert backbone and all(not p.requires_grad and p.grad is None for p in backbone)
    trainable = model.named_trainable_parameters()
    assert trainable and all(p.grad is not None for _, p in trainable)


def test_backbone_runs_once_on_all_frames_and_chunks_change_nothing():
    model = video("losa")
    perturb(model)
    batches = []
    model.backbone.blocks[0].module.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    x = clips()
    whole = model(x)
    assert batches == [B * T]
    model.frame_chunk = 4
    chunked = model(x)
    assert batches[1:] == [4, 2]  # 6 frames in chunks of 4: the side network still sees whole clips
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "lora", "full"])
def test_frame_chunks_change_no_result_for_other_methods(method):
    model = video(method).eval()
    x = clips()
    whole = model(x)
    model.frame_chunk = 4
    torch.testing.assert_close(model(x), whole, rtol=0, atol=1e-6)


# -- T = 1 is the image model ------------------------------------------------------------------------------------
def test_factorised_mixer_with_one_frame_equals_the_image_mixer():
    config = LoSAConfig(channel_rank=4, token_rank=3)
    torch.manual_seed(0)
    image = LowRankMixer(8, (5,), config)
    perturb(image)
    clip = ClipMixer(8, 1, 5, config)
    own = clip.state_dict()
    # the image mixer's parameters are the clip mixer's spatial and channel parameters; the temporal MLP (over a
    # length-1 axis) and its norm keep their initialisation: up-projection zero, the norm the identity affine
    shared = {k: v for k, v in image.state_dict().items() if k in own and own[k].shape == v.shape}
    assert set(image.state_dict()) <= set(shared) | {k for k in image.state_dict() if k not in own}
    clip.load_state_dict({**own, **shared})
    x = torch.randn(4, 5, 8)
    torch.testing.assert_close(clip(x), image(x), rtol=0, atol=0)


def test_video_losa_with_one_frame_is_the_image_losa_parameter_for_parameter():
    torch.manual_seed(0)
    image = sidetune.create("test_vit", "losa", num_classes=3, img_size=IMG)
    one = video("losa", num_frames=1)
    assert {k: v.shape for k, v in image.adapter_state_dict().items()} == {
        k: v.shape for k, v in one.adapter_state_dict().items()
    }
    perturb(image)
    one.load_state_dict(image.state_dict())
    x = clips(t=1)
    torch.testing.assert_close(one(x), image(x[:, 0]), rtol=0, atol=0)


def test_video_losa_adds_exactly_one_temporal_mlp_and_norm_per_block():
    image = sidetune.create("test_vit", "losa", num_classes=3, img_size=IMG)
    model = video("losa", num_frames=T)
    blocks, c, r_t = 6, 64, LoSAConfig().token_rank  # test_vit: depth 6, width 64
    temporal = (T * r_t + r_t) + (r_t * T + T) + 2 * c  # T -> r_t -> T MLP and its LayerNorm
    assert model.num_parameters() - image.num_parameters() == blocks * temporal


# -- what mixes across frames --------------------------------------------------------------------------------------
def test_temporal_mixer_sees_across_frames_and_spatial_mixer_never_mixes_frames_or_clips():
    model = video("losa", num_frames=4).eval()
    perturb(model)
    x = clips(t=4)
    y = x.clone()
    y[0, 2] = torch.randn(3, IMG, IMG, generator=torch.Generator().manual_seed(5))  # change frame 2 of clip 0
    with torch.no_grad():
        before, after = frame_tokens(model, x), frame_tokens(model, y)
    changed = (before - after).abs().amax(dim=(2, 3))  # (B, T)
    assert (changed[0, [0, 1, 3]] > 1e-3).all(), "the temporal mixer carries frame 2 into the other frames"
    assert (changed[1] == 0).all(), "no mixing across the clips of a batch"
    # without the temporal MLPs only the spatial (and channel) mixing is left: frames stay apart exactly
    with torch.no_grad():
        for mixer in model.method.mixers.values():
            temporal = mixer.token_mixing.mlps[1]  # mlps[0] mixes the N tokens of a frame, mlps[1] the T frames
            assert temporal.down.in_features == 4
            temporal.up.weight.zero_()
            temporal.up.bias.zero_()
        before, after = frame_tokens(model, x), frame_tokens(model, y)
    changed = (before - after).abs().amax(dim=(2, 3))
    assert changed[0, 2] > 1e-3 and (changed[0, [0, 1, 3]] == 0).all() and (changed[1] == 0).all()


@pytest.mark.parametrize("method", ["linear", "e3va", "lora"])
def test_frame_averaging_methods_are_blind_to_frame_order_and_losa_is_not(method):
    """What the temporal benchmark relies on: a clip and its reversal give the same logits to every method that
    averages frame features, whatever it learnt; LoSA's temporal mixing tells them apart."""
    x = clips(t=4)
    reverse = x.flip(1)
    model = video(method, num_frames=4).eval()
    perturb(model)
    with torch.no_grad():
        torch.testing.assert_close(model(reverse), model(x), rtol=0, atol=1e-5)
    losa = video("losa", num_frames=4).eval()
    perturb(losa)
    with torch.no_grad():
        assert (losa(reverse) - losa(x)).abs().max() > 1e-3


# -- bad input ---------------------------------------------------------------------------------------------------
def test_a_clip_with_another_frame_count_fails_naming_both():
    model = video("losa", num_frames=4)
    with pytest.raises(ConfigError, match=r"built for clips of 4 frames .* got 3 frames per clip.*num_frames=3"):
        model(clips(t=3))
    with pytest.raises(ConfigError, match=r"clips of shape \(B, T, 3, H, W\), got \(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, IMG, IMG))
    mixer = model.method.mixers["0"]
    with pytest.raises(ConfigError, match="clips of 4 frames, but its input holds 6 frames"):
        mixer(torch.randn(6, mixer.token_mixing.token_shape[1], 64))


def test_num_frames_is_required_for_video_and_refused_for_images():
    with pytest.raises(ConfigError, match="task='video' needs num_frames"):
        sidetune.create("test_vit", "losa", task="video", num_classes=3, img_size=IMG)
    with pytest.raises(ConfigError, match="num_frames is for task='video'"):
        sidetune.create("test_vit", "losa", num_frames=4, num_classes=3, img_size=IMG)
    with pytest.raises(ConfigError, match="frame_chunk must be an integer >= 1"):
        video("linear", frame_chunk=0)


def test_video_adapter_round_trip_keeps_num_frames(tmp_path):
    model = video("losa", num_frames=4).eval()
    perturb(model)
    model.save_adapter(tmp_path / "adapter")
    torch.manual_seed(0)  # the random backbone is rebuilt from the seed it was created with
    loaded = sidetune.load(tmp_path / "adapter").eval()
    assert loaded.config.num_frames == 4 and loaded.task == "video"
    x = clips(t=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["losa", "e3va"])
def test_video_taps_are_ordinary_taps_of_the_frames_so_a_cache_can_serve_them(method):
    from sidetune.model import pool_over_time

    model = video(method).eval()
    perturb(model)
    x = clips()
    with torch.no_grad():
        taps = model.method.backbone(x.flatten(0, 1), model.method.tap_request)  # what a tap cache would store
        assert all(t.shape[0] == B * T for t in taps.out.values())
        replayed = model.head(pool_over_time(model.method.forward_taps(taps), T))
        torch.testing.assert_close(replayed, model(x), rtol=0, atol=0)


def test_resume_refuses_a_checkpoint_of_another_frame_count(tmp_path):
    from dataclasses import asdict

    from sidetune.train.checkpoint import CheckpointError, check_compatible

    saved = asdict(video("linear", num_frames=4).config)
    with pytest.raises(CheckpointError, match=r"its num_frames is 4 but this run's is 3"):
        check_compatible(saved, video("linear", num_frames=3), tmp_path)
