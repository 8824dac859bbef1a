"""Tiny classifiers for the ``tsgb explain`` tests (``--model explain_factory:tiny``)."""
import torch
import torch.nn as nn


def tiny() -> nn.Module:
    """A seeded 10-class CNN (conv, BN, ReLU, strided conv, avg pool, linear), 32 x 32 input."""
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    m.input_size = 32
    m.mean, m.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    m.class_names = [f"thing {i}" for i in range(10)]
    return m


def not_a_model():
    return "nope"


def overflow() -> nn.Module:
    """``tiny`` with finite weights so large that its activations overflow to inf: NaN maps."""
    m = tiny()
    with torch.no_grad():
        m[0].weight.mul_(1e38)
        m[3].weight.mul_(1e38)
    return m
