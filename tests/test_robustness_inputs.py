"""What a user can type at `sample`, `rerank` and `score` (issue 15, item 9): empty, huge,
control-character and mixed-script captions, -n 0, negative seeds, --top-k/--top-p out of
range, --cond-scale without --cond-drop, files that are not images, too few images for FID.
Each is checked through the command line: exit status, and the one line the user reads."""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_shard
from PIL import Image
from test_bad_checkpoints import CAPTION, cli, one_error_line, write_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny_klue, tmp_path_factory):
    """A run trained without --cond-drop (its config.json says cond_drop 0.0)."""
    return write_run(tmp_path_factory.mktemp("inputs") / "run", tiny_klue)


def sample(capsys, run, out, *args):
    return cli(capsys, "sample", *args, "--checkpoint", run, "-n", "1", "--device", "cpu",
               "--out", out)


def folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir()) if out.exists() else []


def warnings_in(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("Warning: ")]


# ---- captions --------------------------------------------------------------------------------
@pytest.mark.parametrize("caption", ["", "   ", "\t\n"])
def test_an_empty_caption_is_a_usage_error(run, tmp_path, capsys, caption):
    code, _, err = sample(capsys, run, tmp_path / "out", caption)
    assert code == 2
    assert one_error_line(err) == "Error: the caption is empty: give the text to draw"
    code, _, err = sample(capsys, run, tmp_path / "out", CAPTION, caption)
    assert code == 2
    assert one_error_line(err) == "Error: caption 2 is empty: give the text to draw"
    assert not (tmp_path / "out").exists()


def test_a_captions_file_without_captions_is_a_usage_error(run, tmp_path, capsys):
    (tmp_path / "caps.txt").write_text("\n   \n\n", encoding="utf-8")
    code, _, err = cli(capsys, "sample", "--captions-file", tmp_path / "caps.txt",
                       "--checkpoint", run, "--device", "cpu", "--out", tmp_path / "out")
    assert code == 2
    assert "give at least one caption" in one_error_line(err)


def test_a_10000_character_caption_is_cut_with_a_warning_and_a_short_folder(
        run, tmp_path, capsys):
    caption = ("하의에서 색상은 블루이다. 카테고리는 스커트이다. " * 400)[:10_000]
    assert len(caption) == 10_000
    code, out, err = sample(capsys, run, tmp_path / "out", caption, "--seed", "1")
    assert code == 0, err
    (warning,) = warnings_in(err)
    assert "longer than text_seq_len 12" in warning and "are dropped" in warning
    assert len(warning) < 300  # the caption is quoted short, not 10,000 characters
    assert "indexing errors" not in err  # transformers' own (misleading) length warning
    (folder,) = folders(tmp_path / "out")
    assert len(folder.name) <= 60 and len(folder.name.encode()) <= 200
    assert folder.name.startswith("하의에서-색상은-블루이다")
    meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    assert meta["caption"] == caption  # kept whole
    assert meta["truncated_tokens"] > 0 and len(meta["token_ids"]) == 12
    assert caption[:61] not in out  # the summary line shows the caption's start only


def test_control_characters_and_mixed_scripts(run, tmp_path, capsys):
    weird = ("Red\x1b[31m 레드\tкрасный\r\n赤 🔴 \u202eevil\u202c ١٢٣ ../../etc/passwd "
             "e\u0301 \x7f")
    code, out, err = sample(capsys, run, tmp_path / "out", weird, "--seed", "0")
    assert code == 0, err
    assert "\x1b" not in err  # warnings show the caption escaped
    (folder,) = folders(tmp_path / "out")
    assert folder.parent == tmp_path / "out"  # no path traversal
    assert re.fullmatch(r"[\w-]+", folder.name) and not folder.name.startswith("-")
    assert not any(unicodedata.category(c).startswith("C") for c in folder.name)
    assert folder.name.startswith("red-31m-레드-красный-赤")
    meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    assert meta["caption"] == unicodedata.normalize("NFC", weird)  # kept, control chars too


def test_printable_shows_control_characters_escaped_on_one_line():
    from kodalle_cli.output import printable

    assert printable("Red\x1b[31m 레드\r\nкрасный \u202eevil") == (
        "Red\\x1b[31m 레드\\r\\nкрасный \\u202eevil")
    assert printable("가" * 100) == "가" * 60 + "…"


def test_captions_file_with_nul_and_control_only_captions(run, tmp_path, capsys):
    (tmp_path / "caps.txt").write_text(f"a\x00b {CAPTION}\n\x01\x02\x03\n", encoding="utf-8")
    code, _, err = cli(capsys, "sample", "--captions-file", tmp_path / "caps.txt",
                       "--checkpoint", run, "-n", "1", "--device", "cpu",
                       "--out", tmp_path / "out", "--seed", "0")
    assert code == 0, err
    names = [p.name for p in folders(tmp_path / "out")]
    assert names == ["a-b-상의에서-색상은-레드이다", "caption"]
    (warning,) = warnings_in(err)
    # no tokens at all, or only the unknown token, depending on the tokenizer
    assert "gives no tokens" in warning or "unknown to the tokenizer" in warning
    assert "'\\x01\\x02\\x03'" in warning  # the caption shown escaped
    meta = json.loads((tmp_path / "out" / "caption" / "metadata.json").read_text())
    assert meta["caption"] == "\x01\x02\x03"


def test_a_caption_that_is_not_utf8_is_a_usage_error(run, tmp_path, capsys):
    # what Python makes of undecodable bytes in argv (surrogate escapes)
    code, _, err = sample(capsys, run, tmp_path / "out", "caf\udce9")
    assert code == 2
    assert "not text (not UTF-8)" in one_error_line(err)


# ---- -n and seeds ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", ["0", "-3"])
def test_n_below_one_is_a_usage_error(run, tmp_path, capsys, n):
    code, _, err = cli(capsys, "sample", CAPTION, "-n", n, "--checkpoint", run,
                       "--device", "cpu", "--out", tmp_path / "out")
    assert code == 2
    line = one_error_line(err)
    assert n in line and ("-n" in line or "--num-images" in line)
    assert not (tmp_path / "out").exists()


def test_negative_seeds_are_seeds(run, tmp_path, capsys):
    """Any integer is a seed: -3 gives the same images every time, not those of 3."""
    def codes(seed, name):
        code, _, err = sample(capsys, run, tmp_path / name, CAPTION, "--seed", seed)
        assert code == 0, err
        (folder,) = folders(tmp_path / name)
        meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
        assert meta["seed"] == int(seed)
        return np.load(folder / "codes.npy")

    first, again, positive = codes("-3", "a"), codes("-3", "b"), codes("3", "c")
    assert np.array_equal(first, again)
    assert not np.array_equal(first, positive)
    assert codes(str(-(2**70)), "d").shape == first.shape  # huge ones too


# ---- sampling settings -------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, says", [
    ("--top-k", "-1", "--top-k -1.0: give a count (an integer >= 1) or a fraction in [0, 1)"),
    ("--top-k", "2.5", "--top-k 2.5: give a count"),
    ("--top-k", "nan", "--top-k nan: give a count"),
    ("--top-k", "inf", "--top-k inf: give a count"),
    ("--top-p", "0", "--top-p 0.0: must be in (0, 1]"),
    ("--top-p", "1.01", "--top-p 1.01: must be in (0, 1]"),
    ("--top-p", "-0.5", "--top-p -0.5: must be in (0, 1]"),
    ("--temperature", "-1", "--temperature -1.0: must be >= 0"),
    ("--cond-scale", "-2", "--cond-scale -2.0: must be >= 0"),
    ("--batch-size", "0", "--batch-size 0: must be at least 1"),
])
def test_settings_out_of_range_name_the_flag(run, tmp_path, capsys, flag, value, says):
    code, _, err = sample(capsys, run, tmp_path / "out", CAPTION, flag, value)
    assert code == 2
    assert one_error_line(err).startswith(f"Error: {says}")
    assert not (tmp_path / "out").exists()


def test_top_p_one_and_a_count_beyond_the_codebook_run(run, tmp_path, capsys):
    code, _, err = sample(capsys, run, tmp_path / "out", CAPTION, "--top-p", "1",
                          "--top-k", "1000", "--seed", "0")
    assert code == 0, err
    (warning,) = warnings_in(err)
    assert "--top-k 1000 keeps every one of the model's 24 image codes" in warning


def test_sampling_settings_raise_config_errors_for_python_callers():
    from kodalle_cli.errors import ConfigError
    from kodalle_cli.model.sampling import SamplingSettings

    with pytest.raises(ConfigError) as info:
        SamplingSettings(top_p=0).validate()
    assert (info.value.name, info.value.value) == ("top_p", 0)
    assert str(info.value).startswith("top_p=0: must be in (0, 1]")


def test_cond_scale_without_cond_drop_warns(run, tmp_path, capsys):
    code, _, err = sample(capsys, run, tmp_path / "out", CAPTION, "--cond-scale", "3",
                          "--seed", "0")
    assert code == 0, err
    (warning,) = warnings_in(err)
    assert warning.startswith("Warning: --cond-scale 3.0: this model was trained without "
                              "--cond-drop")


def test_cond_scale_with_cond_drop_does_not_warn(run, tmp_path, capsys):
    guided = Path(shutil.copytree(run, tmp_path / "guided"))
    config = json.loads((guided / "config.json").read_text())
    config["train"]["cond_drop"] = 0.1
    (guided / "config.json").write_text(json.dumps(config))
    code, _, err = sample(capsys, guided, tmp_path / "out", CAPTION, "--cond-scale", "3",
                          "--seed", "0")
    assert code == 0, err
    assert warnings_in(err) == []


# ---- rerank ------------------------------------------------------------------------------------
def _png(path: Path, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def test_rerank_skips_files_that_are_not_readable_images(tiny_reranker, tmp_path, capsys):
    good = [_png(tmp_path / "a.png"), _png(tmp_path / "b.jpg", (0, 0, 200))]
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:40])
    folder = tmp_path / "folder"
    folder.mkdir()
    missing = tmp_path / "missing.png"
    code, out, err = cli(capsys, "rerank", good[0], text, broken, folder, missing, good[1],
                         "--caption", CAPTION, "--reranker", tiny_reranker, "--device", "cpu",
                         "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert sorted(r["image"] for r in rows) == sorted(map(str, good))
    assert [r["rank"] for r in rows] == [1, 2]
    skipped = warnings_in(err)
    assert len(skipped) == 4
    for path, reason in ((text, "unreadable image"), (broken, "unreadable image"),
                         (folder, "Is a directory"), (missing, "No such file")):
        (line,) = [s for s in skipped if f"skipped {path}:" in s]
        assert reason in line, line


def test_rerank_with_no_readable_image_is_one_line(tiny_reranker, tmp_path, capsys):
    (tmp_path / "x.txt").write_text("text")
    code, out, err = cli(capsys, "rerank", tmp_path / "x.txt", tmp_path / "gone.png",
                         "--caption", CAPTION, "--reranker", tiny_reranker, "--device", "cpu")
    assert code == 1 and out == ""
    assert len(warnings_in(err)) == 2
    assert [ln for ln in err.splitlines() if ln.startswith("Error: ")] == [
        "Error: none of the 2 file(s) given is a readable image: nothing to rank"]


@pytest.mark.parametrize("caption", ["", "  "])
def test_rerank_with_an_empty_caption_is_a_usage_error(tiny_reranker, tmp_path, capsys, caption):
    code, _, err = cli(capsys, "rerank", _png(tmp_path / "a.png"), "--caption", caption,
                       "--reranker", tiny_reranker, "--device", "cpu")
    assert code == 2
    assert "--caption is empty" in one_error_line(err)


def test_rerank_control_and_long_captions_rank(tiny_reranker, tmp_path, capsys):
    image = _png(tmp_path / "a.png")
    for caption in ("빨강\x1b[31m red \u202e красный", "레드 " * 3000):
        code, out, err = cli(capsys, "rerank", image, "--caption", caption, "--reranker",
                             tiny_reranker, "--device", "cpu", "--json")
        assert code == 0, err
        assert len(json.loads(out)) == 1


# ---- score -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    from kodalle_cli.score import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inc") / "inception.pth")


def _shards(directory: Path, count: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_image_shard(directory / "val-000000.tar", [
        (f"{i:06d}", Image.new("RGB", (16, 16), (10 * i, 50, 90)), CAPTION)
        for i in range(count)], quality=75)
    return directory


def score(capsys, inception, *args):
    return cli(capsys, "score", *args, "--inception-weights", inception, "--device", "cpu",
               "--json")


def test_score_num_samples_below_what_fid_needs(inception, tmp_path, capsys):
    code, _, err = score(capsys, inception, "--images", tmp_path, "--data", tmp_path,
                         "--num-samples", "1")
    assert code == 2
    assert one_error_line(err).startswith(
        "Error: --num-samples 1: FID needs at least 2 images in each set")


def test_score_a_folder_with_too_few_readable_images(inception, tmp_path, capsys):
    shards = _shards(tmp_path / "shards", 4)
    folder = tmp_path / "images"
    folder.mkdir()
    _png(folder / "0.png")
    (folder / "1.png").write_bytes(b"not a png")
    code, _, err = score(capsys, inception, "--images", folder, "--data", shards,
                         "--num-samples", "4")
    assert code == 1
    (skipped,) = [w for w in warnings_in(err) if "skipped" in w]
    assert str(folder / "1.png") in skipped and "unreadable image" in skipped
    errors = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
    assert errors == [f"Error: --images {folder} holds 1 image(s); FID needs at least 2 in "
                      "each set (1000 or more for numbers comparable with published ones)"]


def test_score_with_too_few_reference_samples(run, inception, tmp_path, capsys):
    shards = _shards(tmp_path / "shards", 1)
    code, _, err = score(capsys, inception, "--checkpoint", run, "--data", shards,
                         "--num-samples", "8", "--out", tmp_path / "score")
    assert code == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
    assert errors == [f"Error: the val split of {shards} holds 1 image(s); FID needs at "
                      "least 2 in each set (1000 or more for numbers comparable with "
                      "published ones)"]
    assert "Traceback" not in err


def test_score_with_fewer_images_than_asked_warns_and_scores(inception, tmp_path, capsys):
    shards = _shards(tmp_path / "shards", 3)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"{i}.png", (60 * i, 20, 20))
    code, out, err = score(capsys, inception, "--images", folder, "--data", shards,
                           "--num-samples", "50", "--out", tmp_path / "score")
    assert code == 0, err
    assert json.loads(out)["num_samples"] == 3
    assert any("fewer than --num-samples 50: scoring 3" in w for w in warnings_in(err))


def test_rerank_table_shows_markup_and_escapes_as_text(tiny_reranker, tmp_path, capsys):
    image = _png(tmp_path / "a.png")
    code, out, err = cli(capsys, "rerank", image, "--caption", "[/bold] 레드\x1b[31m",
                         "--reranker", tiny_reranker, "--device", "cpu")
    assert code == 0, err
    assert "[/bold] 레드\\x1b[31m" in out and "\x1b[31m" not in out
