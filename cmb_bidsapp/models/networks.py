"""The three networks: candidate detector (3D U-Net), teacher (Tf + Ts + Tc) and student (Tf + Tc).

All take 2 input channels on the working grid (:mod:`cmb_bidsapp.models.grid`): the lesion-bright
image and the radial-symmetry map, both in [0, 1]. All return LOGITS (never probabilities).

Building blocks
    ``ConvBlock``: two 3x3x3 convolutions, each followed by BatchNorm and LeakyReLU(0.01).
    BatchNorm (not instance or group norm) because in evaluation mode it is a fixed affine map:
    a voxel's output then does not depend on which sliding window it was computed in.

Detector (step 1): ``UNet3D(widths=(8, 16, 32))``
    3 levels (two 2x max-poolings, transposed-convolution upsampling, skip concatenation), a 1x1x1
    head with 2 output classes (background, microbleed). Input sides must be multiples of 4.
    Widths 8/16/32 (85,402 parameters) were chosen for CPU speed: on the 2 shared cores of the
    development machine it ran at about 1.2 M voxels/s (16/32/64: about 0.7 M voxels/s), and a
    brain on the 0.8 mm grid is about 6–8 M voxels. The published detector used 64/128/256
    (3.4 M parameters) on native-resolution patches.

Teacher (step 2): ``Teacher(widths=(16, 32, 64))`` on candidate-centred 24³ patches
    Tf = the U-Net encoder (24³ → 12³ → 6³), Ts = the U-Net decoder (voxel segmentation, 2
    logits per voxel), Tc = the patch classifier: a conv head (3x3x3 convolution to half the
    bottleneck width, BatchNorm, LeakyReLU, 2x max-pool to 3³), flattened, then fully connected
    layers ``-> 128 -> 32 -> 2`` (dropout 0.2 before the first) ending in 2 LOGITS.

Student (step 2): ``Student(widths=(8, 16, 32))``
    Tf + Tc only, same layout as the teacher's, half the widths by default. It alone runs at
    inference. The shipped bundle's student has the teacher's widths (16, 32, 64) and starts
    from the teacher's Tf + Tc (``--student-init teacher``; the model card says why).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

DETECTOR_WIDTHS: tuple[int, int, int] = (8, 16, 32)
TEACHER_WIDTHS: tuple[int, int, int] = (16, 32, 64)
STUDENT_WIDTHS: tuple[int, int, int] = (8, 16, 32)
PATCH_SIZE = 24
"""Side of the discriminator's candidate-centred patches (working voxels: 19.2 mm)."""
IN_CHANNELS = 2
N_CLASSES = 2


class ConvBlock(nn.Sequential):
    """Two 3x3x3 convolutions with BatchNorm and LeakyReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm3d(c_out),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm3d(c_out),
            nn.LeakyReLU(0.01, inplace=True),
        )


class Encoder(nn.Module):
    """Tf: three ConvBlocks separated by 2x max-pooling; returns the features of every level."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        a, b, c = widths
        self.enc1 = ConvBlock(in_channels, a)
        self.enc2 = ConvBlock(a, b)
        self.enc3 = ConvBlock(b, c)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x1 = self.enc1(x)
        x2 = self.enc2(F.max_pool3d(x1, 2))
        x3 = self.enc3(F.max_pool3d(x2, 2))
        return [x1, x2, x3]


class Decoder(nn.Module):
    """Ts: transposed-convolution upsampling, skip concatenation, ConvBlocks, 1x1x1 logits."""

    def __init__(self, widths: Sequence[int], n_classes: int = N_CLASSES):
        super().__init__()
        a, b, c = widths
        self.up2 = nn.ConvTranspose3d(c, b, 2, stride=2)
        self.dec2 = ConvBlock(2 * b, b)
        self.up1 = nn.ConvTranspose3d(b, a, 2, stride=2)
        self.dec1 = ConvBlock(2 * a, a)
        self.head = nn.Conv3d(a, n_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x1, x2, x3 = feats
        y = self.dec2(torch.cat([self.up2(x3), x2], dim=1))
        y = self.dec1(torch.cat([self.up1(y), x1], dim=1))
        return self.head(y)


class UNet3D(nn.Module):
    """The candidate detector: encoder + decoder, 2 input channels, 2 output logits per voxel."""

    def __init__(
        self,
        widths: Sequence[int] = DETECTOR_WIDTHS,
        in_channels: int = IN_CHANNELS,
        n_classes: int = N_CLASSES,
    ):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.encoder = Encoder(in_channels, self.widths)
        self.decoder = Decoder(self.widths, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class PatchClassifier(nn.Module):
    """Tc: conv head on the bottleneck, then fully connected layers ending in 2 LOGITS."""

    def __init__(self, width: int, patch_size: int = PATCH_SIZE, n_classes: int = N_CLASSES):
        super().__init__()
        half = max(width // 2, 4)
        side = patch_size // 8  # 24 -> 6 at the bottleneck -> 3 after the head's pooling
        self.conv = nn.Sequential(
            nn.Conv3d(width, half, 3, padding=1, bias=False),
            nn.BatchNorm3d(half),
            nn.LeakyReLU(0.01, inplace=True),
            nn.MaxPool3d(2),
        )
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(half * side**3, 128),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Linear(128, 32),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Linear(32, n_classes),
        )

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(bottleneck))


class Teacher(nn.Module):
    """Multi-task teacher: Tf (encoder), Ts (decoder: voxel logits), Tc (patch logits)."""

    def __init__(
        self,
        widths: Sequence[int] = TEACHER_WIDTHS,
        in_channels: int = IN_CHANNELS,
        patch_size: int = PATCH_SIZE,
    ):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.tf = Encoder(in_channels, self.widths)
        self.ts = Decoder(self.widths)
        self.tc = PatchClassifier(self.widths[-1], patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(patch_logits (n, 2), voxel_logits (n, 2, s, s, s))``."""
        feats = self.tf(x)
        return self.tc(feats[-1]), self.ts(feats)


class Student(nn.Module):
    """Student: Tf + Tc only; returns the patch logits (n, 2)."""

    def __init__(
        self,
        widths: Sequence[int] = STUDENT_WIDTHS,
        in_channels: int = IN_CHANNELS,
        patch_size: int = PATCH_SIZE,
    ):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.tf = Encoder(in_channels, self.widths)
        self.tc = PatchClassifier(self.widths[-1], patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tc(self.tf(x)[-1])


def n_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def build(name: str, arch: dict) -> nn.Module:
    """Build ``detector``, ``teacher`` or ``student`` from its architecture dict (bundle.json)."""
    widths = tuple(arch["widths"])
    if name == "detector":
        return UNet3D(widths)
    if name == "teacher":
        return Teacher(widths, patch_size=int(arch.get("patch_size", PATCH_SIZE)))
    if name == "student":
        return Student(widths, patch_size=int(arch.get("patch_size", PATCH_SIZE)))
    raise ValueError(f"unknown network {name!r}")


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every (Conv3d, BatchNorm3d) pair of the model's Sequentials into one Conv3d, in place.

    For inference only (eval-mode BatchNorm is a fixed affine map, so the outputs are the same up
    to float rounding); it removes the BatchNorm passes, which cost about a third of the CPU time.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        for i in range(len(children) - 1):
            conv, bn = children[i], children[i + 1]
            if isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d):
                module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = nn.Identity()
    return model
