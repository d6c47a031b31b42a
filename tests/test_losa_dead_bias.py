"""docs/methods.md: in classification (norm=True) LoSA's token-mixing up-bias gets no gradient, since every reader
of the side state is a LayerNorm over channels; the channel-mixing up-bias does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import sidetune


def test_the_token_mixing_up_bias_has_no_gradient_in_classification() -> None:
    torch.manual_seed(0)
    model = sidetune.create("test_vit", "losa", num_classes=3, img_size=32)
    for name, p in model.named_parameters():
        if p.requires_grad and name.endswith("up.weight"):  # up-projections start at zero: make gradients flow
            torch.nn.init.normal_(p, std=0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(3, (4,))
    F.cross_entropy(model.train()(images), labels).backward()
    grads = {n: p.grad.abs().max().item() for n, p in model.named_parameters() if n.endswith("up.bias")}
    token = [g for n, g in grads.items() if "token_mixing" in n]
    channel = [g for n, g in grads.items() if "channel_mixing" in n]
    assert token and channel
    assert max(token) < 1e-6 < 1e-3 < min(channel)
