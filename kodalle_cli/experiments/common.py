"""What the experiments share: the synthetic garments' colours, categories and palette, the
stages timer, the reports' head and stylesheet, images as data URIs, the timings table, and
the VQGAN check (the most a DALLE on its codes can show). Only modules in
``kodalle_cli.experiments`` import this."""

from __future__ import annotations

import base64
import html
import io
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from kodalle_cli.data import kfashion, synthetic
from kodalle_cli.data.captions import caption_attribute
from kodalle_cli.experiments import faithfulness as fa

console = Console()

# Colours x categories the demo draws; HOLDOUT pairs never appear in training, while each
# of their colours and categories does (with other partners).
COLOURS = ("레드", "블루", "블랙", "옐로우", "그린", "핑크")
CATEGORIES = ("티셔츠", "블라우스", "스커트", "팬츠", "코트", "드레스")
HOLDOUT = (("레드", "스커트"), ("블루", "코트"), ("그린", "티셔츠"), ("옐로우", "드레스"),
           ("핑크", "팬츠"), ("블랙", "블라우스"))
PALETTE = {c: synthetic.COLOURS[c] for c in COLOURS}  # the true colours: nothing is fitted


def caption_colour(caption: str) -> str | None:
    return caption_attribute(caption, kfashion.COLOUR)


def caption_category(caption: str) -> str | None:
    return caption_attribute(caption, kfashion.CATEGORY)


def caption_target(caption: str) -> tuple[str | None, str | None]:
    """The (colour, category) a Korean demo caption asks for."""
    return caption_colour(caption), caption_category(caption)


def vqgan_check(vqgan_dir: Path, shards: Path, size: int, seed: int,
                target=caption_target) -> dict[str, dict]:
    """Every validation image (never trained on) as it is (the checkers' own ceiling) and as
    the VQGAN reconstructs it (the most a DALLE on its codes can show), read back.
    ``target``: caption -> the (colour, category) it asks for."""
    from kodalle_cli.data.images import to_tensor
    from kodalle_cli.data.shards import iter_image_samples
    from kodalle_cli.vqgan import load_vqgan

    samples = list(iter_image_samples(shards, split="val"))
    vqgan = load_vqgan(vqgan_dir)
    images = to_tensor([s.image for s in samples], size=size)
    recon = vqgan.decode(vqgan.encode(images, batch_size=64), batch_size=64)
    wants = [target(s.caption) for s in samples]
    out = {}
    for name, pixels in (("validation images", images), ("VQGAN reconstructions", recon)):
        judged = [fa.judge(p, c, k, PALETTE) for p, (c, k) in zip(pixels, wants, strict=True)]
        out[name] = {"all": fa.summarise(judged), "chance": fa.summarise(fa.shuffled(judged, seed))}
    return out


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


# The reports' one stylesheet: Korean fonts where the system has them, ruled tables, images
# drawn pixel for pixel, caption lines (.cap) and notes (.small)
REPORT_STYLE = (
    "<style>body{font-family:system-ui,-apple-system,'Segoe UI','Noto Sans KR',"
    "'Noto Sans CJK KR','Apple SD Gothic Neo','Malgun Gothic','NanumGothic',sans-serif;"
    "max-width:1200px;margin:2em auto}"
    "td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;font-size:14px}"
    "img{image-rendering:pixelated}.cap{font-size:14px;margin:.8em 0 .2em}"
    ".small{font-size:12px;color:#555}</style>"
)


def report_head(title: str, lang: str) -> str:
    """A report page's start: UTF-8, its language, its title and :data:`REPORT_STYLE`."""
    return (f"<!doctype html><html lang='{lang}'><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title>{REPORT_STYLE}")


def png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def file_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def timings_html(timings: dict[str, float]) -> str:
    """The report's "Timings" section: seconds per stage and their total."""
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{seconds:.0f} s</td></tr>"
                   for name, seconds in timings.items())
    return (f"<h2>Timings</h2><table>{rows}<tr><td><b>total</b></td>"
            f"<td>{sum(timings.values()):.0f} s</td></tr></table>")
