"""``kodalle score``: FID, KID and Inception Score (torch-fidelity), CLIP-score and R-precision
(the reranker), written to ``score.json``.

How the numbers are made, so two runs are comparable:

- Reference set: the first N validation samples of the image shards; generated set: one image
  per reference caption, made by ``sample``'s function (``--checkpoint``), or the images of a
  folder (``--images``, made elsewhere).
- Both sets are written as PNG files of one size (the generated images' size) through one
  resizer (:func:`kodalle_cli.data.images.fit`, PIL Lanczos), into ``OUT/generated`` and
  ``OUT/reference``, and torch-fidelity reads the two folders (what its command line would
  read). The tool, its version and every setting go into ``score.json``.
- Inception weights: ``--inception-weights PATH``, else torch hub's cache of torch-fidelity's
  file, else a download when online; offline without them: one error line. The file is first
  read with ``torch.load(weights_only=True)``: a file that needs unpickling is refused.
- CLIP-score: mean cosine similarity between each generated image and its caption under the
  reranker. R-precision: the share of generated images whose own caption ranks first among
  itself and 99 other validation captions drawn at random (captions with the same text as the
  true one are never drawn as distractors).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from kodalle_cli.atomic import replacing, write_json_atomic
from kodalle_cli.configs import MIN_FID_IMAGES, ScoreConfig
from kodalle_cli.data import urls
from kodalle_cli.errors import KodalleError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESIZER = "PIL Lanczos via kodalle_cli.data.images.fit (pad)"




# ---- inputs ------------------------------------------------------------------------------------
def read_reference(data, split: str, count: int, pool: int) -> tuple[list, list[str], list[str]]:
    """The first ``count`` samples of ``split`` (images and captions), and up to ``pool``
    captions of the split for R-precision's distractors."""
    from kodalle_cli.data.shards import iter_image_samples

    images, captions, all_captions = [], [], []
    for s in iter_image_samples(data, split=split, decode=False, split_by_worker=False):
        if len(images) < count:
            images.append(s.image)
            captions.append(s.caption)
        all_captions.append(s.caption)
        if len(images) >= count and len(all_captions) >= pool:
            break
    if not images:
        raise KodalleError(f"the {split} shards in {data} hold no samples")
    return images, captions, all_captions


def caption_for(path: Path) -> str | None:
    """A caption for an image made elsewhere: ``NAME.txt`` beside it, else ``caption.txt``
    (or ``prompt.txt``) or ``kodalle sample``'s ``metadata.json`` in its folder; else None."""
    for candidate in (path.with_suffix(".txt"), path.parent / "caption.txt",
                      path.parent / "prompt.txt"):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").strip()
    meta = path.parent / "metadata.json"  # a `kodalle sample` caption directory
    if meta.is_file():
        try:
            caption = json.loads(meta.read_text(encoding="utf-8")).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if isinstance(caption, str) and caption.strip():
            return caption.strip()
    return None


def read_image_folder(folder, count: int, warn=None) -> tuple[list[Path], list[str | None]]:
    """The first ``count`` readable images of ``folder`` (by path; grids left out) and their
    captions (:func:`caption_for`). Files with an image extension that do not decode are
    skipped with a warning giving the reason."""
    from kodalle_cli.data.images import ImageError, open_image
    from kodalle_cli.errors import warn as warn_user

    warn = warn or warn_user
    folder = Path(folder)
    if not folder.is_dir():
        raise KodalleError(f"--images {folder} is not a directory")
    candidates = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and "grid" not in p.stem
    )
    paths = []
    for path in candidates:
        if len(paths) >= count:
            break
        try:
            open_image(path)
        except ImageError as exc:
            warn(f"skipped {path}: {exc}")
            continue
        paths.append(path)
    if not paths:
        raise KodalleError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return paths, [caption_for(p) for p in paths]


def write_pngs(images, folder: Path, size: int, warn=None) -> Path:
    """Write images (PIL, paths or JPEG bytes) as ``000000.png``... at ``size`` x ``size``;
    one that does not decode is skipped with a warning (``warn``) and leaves its number
    unused."""
    from kodalle_cli.data.images import ImageError, fit, open_image, to_rgb
    from kodalle_cli.errors import warn as warn_user

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        if not hasattr(im, "size"):  # a path or JPEG bytes
            try:
                im = open_image(im)[0]
            except ImageError as exc:
                name = im if isinstance(im, (str, Path)) else f"image {i}"
                (warn or warn_user)(f"skipped {name} (for {folder.name}): {exc}")
                continue
        im = to_rgb(im)
        if im.size != (size, size):
            im = fit(im, size, "pad")
        im.save(folder / f"{i:06d}.png")
    return folder


# ---- torch-fidelity ------------------------------------------------------------------------------
def inception_weights(explicit: str | Path | None) -> Path:
    """A local Inception-v3 weights file for torch-fidelity (see the module docstring)."""
    from kodalle_cli.backbone import hub_offline

    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise KodalleError(f"--inception-weights {path} does not exist")
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not path.is_file():
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

            if hub_offline():
                raise KodalleError(
                    f"the Inception weights for FID/KID/IS are not cached ({path}) and the "
                    f"session is offline; pass --inception-weights PATH (from {URL_INCEPTION_V3})"
                )
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=True)
            except Exception as exc:  # noqa: BLE001 - any network failure is the same to a user
                raise KodalleError(
                    f"cannot download the Inception weights ({type(exc).__name__}); pass "
                    f"--inception-weights PATH (a copy of {URL_INCEPTION_V3})"
                ) from None
    try:  # torch-fidelity itself unpickles; make sure the file is plain tensors first
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise KodalleError(
            f"{path} is not a plain-tensor Inception state_dict ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise KodalleError(f"{path} is not torch-fidelity's inception-v3-compat state_dict")
    return path


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's own inception-v3-compat extractor with random weights, saved as a
    state_dict: for tests and offline demos. Its scores agree with themselves (a set against
    itself gives FID ~0) but are not comparable with published numbers."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict",
                          lambda self, state: None),
    ):
        torch.manual_seed(seed)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    # PyTorch's default init shrinks the signal layer by layer until every image gives the
    # same features; He init keeps it alive through the 90-odd layers, so sets differ.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5, generator=generator)
    path = Path(path)
    with replacing(path) as tmp:
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    return path


def fidelity_settings(n_generated: int, n_reference: int) -> dict:
    """torch-fidelity options (its command-line flags have the same names with dashes)."""
    return {
        "isc": True, "fid": True, "kid": True,
        "feature_extractor": "inception-v3-compat",
        # 10 splits (the usual) once there are 500+ images; fewer for small sets, since a
        # split of one image always scores exactly 1
        "isc_splits": max(1, min(10, n_generated // 50)),
        "kid_subsets": 100,
        "kid_subset_size": min(1000, n_generated, n_reference),
        "samples_shuffle": True,
        "rng_seed": 2020,
        # no DataLoader worker processes for small sets (they cost more than they save)
        "save_cpu_ram": max(n_generated, n_reference) < 256,
    }


def fidelity_metrics(generated: Path, reference: Path, weights: Path, device: torch.device,
                     settings: dict, batch_size: int = 16) -> dict:
    import torch_fidelity

    try:
        raw = torch_fidelity.calculate_metrics(
            input1=str(generated), input2=str(reference), cuda=device.type == "cuda",
            batch_size=batch_size, feature_extractor_weights_path=str(weights), cache=False,
            verbose=False, **settings,
        )
    except ValueError as exc:  # torch-fidelity's vassert
        raise KodalleError(f"torch-fidelity: {exc}") from None
    return {
        "fid": float(raw["frechet_inception_distance"]),
        "kid_mean": float(raw["kernel_inception_distance_mean"]),
        "kid_std": float(raw["kernel_inception_distance_std"]),
        "is_mean": float(raw["inception_score_mean"]),
        "is_std": float(raw["inception_score_std"]),
    }


# ---- reranker metrics ----------------------------------------------------------------------------
def reranker_metrics(reranker, images, captions: list[str], pool: list[str],
                     distractors: int = 99, seed: int = 0) -> dict:
    """CLIP-score and R-precision of images against their own captions (see module doc)."""
    rng = random.Random(seed)
    pool_distinct = sorted(set(pool))
    texts = sorted(set(pool_distinct) | set(captions))
    index = {t: i for i, t in enumerate(texts)}
    text_emb = reranker.embed_captions(texts)  # each distinct caption once
    img = reranker.embed_images(list(images))
    own = text_emb[[index[c] for c in captions]]
    clip = (img * own).sum(-1)
    hits, counts = 0, []
    for i, caption in enumerate(captions):
        others = [c for c in pool_distinct if c != caption]
        drawn = rng.sample(others, min(distractors, len(others)))
        candidates = text_emb[[index[c] for c in (caption, *drawn)]]
        sims = candidates @ img[i]
        hits += int(sims.argmax().item() == 0)
        counts.append(len(candidates))
    return {
        "clip_score": float(clip.mean()),
        "r_precision": hits / len(captions),
        "r_precision_candidates": min(counts) if counts else 0,
    }


# ---- generation ----------------------------------------------------------------------------------
def generate_images(cfg: ScoreConfig, captions: list[str], run=None,
                    codes: list | None = None) -> list:
    """One image per caption from the run in ``cfg.checkpoint`` (or ``run``, already loaded),
    through ``sample``'s function (its default sampling settings, seeded by ``cfg.seed``).
    ``codes``: a list that receives each image's VQGAN codes ``[1, N]`` (memorisation)."""
    from kodalle_cli.sample import SampleConfig, sample

    results = sample(SampleConfig(
        captions=list(captions), n=1, checkpoint=Path(cfg.checkpoint), out=None,
        batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device, progress=cfg.progress,
    ), run)
    if codes is not None:
        codes.extend(r.codes[:1] for r in results)
    return [r.images[0] for r in results]


# ---- the command ---------------------------------------------------------------------------------
def default_out(cfg: ScoreConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.checkpoint:
        run = Path(cfg.checkpoint)
        return (run if run.is_dir() else run.parent) / "score"
    images = Path(cfg.images)
    return images.with_name(images.name + "-score")


def _enough(cfg: ScoreConfig, count: int, holds: str, warn_fewer: bool = True) -> None:
    """FID needs :data:`MIN_FID_IMAGES` images in each set: say so, with the count found."""
    if cfg.fidelity and count < MIN_FID_IMAGES:
        raise KodalleError(
            f"{holds} {count} image(s); FID needs at least {MIN_FID_IMAGES} in each set "
            "(1000 or more for numbers comparable with published ones)"
        )
    if warn_fewer and count < cfg.num_samples:
        from kodalle_cli.errors import warn

        warn(f"{holds} {count} image(s), fewer than --num-samples {cfg.num_samples}: "
             f"scoring {count}")


def run_score(cfg: ScoreConfig) -> dict:
    """Score generated (or given) images; write OUT/score.json and return what it holds."""
    import torch_fidelity

    from kodalle_cli.device import pick_device

    cfg.validate()
    device = pick_device(cfg.device)
    # fail early, before any generation: weights, reranker, the run, enough images
    weights = inception_weights(cfg.inception_weights) if cfg.fidelity else None
    reranker = run = None
    if cfg.reranker is not None:
        from kodalle_cli.rerank.model import load_reranker

        reranker = load_reranker(cfg.reranker, device)
    if cfg.checkpoint is not None:
        from kodalle_cli.runs import load_run

        run = load_run(cfg.checkpoint, "cpu")
    ref_images, ref_captions, pool = read_reference(
        urls.source(cfg.data, cfg.manifest), cfg.split, cfg.num_samples, pool=10_000
    )
    _enough(cfg, len(ref_images), f"the {cfg.split} split of {cfg.data} holds")
    gen_codes: list = []  # the run's codes of each image (memorisation)
    if cfg.checkpoint is not None:
        generated = generate_images(cfg, ref_captions, run, codes=gen_codes)
        gen_captions: list[str | None] = list(ref_captions)
        source = {"checkpoint": str(cfg.checkpoint)}
    else:
        paths, gen_captions = read_image_folder(cfg.images, cfg.num_samples)
        _enough(cfg, len(paths), f"--images {cfg.images} holds")
        generated = paths
        source = {"images": str(cfg.images)}
        ref_images = ref_images[:len(generated)]  # equal set sizes: FID's bias depends on N
    from kodalle_cli.data.images import open_image

    first = generated[0] if hasattr(generated[0], "size") else open_image(generated[0])[0]
    size = cfg.image_size or max(first.size)
    out = default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    gen_dir = write_pngs(generated, out / "generated", size)
    ref_dir = write_pngs(ref_images, out / "reference", size)
    _enough(cfg, len(list(ref_dir.glob("*.png"))),
            f"after skipping unreadable images, the {cfg.split} split of {cfg.data} holds",
            warn_fewer=False)
    settings = fidelity_settings(len(generated), len(ref_images))
    metrics = {}
    if cfg.fidelity:
        metrics = fidelity_metrics(gen_dir, ref_dir, weights, device, settings, cfg.batch_size)

    if reranker is not None:
        pairs = [(im, c) for im, c in zip(generated, gen_captions, strict=True) if c]
        if pairs:
            metrics.update(reranker_metrics(
                reranker, [p[0] for p in pairs], [p[1] for p in pairs], pool,
                cfg.distractors, cfg.seed,
            ))
            metrics["reranker_samples"] = len(pairs)
        else:
            metrics["reranker_samples"] = 0
    memo = None
    if cfg.copies:  # memorisation: each image's nearest training image
        from kodalle_cli.memorisation import memorisation

        memo = memorisation(generated_images=generated, data=cfg.data, out=out, run=run,
                            generated_codes=torch.cat(gen_codes) if gen_codes else None,
                            reranker=reranker, limit=cfg.copy_pool, device=device)
        if memo.get("near_copy_share") is not None:
            metrics["near_copy_share"] = memo["near_copy_share"]
            metrics["nearest_train_distance_median"] = memo["generated_distances"]["median"]
    result = {
        "metrics": metrics,
        "num_samples": len(generated),
        "reference_samples": len(ref_images),
        **source,
        "data": str(cfg.data),
        "split": cfg.split,
        "image_size": size,
        "image_format": "png",
        "resizer": RESIZER,
        "tool": {"name": "torch-fidelity", "version": torch_fidelity.__version__,
                 "settings": settings,
                 "inception_weights": str(weights) if weights else None},
        "reranker": str(cfg.reranker) if cfg.reranker else None,
        "config": asdict(cfg),
        "out": str(out),
        **({"memorisation": memo} if memo is not None else {}),
    }
    write_json_atomic(out / "score.json", result)
    return result


def score_table(result: dict):
    from rich.table import Column, Table

    table = Table(Column("metric", no_wrap=True), "value",
                  title=f"kodalle score ({result['num_samples']} samples)")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
    memo = result.get("memorisation") or {}
    if memo.get("skipped"):
        table.add_row("memorisation", f"skipped: {memo['skipped']}")
    elif memo.get("threshold") is not None:
        table.add_row("near-copy threshold", f"{memo['threshold']:.4g} ({memo['method']}; "
                      f"{memo['threshold_rule']})")
        table.add_row("near-copies", f"{memo['near_copies']} of {memo['generated_images']} "
                      f"(pairs: {memo.get('picture')})")
    return table
