"""The ``kodalle`` command line: a thin Typer layer over the library.

Each subcommand parses its options, builds a plain config object and calls one library
function that can be used (and is tested) without Typer. User errors are
:class:`~kodalle_cli.errors.KodalleError`: one red line, exit 1 (2 for usage), and the
traceback only with ``--debug``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kodalle_cli import __version__
from kodalle_cli.cli_options import options_from
from kodalle_cli.configs import (
    SHARDS_WHERE,
    DalleTrainConfig,
    PlanConfig,
    PrepareConfig,
    RerankerTrainConfig,
    SampleConfig,
    ScoreConfig,
    ServeConfig,
    TokenizeConfig,
    VQGANTrainConfig,
)
from kodalle_cli.errors import ConfigError, KodalleError, UsageError
from kodalle_cli.plan import PLAN_HELP
from kodalle_cli.progress import quiet_libraries

try:  # typer >= 0.20 ships its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="kodalle",
    help="Train and sample DALL-E-1 style text-to-image models whose text encoder is a "
    "pretrained language model's embeddings.\n\n"
    "Example: kodalle prepare ./kfashion && kodalle train --backbone klue-roberta-large",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
train_app = typer.Typer(
    help="Train the DALLE transformer (default), or a helper model: `train vqgan`, "
    "`train reranker`.\n\nExample: kodalle train --backbone klue-roberta-large --data shards",
    invoke_without_command=True,
)
app.add_typer(train_app, name="train")


def _version(value: bool) -> None:
    if value:
        console.print(f"kodalle {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """kodalle: text-to-image training on small domain data sets, in any language."""


# ---- data ------------------------------------------------------------------------------------
@app.command()
@options_from(PrepareConfig)
def prepare(
    source: Path = typer.Argument(..., help="Directory (or manifest file) of images and labels."),
    **options,
) -> None:
    """Turn images and labels into WebDataset shards (jpg, txt caption, json metadata).

    Example: kodalle prepare ./kfashion --val-fraction 0.05 --crop garments
    """
    from kodalle_cli.data.prepare import prepare as run_prepare
    from kodalle_cli.data.prepare import summary

    cfg = PrepareConfig(source=source, **options)
    manifest = run_prepare(cfg)
    console.print(summary(manifest, cfg.out), markup=False, highlight=False, soft_wrap=True)


@app.command()
@options_from(TokenizeConfig)
def tokenize(
    shards: str = typer.Argument(
        "shards", help=f"Image shards from `kodalle prepare`: {SHARDS_WHERE}. The token "
        "shards are written to a local folder only (--out)."),
    **options,
) -> None:
    """Encode captions with the backbone's tokenizer and images with a VQGAN into token shards.

    Example: kodalle tokenize shards --vqgan runs/vqgan --backbone klue-roberta-large
    """
    from kodalle_cli.tokenize_shards import tokenize as run_tokenize

    cfg = TokenizeConfig(shards=shards, **options)
    summary = run_tokenize(cfg)
    counts = ", ".join(f"{n} {split}" for split, n in summary.samples.items())
    console.print(
        f"tokenized {counts} samples into {summary.out} "
        f"({summary.shards_written} shards written, {summary.shards_skipped} already done, "
        f"{summary.images_per_second:.1f} images/s); "
        f"{summary.truncated} captions truncated to {cfg.text_seq_len} tokens"
        + (f"; {len(summary.lost)} remote shards not read whole (their streams broke, see "
           "the warnings): run the same command again to fetch them" if summary.lost else ""),
        soft_wrap=True,
    )


# ---- training --------------------------------------------------------------------------------
@train_app.callback()
@options_from(DalleTrainConfig, skip=("backbone",))
def train(
    ctx: typer.Context,
    backbone: str | None = typer.Option(None, help="Backbone name, directory or hub id."),
    **options,
) -> None:
    """Train the DALLE transformer on token shards (resumes when --out has a checkpoint).

    Multi-GPU / multi-node: torchrun --nproc_per_node 8 -m kodalle_cli train ...

    Ctrl-C finishes the step, saves a checkpoint and exits 130 (a second Ctrl-C stops at
    once); run the same command again to resume. Exit codes: 0 done, 1 error, 2 bad
    usage, 130 interrupted.

    Example: kodalle train --backbone klue-roberta-large --data shards --max-steps 100000
    """
    if ctx.invoked_subcommand is not None:
        return
    if backbone is None:
        raise UsageError("kodalle train needs --backbone NAME (see `kodalle backbones`)")
    cfg = DalleTrainConfig(backbone=backbone, **options)
    if cfg.dry_run:
        from kodalle_cli.plan import dry_run_table
        from kodalle_cli.train.dalle import dry_run

        console.print(dry_run_table(dry_run(cfg)))
        return
    from kodalle_cli.train.dalle import run_train

    result = run_train(cfg)
    if result.checkpoint is not None:
        console.print(f"step {result.step}: checkpoint {result.checkpoint}")


@train_app.command("vqgan")
@options_from(VQGANTrainConfig)
def train_vqgan(**options) -> None:
    """Train a VQGAN image tokenizer (taming-compatible .ckpt + .yaml, model.safetensors).

    Example: kodalle train vqgan --data shards --out runs/vqgan --resolution 256

    Example: kodalle train vqgan --recipe small-flat --data shards --out runs/vqgan
    """
    from kodalle_cli.vqgan.train import train_vqgan as run_train_vqgan

    run = run_train_vqgan(VQGANTrainConfig(**options))
    console.print(f"VQGAN written to {run} (use it with --vqgan {run})", soft_wrap=True)


@train_app.command("reranker")
@options_from(RerankerTrainConfig)
def train_reranker(**options) -> None:
    """Train the CLIP-style reranker (EfficientNet-B0 + the backbone's language model).

    Example: kodalle train reranker --backbone klue-roberta-large --data shards
    """
    from kodalle_cli.rerank.train import train_reranker as run_train_reranker

    cfg = RerankerTrainConfig(**options)
    result = run_train_reranker(cfg)
    accuracy = result.get("val_image_to_text")
    shown = f", val image->text accuracy {accuracy:.3f}" if accuracy is not None else ""
    console.print(f"reranker written to {cfg.out} (step {result['step']}{shown})")


@app.command(help=PLAN_HELP)
@options_from(PlanConfig)
def plan(as_json: bool = typer.Option(False, "--json", help="Print JSON."), **options) -> None:
    from kodalle_cli.plan import plan_table, run_plan

    result = run_plan(PlanConfig(**options))
    if as_json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    console.print(plan_table(result))
    console.print(result["verdict"], soft_wrap=True)
    if result["train_command"]:
        console.print(result["train_command"], soft_wrap=True, markup=False, highlight=False)
    console.print(f"throughput: {result['throughput']['source']}; rule: {result['rule']}",
                  soft_wrap=True, markup=False, highlight=False, style="dim")


# ---- generation and evaluation ---------------------------------------------------------------
@app.command()
@options_from(SampleConfig)
def sample(
    captions: list[str] = typer.Argument(None, help="One or more captions."),
    captions_file: Path | None = typer.Option(None, help="One caption per line."),
    **options,
) -> None:
    """Generate images for captions: OUT/<caption-slug>/0000.png ..., grid.png, metadata.json.

    Example: kodalle sample "하의에서 색상은 블루이다. 카테고리는 스커트이다." -n 16 --seed 0

    Example: kodalle sample --attr 상의.색상=레드 --attr 상의.카테고리=티셔츠 -n 16

    Example: kodalle sample "상의에서 색상은 레드이다." --init-image a.jpg --init-rows 8

    Example: kodalle sample "상의에서 색상은 레드이다." -n 16 --rank perplexity --keep 4
    """
    from kodalle_cli.sample import read_captions
    from kodalle_cli.sample import sample as run_sample

    prompted = bool(options.get("attr")) or options.get("init_image") is not None
    config = SampleConfig(captions=read_captions(captions, captions_file,
                                                 allow_empty=prompted), **options)
    from kodalle_cli.output import printable

    for result in run_sample(config):
        console.print(f"{result.directory}  {len(result.images)} images  "
                      f"{printable(result.caption)}", markup=False, highlight=False)


@app.command()
def attributes(
    run: Path | None = typer.Option(
        None, help="Run or checkpoint directory (default: the newest run under runs/)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the parts, attribute names and values of a run's training captions, with counts
    (what `kodalle sample --attr PART.NAME=VALUE` accepts; K-Fashion shards only).

    Example: kodalle attributes --run runs/klue-roberta-large
    """
    from kodalle_cli.attributes import attribute_rows, run_attributes

    record = run_attributes(run)
    if as_json:
        print(json.dumps(record, ensure_ascii=False, indent=2))
        return
    from rich.table import Column

    table = Table(Column("part", no_wrap=True), Column("attribute", no_wrap=True),
                  Column("values (count in the training captions)", overflow="fold"),
                  title=f"{record['run']}: {record['samples']} training captions, "
                  f"style {record['style']}")
    for part, name, values in attribute_rows(record):
        table.add_row(part, name, values)
    console.print(table)


@app.command()
def rerank(
    images: list[Path] = typer.Argument(..., help="Images to rank."),
    caption: str = typer.Option(..., help="The caption to rank against."),
    reranker: Path = typer.Option(Path("runs/reranker"), help="Reranker run directory."),
    top: int | None = typer.Option(None, min=1, help="Show only the best N."),
    device: str = typer.Option("auto", help="auto|cpu|cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Rank images by their similarity to a caption.

    Example: kodalle rerank samples/*/*.png --caption "상의에서 색상은 레드이다." --top 4
    """
    from kodalle_cli.rerank.rank import rank_files

    rows = rank_files(images, caption, reranker, top=top, device=device)
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    from rich.text import Text

    from kodalle_cli.output import printable

    # user text is shown as text: never read as rich markup, escape sequences made visible
    table = Table("rank", "score", "image", title=Text(printable(caption, None)))
    for r in rows:
        table.add_row(str(r["rank"]), f"{r['score']:.4f}", Text(printable(r["image"], None)))
    console.print(table)


@app.command()
@options_from(ScoreConfig)
def score(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    **options,
) -> None:
    """FID, KID, IS, CLIP-score and R-precision of generated images, and memorisation:
    each image's nearest training image and the share of near-copies (closest_pairs.png).

    Example: kodalle score --checkpoint runs/klue-roberta-large --reranker runs/reranker

    Example: kodalle score --checkpoint runs/klue-roberta-large --no-fidelity (memorisation
    by VQGAN codes)
    """
    from kodalle_cli.score import run_score, score_table

    result = run_score(ScoreConfig(progress=not as_json, **options))
    if as_json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    console.print(score_table(result))
    console.print(f"written to {Path(result['out']) / 'score.json'}")


@app.command()
@options_from(ServeConfig)
def serve(**options) -> None:
    """Serve a local page to try a model: type a caption, watch the images arrive.

    Example: kodalle serve --checkpoint demo/runs/dalle  (then open http://127.0.0.1:8000)
    """
    try:
        from kodalle_cli.serve import serve as run_serve
    except ImportError as exc:
        raise KodalleError(f"kodalle serve needs starlette and uvicorn ({exc}): "
                           "pip install starlette uvicorn") from exc
    run_serve(ServeConfig(**options))


# ---- plugins and demo ------------------------------------------------------------------------
@app.command()
def backbones(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List every registered backbone (sizes from locally available configs).

    Example: kodalle backbones --json
    """
    from kodalle_cli.backbone import registered_backbones

    rows = [b.describe() for b in registered_backbones().values()]
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    from rich.table import Column

    # names are what users type after --backbone, and headers and numbers are short: never
    # cut those; the language, source and plugin columns fold
    whole = [Column("name", no_wrap=True), Column("language", overflow="fold", min_width=8)]
    numbers = [Column(h, no_wrap=True, justify="right") for h in ("vocab", "dim", "positions")]
    table = Table(*whole, Column("source", overflow="fold"), *numbers,
                  Column("plugin", overflow="fold"))
    for r in rows:
        positions = r["positions"]
        shown = "?" if positions is None else ("none" if positions == 0 else str(positions))
        table.add_row(
            r["name"], r["language"], r["source"],
            *("?" if r[k] is None else str(r[k]) for k in ("vocab", "dim")),
            shown, r["plugin"],
        )
    console.print(table)


@app.command()
def demo(
    out: Path | None = typer.Option(None, help="Output directory (default: demo, or "
                             "demo-EXPERIMENT with --experiment)."),
    quick: bool = typer.Option(False, "--quick", help="A ~2 minute version (used by the tests)."),
    experiment: str | None = typer.Option(
        None, help="Run an experiment instead of the demo: unseen-words (captions with "
        "words never seen in training, pretrained vs random text tables)."),
    language: str = typer.Option(
        "en", help="unseen-words: en (MiniLM, English captions) or ko (multilingual-e5-small, "
        "K-Fashion label captions, tested on typed Korean and English)."),
) -> None:
    """Run the whole pipeline on built-in synthetic K-Fashion data and write a report.

    Example: kodalle demo --out demo; kodalle demo --experiment unseen-words --language ko
    """
    if experiment is not None:
        if experiment != "unseen-words":
            raise UsageError(f"unknown --experiment {experiment!r} (choose unseen-words)")
        if language not in ("en", "ko"):
            raise UsageError(f"--language {language}: choose en or ko")
        from kodalle_cli.experiments.unseen_words import ENGLISH, UnseenConfig, run_unseen_words
        from kodalle_cli.experiments.unseen_words_ko import KOREAN

        default = "demo-unseen-words" + ("-ko" if language == "ko" else "")
        run_unseen_words(UnseenConfig(out=out or Path(default), quick=quick,
                                      study=KOREAN if language == "ko" else ENGLISH))
        return
    from kodalle_cli.experiments.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=out or Path("demo"), quick=quick))


# ---- entry point -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app, turning errors into one red line."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("KODALLE_DEBUG") == "1"
    if not debug:  # --debug shows everything, other libraries' bars included
        quiet_libraries()
    try:
        app(args=args, prog_name="kodalle", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("Aborted.", style="red")
        sys.exit(130)
    except click_exceptions.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click_exceptions.ClickException as exc:  # usage errors: bad option, missing argument
        if debug:
            raise
        hint = f" (try `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) else ""
        err_console.print(
            f"Error: {exc.format_message()}{hint}", style="red", markup=False, highlight=False,
            soft_wrap=True,
        )
        sys.exit(exc.exit_code)
    except ConfigError as exc:  # a setting the model or a library refused: word the flag
        if debug:
            raise
        err_console.print(f"Error: {exc.as_flag()}", style="red", markup=False, highlight=False,
                          soft_wrap=True)
        sys.exit(exc.exit_code)
    except KodalleError as exc:
        if debug:
            raise
        prefix = "" if exc.exit_code == 130 else "Error: "  # Ctrl-C: what was saved, not a fault
        err_console.print(f"{prefix}{exc}", style="red", markup=False, highlight=False,
                          soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("Interrupted.", style="red")
        sys.exit(130)
