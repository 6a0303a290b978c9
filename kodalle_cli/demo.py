"""``kodalle demo``: the whole pipeline on built-in synthetic K-Fashion data, with a report.

Stages (each one the library function its subcommand calls):

1. synthetic K-Fashion images + label JSONs (a fixed seed), holding out some
   colour/category combinations that never appear in training;
2. ``prepare`` -> image shards with a validation split; ``train vqgan`` (a small f8 model:
   64 px -> 8x8 codes); a tiny Korean stand-in for klue/roberta-large (WordPiece tokenizer
   trained on the captions, klue's special ids, a small RoBERTa) used through the ``hf``
   backbone; ``tokenize``;
3. ``train`` a small DALLE, ``train reranker``;
4. ``sample`` for validation captions and for the held-out combinations, ``rerank``,
   ``score``;
5. caption faithfulness from the generator's ground truth: the share of generated garments
   whose colour (read from the pixels) is the caption's colour, against chance;
6. ``OUT/report.html``: grids, VQGAN reconstructions, loss curves, scores, timings.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kodalle_cli.data import synthetic

console = Console()

# Colours x categories the demo draws; HOLDOUT pairs never appear in training, while each
# of their colours and categories does (with other partners).
COLOURS = ("레드", "블루", "블랙", "옐로우", "그린", "핑크")
CATEGORIES = ("티셔츠", "블라우스", "스커트", "팬츠", "코트", "드레스")
HOLDOUT = (("레드", "스커트"), ("블루", "코트"), ("그린", "티셔츠"), ("옐로우", "드레스"),
           ("핑크", "팬츠"), ("블랙", "블라우스"))
COLOUR_RE = re.compile(r"색상은 (\S+?)이다")


@dataclass
class DemoSize:
    samples: int
    vqgan_steps: int
    vqgan_ch: int
    dalle_steps: int
    dalle_dim: int
    dalle_depth: int
    reranker_steps: int
    seen_captions: int
    images_per_caption: int
    score_samples: int


FULL = DemoSize(samples=4000, vqgan_steps=1000, vqgan_ch=32, dalle_steps=1200, dalle_dim=128,
                dalle_depth=4, reranker_steps=200, seen_captions=12, images_per_caption=8,
                score_samples=96)
QUICK = DemoSize(samples=400, vqgan_steps=40, vqgan_ch=32, dalle_steps=60, dalle_dim=64,
                 dalle_depth=2, reranker_steps=10, seen_captions=3, images_per_caption=4,
                 score_samples=12)


@dataclass
class DemoConfig:
    out: Path = Path("demo")
    quick: bool = False
    seed: int = 0
    image_size: int = 64
    text_seq_len: int = 20
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


def caption_colour(caption: str) -> str | None:
    match = COLOUR_RE.search(caption)
    return match.group(1) if match else None


def holdout_captions(root: Path, seed: int, per_combo: int = 1) -> list[str]:
    """Captions of garments whose colour/category pair was held out of training."""
    from kodalle_cli.data.captions import caption_from_label

    items = synthetic.generate(root, len(HOLDOUT) * per_combo * 3, size=32, seed=seed + 1,
                               combos=HOLDOUT)
    captions, per = [], defaultdict(int)
    for item in items:
        combo = (item.garment.colour, item.garment.category)
        if per[combo] < per_combo:
            per[combo] += 1
            label = json.loads(item.label.read_text(encoding="utf-8"))
            captions.append(caption_from_label(label))
    return captions


def seen_captions(shards: Path, count: int) -> list[str]:
    """Distinct validation captions, one per colour/category pair first."""
    from kodalle_cli.data.shards import iter_image_samples

    captions, seen = [], set()
    for sample in iter_image_samples(shards, split="val"):
        key = (caption_colour(sample.caption), sample.caption.split("카테고리는 ")[-1][:6])
        if key not in seen:
            seen.add(key)
            captions.append(sample.caption)
        if len(captions) >= count:
            break
    return captions


def rendered_palette(vqgan_dir: Path, shards: Path, size: int,
                     per_colour: int = 8) -> tuple[dict[str, tuple[float, float, float]], float, int]:
    """Each colour as this VQGAN draws it, and how often its reconstructions read back right.

    A small VQGAN trained for minutes renders colours off-true (a blue may come out teal), so
    generated garments are read against the VQGAN's own rendering of each colour: the mean
    garment pixel of its reconstructions of validation images of that colour. The share of
    those reconstructions read back as their own colour is the ceiling for faithfulness.
    """
    import numpy as np

    from kodalle_cli.data.images import to_tensor
    from kodalle_cli.data.shards import iter_image_samples
    from kodalle_cli.vqgan.load import load_vqgan

    by_colour: dict[str, list] = defaultdict(list)
    for sample in iter_image_samples(shards, split="val"):
        colour = caption_colour(sample.caption)
        if colour in COLOURS and len(by_colour[colour]) < per_colour:
            by_colour[colour].append(sample.image)
    vqgan = load_vqgan(vqgan_dir)
    names = [c for c in COLOURS if by_colour[c]]
    images = [im for c in names for im in by_colour[c]]
    truth = [c for c in names for _ in by_colour[c]]
    recon = vqgan.decode(vqgan.encode(to_tensor(images, size=size)))
    arrays = [np.asarray(synthetic._rgb(r)) for r in recon]
    palette = {}
    for colour in names:
        pixels = [a[synthetic.foreground(a)] for a, t in zip(arrays, truth, strict=True)
                  if t == colour]
        pixels = np.concatenate(pixels) if pixels else np.zeros((0, 3))
        palette[colour] = tuple(float(v) for v in (
            np.median(pixels, axis=0) if len(pixels) else synthetic.COLOURS[colour]))
    read = [synthetic.garment_colour(a, palette) for a in arrays]
    ceiling = sum(r == t for r, t in zip(read, truth, strict=True)) / max(len(truth), 1)
    return palette, ceiling, len(truth)


def faithfulness(results, captions: list[str], palette: dict) -> dict:
    """Share of generated images whose garment colour (from pixels) is the caption's."""
    hits = total = 0
    for result, caption in zip(results, captions, strict=True):
        want = caption_colour(caption)
        for image in result.images:
            hits += synthetic.garment_colour(image, palette) == want
            total += 1
    return {"match": hits / max(total, 1), "images": total, "chance": 1 / len(COLOURS)}


# ---- the run ---------------------------------------------------------------------------------
class Stages:
    """Times each stage and shows it as a rule in the terminal."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        console.rule(f"[bold]{name}")
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start
        console.print(f"[green]done[/green] {name} in {self.timings[name]:.1f} s")


def run_demo(cfg: DemoConfig) -> DemoResult:
    from kodalle_cli.data.prepare import PrepareConfig, prepare
    from kodalle_cli.errors import KodalleError
    from kodalle_cli.generate import SampleConfig, sample
    from kodalle_cli.rerank.train import RerankerTrainConfig, train_reranker
    from kodalle_cli.score import ScoreConfig, inception_weights, run_score
    from kodalle_cli.tiny_backbone import build_klue_like
    from kodalle_cli.tokenize import TokenizeConfig, tokenize
    from kodalle_cli.train.dalle import DalleTrainConfig, run_train
    from kodalle_cli.vqgan.train import VQGANTrainConfig, train_vqgan

    size, out, stage = cfg.size, Path(cfg.out), Stages()
    out.mkdir(parents=True, exist_ok=True)
    raw, shards, runs = out / "kfashion", out / "shards", out / "runs"
    combos = [(c, k) for k in CATEGORIES for c in COLOURS]

    with stage("1. synthetic K-Fashion data"):
        if not (raw / "labels").is_dir():
            synthetic.generate(raw, size.samples, size=cfg.image_size, seed=cfg.seed,
                               combos=combos, holdout=HOLDOUT, split_dirs=True)
        held = holdout_captions(out / "holdout-labels", cfg.seed)
        console.print(f"{size.samples} images, {len(combos) - len(HOLDOUT)} colour/category "
                      f"pairs; held out of training: "
                      + ", ".join(f"{c} {k}" for c, k in HOLDOUT))

    with stage("2. prepare -> shards"):
        prepare(PrepareConfig(source=raw, out=shards, image_size=cfg.image_size,
                              val_fraction=0.1, shard_size=2000, workers=2,
                              progress=cfg.progress))

    vqgan_dir = runs / "vqgan"
    with stage("3. train vqgan (f8: 64 px -> 8x8 codes)"):
        if not (vqgan_dir / "model.safetensors").is_file():
            train_vqgan(VQGANTrainConfig(
                data=shards, out=vqgan_dir, ch=size.vqgan_ch, ch_mult=(1, 2, 2, 4),
                n_embed=256, embed_dim=64, resolution=cfg.image_size, num_res_blocks=1,
                attn_resolutions=(), lr=1e-3, batch_size=8, restart_after=20, max_steps=size.vqgan_steps,
                seed=cfg.seed, progress=cfg.progress, resume=(vqgan_dir / "checkpoints").is_dir(),
                save_every=max(size.vqgan_steps // 3, 1),
            ))

    backbone_dir = out / "backbone-klue-standin"
    with stage("4. tiny Korean backbone + tokenize"):
        console.print("[yellow]Offline demo: a tiny stand-in for klue/roberta-large (WordPiece "
                      "tokenizer trained on these captions, klue's special ids, a small "
                      "RoBERTa), used through the hf backbone. The real run uses "
                      "--backbone klue-roberta-large.[/yellow]")
        if not (backbone_dir / "model.safetensors").is_file():
            from kodalle_cli.data.shards import iter_image_samples

            texts = [s.caption for s in iter_image_samples(shards, split="train")] + held
            build_klue_like(backbone_dir, texts, vocab_size=400, hidden=size.dalle_dim,
                            layers=2, heads=2, max_positions=cfg.text_seq_len + 2,
                            seed=cfg.seed)
        tokenize(TokenizeConfig(shards=shards, vqgan=str(vqgan_dir), backbone=str(backbone_dir),
                                text_seq_len=cfg.text_seq_len, batch_size=64, device="cpu",
                                progress=cfg.progress))

    dalle_dir = runs / "dalle"
    with stage("5. train DALLE"):
        run_train(DalleTrainConfig(
            backbone=str(backbone_dir), data=shards, out=dalle_dir, vqgan=str(vqgan_dir),
            dim=size.dalle_dim, depth=size.dalle_depth, heads=4, dim_head=32,
            text_seq_len=cfg.text_seq_len, cond_drop=0.1, lr=1e-3, weight_decay=3e-3,
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
                backbone=str(backbone_dir), data=str(shards), out=str(reranker_dir),
                image_size=cfg.image_size, embed_dim=64, text_seq_len=cfg.text_seq_len,
                max_steps=size.reranker_steps, batch_size=32, lr=5e-4,
                warmup_steps=min(20, size.reranker_steps // 5), eval_every=size.reranker_steps,
                eval_samples=64, save_every=size.reranker_steps, seed=cfg.seed, device="cpu",
            ), progress=cfg.progress)

    seen = seen_captions(shards, size.seen_captions)
    held = held[: max(2, size.seen_captions // 2)]
    results = {}
    with stage("7. sample (seen and held-out combinations), rerank"):
        for name, captions in (("seen", seen), ("held-out", held)):
            results[name] = sample(SampleConfig(
                captions=captions, n=size.images_per_caption, checkpoint=dalle_dir,
                out=out / "samples" / name, batch_size=32, cond_scale=cfg.cond_scale,
                seed=cfg.seed, rerank=reranker_dir, device="cpu", progress=cfg.progress,
            ))
    palette, ceiling, checked = rendered_palette(vqgan_dir, shards, cfg.image_size)
    faith = {name: faithfulness(results[name], caps, palette)
             for name, caps in (("seen", seen), ("held-out", held))}
    faith["VQGAN reconstructions (ceiling)"] = {
        "match": ceiling, "images": checked, "chance": 1 / len(COLOURS)}

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
    write_report(result, cfg, results, {"seen": seen, "held-out": held},
                 {"vqgan": vqgan_dir, "dalle": dalle_dir, "reranker": reranker_dir})
    console.print(summary_table(result))
    console.print(f"report: {result.report}")
    return result


# ---- the report ------------------------------------------------------------------------------
def summary_table(result: DemoResult) -> Table:
    table = Table("what", "value", title="kodalle demo")
    for name, f in result.faithfulness.items():
        table.add_row(f"colour match, {name} combinations",
                      f"{f['match']:.0%} of {f['images']} images (chance {f['chance']:.0%})")
    for key, value in _flat_scores(result.scores).items():
        table.add_row(key, value)
    for name, seconds in result.timings.items():
        table.add_row(f"time: {name}", f"{seconds:.0f} s")
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


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _file_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


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
        with path.open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and "metric" in rows[0]:  # tidy: step,split,metric,value
            for r in rows:
                if r["metric"] == "loss":
                    series.setdefault(f"{name} {r['split']}", []).append(
                        (int(r["step"]), float(r["value"])))
        elif rows and "loss" in rows[0]:  # wide: step,...,loss,...
            series[f"{name} train"] = [(int(r["step"]), float(r["loss"])) for r in rows]
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


def write_report(result: DemoResult, cfg: DemoConfig, results: dict, captions: dict,
                 run_dirs: dict[str, Path]) -> Path:
    esc = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'><title>kodalle demo</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}"
        "img{image-rendering:pixelated}.cap{font-size:14px;margin:.8em 0 .2em}</style>",
        "<h1>kodalle demo</h1>",
        "<p>A small KoDALLE trained from nothing on synthetic K-Fashion data "
        f"({'quick' if cfg.quick else 'full'} size, {cfg.image_size} px, 8x8 VQGAN codes). "
        "The text encoder is a tiny offline stand-in for klue/roberta-large; the real run "
        "uses <code>--backbone klue-roberta-large</code>.</p>",
        "<h2>Caption faithfulness</h2><table><tr><th>combinations</th><th>colour match</th>"
        "<th>images</th><th>chance</th></tr>",
    ]
    for name, f in result.faithfulness.items():
        parts.append(f"<tr><td>{name}</td><td>{f['match']:.0%}</td><td>{f['images']}</td>"
                     f"<td>{f['chance']:.0%}</td></tr>")
    parts.append("</table><p>Colours are read from the pixels against how this VQGAN draws "
                 "each colour (the median garment pixel of its reconstructions of validation "
                 "images); the last row is how often those reconstructions read back as their "
                 "own colour, the ceiling for the rows above. Held out of training: "
                 + esc(", ".join(f"{c} {k}" for c, k in HOLDOUT)) + "</p>")
    parts.append("<h2>Scores</h2><table>")
    for key, value in _flat_scores(result.scores).items():
        parts.append(f"<tr><td>{esc(key)}</td><td>{esc(value)}</td></tr>")
    parts.append("</table>")
    curves = loss_curves(run_dirs)
    if curves:
        parts.append(f"<h2>Loss curves</h2><img src='{curves}' style='max-width:100%'>")
    recon = run_dirs["vqgan"] / "reconstructions.png"
    if recon.is_file():
        parts.append("<h2>VQGAN reconstructions</h2><p>top: input, bottom: decoded codes</p>"
                     f"<img src='{_file_png(recon)}' width='512'>")
    for name, caption_results in results.items():
        parts.append(f"<h2>Generated: {name} combinations</h2>")
        for res in caption_results:
            parts.append(f"<div class='cap'>{esc(res.caption)}</div>")
            parts.append("".join(f"<img src='{_png(im)}' width='96'> " for im in res.images))
    parts.append("<h2>Timings</h2><table>")
    for stage_name, seconds in result.timings.items():
        parts.append(f"<tr><td>{esc(stage_name)}</td><td>{seconds:.0f} s</td></tr>")
    parts.append(f"<tr><td><b>total</b></td><td>{sum(result.timings.values()):.0f} s</td></tr>"
                 "</table>")
    tmp = result.report.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(result.report)
    (result.out / "summary.json").write_text(json.dumps({
        "timings": result.timings, "faithfulness": result.faithfulness,
        "scores": result.scores.get("metrics", {}),
        "fidelity_skipped": result.scores.get("fidelity_skipped"),
        "config": {k: str(v) for k, v in asdict(cfg).items()},
    }, ensure_ascii=False, indent=2), encoding="utf-8")
    return result.report
