"""Korean GPT backbones: SKT's KoGPT-Trinity (GPT-2) and Kakao Brain's KoGPT (GPT-J, rotary)."""

from kodalle_cli import hookimpl
from kodalle_cli.backbone import Backbone


@hookimpl
def kodalle_register_backbones(register):
    register(Backbone(
        name="kogpt-trinity", source="skt/ko-gpt-trinity-1.2B-v0.5", revision="main",
        language="ko", description="SKT KoGPT-Trinity 1.2B (GPT-2): wte 51200 x 1920, wpe 1024",
    ))
    register(Backbone(
        name="kakaobrain-kogpt", source="kakaobrain/kogpt",
        revision="KoGPT6B-ryan1.5b-float16", language="ko",
        description="Kakao Brain KoGPT 6B (GPT-J): wte 64512 x 4096, rotary (no wpe)",
        refuse_contextual="KoGPT 6B needs about 12 GiB just to hold its weights in fp16, on "
                          "every rank, for every caption; use --text-encoder tables",
        tokenizer_kwargs={
            "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]",
            "pad_token": "[PAD]", "mask_token": "[MASK]",
        },
    ))
