"""KLUE RoBERTa (Korean): KoDALLE's text encoder. wte 32000 x D, wpe 514 x D, offset 2."""

from kodalle_cli import hookimpl
from kodalle_cli.backbone import Backbone

# The hub's main branch; these repositories have not changed since their 2021 release.
# Pin a commit hash here (or pass --backbone-path) to freeze it.
KLUE_REVISION = "main"


@hookimpl
def kodalle_register_backbones(register):
    register(Backbone(
        name="klue-roberta-large", source="klue/roberta-large", revision=KLUE_REVISION,
        language="ko", description="KLUE RoBERTa large (KoDALLE's baseline): 32000 x 1024",
    ))
    register(Backbone(
        name="klue-roberta-base", source="klue/roberta-base", revision=KLUE_REVISION,
        language="ko", description="KLUE RoBERTa base: 32000 x 768",
    ))
