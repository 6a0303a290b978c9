"""The VQGAN image tokenizer (taming-transformers compatible).

``load_vqgan(spec, config=None, device="cpu") -> VQGAN`` with ``.encode(images)``,
``.decode(codes)``, ``.num_tokens``, ``.image_size``, ``.fmap_size``, ``.identity()`` and
``save_vqgan(model, directory)``.

- :mod:`.model`: the network (``VQGAN``, ``VQGANConfig``), no file formats
- :mod:`.io`: every file format: ``load_vqgan`` (see there for what ``spec`` may be),
  ``save_vqgan``, ``save_taming_checkpoint``, taming configs, the presets
- :mod:`.losses`, :mod:`.train`: ``kodalle train vqgan``
"""

from kodalle_cli.vqgan.io import PRESETS, load_vqgan, save_taming_checkpoint, save_vqgan
from kodalle_cli.vqgan.model import VQGAN, VQGANConfig

__all__ = ["PRESETS", "VQGAN", "VQGANConfig", "load_vqgan", "save_taming_checkpoint",
           "save_vqgan"]
