"""Image encoders: torchvision VGG / ResNet (ImageNet weights or random init) and a small VGG.

Every encoder takes uint8 or float images (B, 3, S, S) in 0..255, normalises them itself and
returns one feature vector per image (B, F), so cached pixels and new photos go through the
same path.
"""
from __future__ import annotations

import hashlib

import torch
import torchvision
from torch import nn

from captune.infra.errors import UserError
from captune.trainables.catalog import RESNET_ENCODERS, VGG_ENCODERS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights could not be fetched (offline machine)."""


class ImageEncoder(nn.Module):
    def __init__(self, body: nn.Module, out_features: int):
        super().__init__()
        self.body = body
        self.out_features = out_features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std  # (B, 3, S, S)
        return self.body(x)  # (B, F)


def build_encoder(name: str, pretrained: bool, seed: int = 0) -> ImageEncoder:
    """ImageNet weights, or a random init drawn from `seed` alone (the global generator is left as
    it was): either way the weights follow from the arguments, so a frozen encoder need not be
    saved with the model that reads its features."""
    if pretrained:
        return _build_encoder(name, pretrained=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_encoder(name, pretrained=False)


def weights_digest(encoder: nn.Module) -> str:
    """A digest of the weights, to check that a rebuilt random encoder is the one that was trained
    with (torch's init code may change between versions)."""
    digest = hashlib.blake2b(digest_size=16)
    for key, tensor in encoder.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _build_encoder(name: str, pretrained: bool) -> ImageEncoder:
    if name == "vgg-small":
        if pretrained:
            raise ValueError("encoder vgg-small has no pretrained weights: set pretrained=false")
        return _small_vgg()
    if name in VGG_ENCODERS:
        vgg = _torchvision_model(name, pretrained)
        # Show and Tell's image feature: the 4096-d output of fc7, classifier minus its last layer.
        body = nn.Sequential(vgg.features, vgg.avgpool, nn.Flatten(), *list(vgg.classifier)[:-1])
        return ImageEncoder(body, vgg.classifier[-1].in_features)
    if name in RESNET_ENCODERS:
        resnet = _torchvision_model(name, pretrained)
        body = nn.Sequential(*list(resnet.children())[:-1], nn.Flatten())  # pooled, no fc
        return ImageEncoder(body, resnet.fc.in_features)
    raise ValueError(f"unknown encoder {name!r}: choose one of {VGG_ENCODERS + RESNET_ENCODERS}")


def _small_vgg(widths: tuple[int, ...] = (16, 32, 64, 128), out_features: int = 256) -> ImageEncoder:
    """VGG-style conv/BN/ReLU/pool blocks for CPU work. The 4x4 grid is flattened, not pooled
    away, so where things are in the image survives into the feature (as VGG's fc layers do)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for width in widths:
        layers += [nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        in_ch = width
    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(in_ch * 16, out_features),
               nn.ReLU(inplace=True)]
    return ImageEncoder(nn.Sequential(*layers), out_features)


def weights_enum(name: str):
    """The torchvision weights an encoder uses when pretrained (ImageNet-1k, version 1)."""
    return torchvision.models.get_model_weights(name).IMAGENET1K_V1


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    if not pretrained:
        return torchvision.models.get_model(name, weights=None)
    weights = weights_enum(name)
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a broken download a RuntimeError
        hub = torch.hub.get_dir()
        raise WeightsUnavailable(
            f"could not load ImageNet weights {weights} for encoder {name} ({e}).\n"
            f"  Fetch them beforehand on a machine with internet access:\n"
            f"    python -c \"import torchvision; torchvision.models.get_model('{name}', weights='{weights.name}')\"\n"
            f"  then copy {hub}/checkpoints/{weights.url.rsplit('/', 1)[-1]} to the same folder here\n"
            f"  (or set TORCH_HOME), or train without them: --set pretrained=false"
        ) from e
