"""VQGAN training losses (taming.modules.losses.vqperceptual, written plainly).

- :class:`LPIPS`: the VGG16 perceptual distance, same state_dict keys as taming's LPIPS
  (``net.slice1..5.*``, ``lin0..4.model.1.weight``); its weights come from a local file
  (``--lpips-weights``), never from the network.
- :class:`NLayerDiscriminator`: the PatchGAN discriminator (keys ``main.*``, stored in
  checkpoints as ``loss.discriminator.main.*`` like taming's).
- :func:`hinge_d_loss`, :func:`adaptive_weight`: the GAN terms of taming's loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kodalle_cli.errors import KodalleError

_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class _VGG16Slices(nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        for i, (a, b) in enumerate(_VGG_SLICES, 1):
            seq = nn.Sequential()
            for x in range(a, b):
                seq.add_module(str(x), features[x])
            setattr(self, f"slice{i}", seq)

    def forward(self, x):
        outs = []
        for i in range(1, 6):
            x = getattr(self, f"slice{i}")(x)
            outs.append(x)
        return outs


class _NetLinLayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Learned perceptual image patch similarity (images in [-1, 1]); frozen."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.net = _VGG16Slices()
        for i, c in enumerate(_LPIPS_CHANNELS):
            setattr(self, f"lin{i}", _NetLinLayer(c))
        self.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """Weights of taming's LPIPS module (VGG16 + lin layers), .safetensors or .pth."""
        path = Path(path)
        if not path.is_file():
            raise KodalleError(f"--lpips-weights {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd)
        sd = {k.removeprefix("perceptual_loss.").removeprefix("loss.perceptual_loss."): v
              for k, v in sd.items()}
        sd = {k.replace("scaling_layer.", ""): v for k, v in sd.items()}
        model = cls()
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k not in ("shift", "scale")]
        if missing or unexpected:
            raise KodalleError(
                f"--lpips-weights {path} is not a full LPIPS (VGG16 + lin) state_dict: "
                f"{len(missing)} missing (e.g. {missing[:1]}), {len(unexpected)} unexpected"
            )
        return model.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # always frozen, dropout off
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance ``[B, 1, 1, 1]``."""
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = 0
        for i, (a, b) in enumerate(zip(fx, fy, strict=True)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model((a - b) ** 2).mean([2, 3], keepdim=True)
        return total


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix), as taming builds it (BatchNorm, ndf 64, 3 layers)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                    nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        seq += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_loss, g_loss, last_layer, disc_weight: float) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at the last layer."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(w, 0.0, 1e4).detach() * disc_weight
