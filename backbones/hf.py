"""The generic backbone: any Hugging Face model directory or hub id.

``--backbone hf --backbone-path DIR``, or simply ``--backbone DIR`` / ``--backbone org/name``.
The tables are found from the model's config and ``get_input_embeddings()``.
"""

from kodalle_cli import hookimpl
from kodalle_cli.backbone import Backbone


@hookimpl
def kodalle_register_backbones(register):
    register(Backbone(
        name="hf", source=None, language="any",
        description="any transformers model: --backbone-path DIR or --backbone DIR|ORG/NAME",
    ))
