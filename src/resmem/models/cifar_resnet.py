"""CIFAR-style ResNets (He et al. 2016) as a transformers `PreTrainedModel` with its own config.

3x3 stem without max-pool, stages of basic blocks; the paper's CIFAR-ResNet8 is
`hidden_sizes=(16, 32, 64), depths=(1, 1, 1)`, and the common CIFAR ResNet-18 is
`hidden_sizes=(64, 128, 256, 512), depths=(2, 2, 2, 2)`. Registered with the Auto classes on
import, so a wrapped or saved model reloads through `AutoModelForImageClassification`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention


class CifarResNetConfig(PreTrainedConfig):
    r"""
    Args:
        num_channels (`int`, defaults to 3): input channels.
        hidden_sizes (`list[int]`, defaults to `[16, 32, 64]`): channels of each stage.
        depths (`list[int]`, defaults to `[1, 1, 1]`): basic blocks per stage.

    Example:

    ```python
    >>> from resmem.models import CifarResNetConfig, CifarResNetForImageClassification
    >>> model = CifarResNetForImageClassification(CifarResNetConfig(num_labels=100))  # ResNet8
    ```
    """

    model_type = "cifar_resnet"
    num_channels: int = 3
    hidden_sizes: list[int] | tuple[int, ...] = (16, 32, 64)
    depths: list[int] | tuple[int, ...] = (1, 1, 1)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNetPreTrainedModel(PreTrainedModel):
    config_class = CifarResNetConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if module.running_mean is not None:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)


class CifarResNetForImageClassification(CifarResNetPreTrainedModel):
    """CIFAR ResNet: stem conv3x3 -> stages -> global average pool -> `classifier` (Linear)."""

    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        widths, depths = list(config.hidden_sizes), list(config.depths)
        self.stem = nn.Sequential(
            nn.Conv2d(config.num_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, in_channels = [], widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                blocks.append(BasicBlock(in_channels, width, 2 if (i == 0 and stage > 0) else 1))
                in_channels = width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        """`pixel_values` `(B, C, H, W)` -> `logits` `(B, num_labels)`."""
        features = self.pool(self.stages(self.stem(pixel_values))).flatten(1)  # (B, hidden_sizes[-1])
        logits = self.classifier(features)  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


AutoConfig.register(CifarResNetConfig.model_type, CifarResNetConfig, exist_ok=True)
AutoModelForImageClassification.register(CifarResNetConfig, CifarResNetForImageClassification, exist_ok=True)
