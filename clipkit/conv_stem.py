"""A convolutional stem for open_clip's VisionTransformer: early convolutions in place of the patchify layer.

A ViT cuts the image into patches with one strided convolution, so each patch token starts as a linear
function of its pixels. A few 3x3 stride-2 convolutions instead ("Early Convolutions Help Transformers See
Better", Xiao et al. 2021) give each patch token edges and corners from its neighbourhood, which a small
ViT needs to tell shapes apart (a circle from a ring or a hexagon at 8 pixels a patch), and cost little.

clipkit's configs ask for it under their own key, which open_clip never sees:
`{"clipkit": {"conv_stem": [32, 64, 128]}}` — one 3x3 stride-2 convolution (and GELU) per entry, as many as
the patch size has factors of two, then a 1x1 convolution to the transformer's width.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


class ConvStem(nn.Sequential):
    """3x3 stride-2 convolutions with GELU from RGB to the patch grid, then a 1x1 to `width` channels:
    the same [B, width, H/patch, W/patch] output as the patchify convolution it replaces."""

    def __init__(self, channels: Sequence[int], width: int, patch_size: int):
        channels = [int(c) for c in channels]
        if patch_size != 2 ** len(channels) or not channels or min(channels) < 1:
            raise ValueError(f"conv_stem needs one channel count per factor of two of the patch size "
                             f"({patch_size}), got {channels}")
        layers: list[nn.Module] = []
        previous = 3
        for count in channels:
            layers += [nn.Conv2d(previous, count, 3, stride=2, padding=1), nn.GELU()]
            previous = count
        layers.append(nn.Conv2d(previous, width, 1))
        super().__init__(*layers)
        self.channels = channels


def apply_conv_stem(clip: nn.Module, channels: Sequence[int]) -> None:
    """Replace the patchify convolution of `clip.visual` (an open_clip VisionTransformer) with a ConvStem."""
    visual = getattr(clip, "visual", None)
    patchify = getattr(visual, "conv1", None)
    if not isinstance(patchify, nn.Conv2d) or patchify.kernel_size[0] != patchify.stride[0]:
        raise ValueError("conv_stem applies to open_clip VisionTransformer image towers only")
    visual.conv1 = ConvStem(channels, patchify.out_channels, patchify.stride[0]).to(patchify.weight.dtype)

