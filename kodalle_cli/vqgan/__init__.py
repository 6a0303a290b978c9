"""The VQGAN image tokenizer (taming-transformers compatible).

``load_vqgan(spec, config=None, device="cpu") -> VQGAN`` with ``.encode(images)``,
``.decode(codes)``, ``.num_tokens``, ``.image_size``, ``.fmap_size``, ``.identity()`` and
``.save(directory)``; see :mod:`kodalle_cli.vqgan.load` for what ``spec`` may be.
"""

from kodalle_cli.vqgan.load import PRESETS, load_vqgan, save_taming_checkpoint, save_vqgan
from kodalle_cli.vqgan.model import VQGAN, VQGANConfig

__all__ = ["PRESETS", "VQGAN", "VQGANConfig", "load_vqgan", "save_taming_checkpoint",
           "save_vqgan"]
