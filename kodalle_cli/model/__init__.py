"""The DALLE transformer (:mod:`.dalle`), DALLE-pytorch/KoDALLE conversion (:mod:`.convert`)."""

from kodalle_cli.model.dalle import DALLE, DALLEConfig, KVCache, init_from_backbone

__all__ = ["DALLE", "DALLEConfig", "KVCache", "init_from_backbone"]
