"""Shards by URL (issue 28 item 1): token and image shards read over HTTP from a real server
on 127.0.0.1 (Python's http.server serving a folder), through ``pipe:cat`` and from brace
patterns read as the same folder does; a connection closed mid-shard is read on where it
broke, or, when it keeps breaking, skipped with a warning naming the URL and counted."""

from __future__ import annotations

import functools
import http.server
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from kodalle_cli.configs import DalleTrainConfig
from kodalle_cli.data import tokens as token_shards
from kodalle_cli.data import urls
from kodalle_cli.data.shards import ShardWriter, iter_image_samples, shard_paths
from kodalle_cli.errors import KodalleError, UsageError

TINY = dict(dim=32, depth=2, heads=2, dim_head=16, device="cpu", progress=False, lr=1e-3,
            warmup_steps=2, batch_size=4, max_steps=6, save_every=3, eval_every=3,
            sample_every=0, cond_drop=0.3, keep_last=0, workers=2, log_every=1)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """A folder over HTTP; ``server.broken`` maps a path to how many more GETs of it are cut
    after half their body (-1: every one); ``server.gets`` counts GETs by path. Python's
    handler ignores ``Range`` (a 200 with the whole body); with ``server.ranges`` a
    ``Range: bytes=N-`` GET gets a 206 with the body from N (``server.range_starts``)."""

    def log_message(self, *args):  # quiet
        pass

    def send_head(self):
        header = self.headers.get("Range")
        if not (self.server.ranges and header):
            return super().send_head()
        start = int(header.removeprefix("bytes=").split("-")[0])
        with open(self.translate_path(self.path), "rb") as f:
            data = f.read()
        self.server.range_starts.append(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        return io.BytesIO(data[start:])

    def copyfile(self, source, outputfile):
        gets = self.server.gets
        gets[self.path] = gets.get(self.path, 0) + 1
        left = self.server.broken.get(self.path, 0)
        if left == 0:
            return super().copyfile(source, outputfile)
        self.server.broken[self.path] = left - 1 if left > 0 else -1
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        self.close_connection = True  # the body stops short of its Content-Length


@pytest.fixture
def serve():
    """serve(folder, ranges=False) -> (base URL, server): a real HTTP server on 127.0.0.1."""
    servers = []

    def start(folder, ranges=False):
        handler = functools.partial(_Handler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.broken, server.gets, server.ranges, server.range_starts = {}, {}, ranges, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(urls, "RETRY_DELAY", 0.01)
    monkeypatch.setattr(urls, "STATS", urls.StreamStats())


def keys_and_ids(samples):
    return [(s["key"], s["ids"].tolist(), s["codes"].tolist()) for s in samples]


# ---- locations ---------------------------------------------------------------------------------
def test_a_location_names_its_manifest_and_shards_in_the_same_place(tmp_path):
    pattern = "https://host/data/train-{000000..000002}.tar"
    assert urls.expand(pattern)[1] == "https://host/data/train-000001.tar"
    assert urls.join(pattern, "manifest.json") == "https://host/data/manifest.json"
    assert urls.join("https://host/data/", "val-000000.tar") == "https://host/data/val-000000.tar"
    assert urls.join("https://host/data", "manifest.json") == "https://host/data/manifest.json"
    assert urls.selected(pattern) == {f"train-00000{i}.tar" for i in range(3)}
    assert urls.selected("https://host/data/") is None
    s3 = "pipe:aws s3 cp s3://bucket/tok/train-000000.tar -"
    assert urls.join(s3, "manifest.json") == "pipe:aws s3 cp s3://bucket/tok/manifest.json -"
    assert urls.name(s3) == "train-000000.tar" and urls.selected(s3) == {"train-000000.tar"}
    assert urls.join(tmp_path, "manifest.json") == tmp_path / "manifest.json"
    assert urls.join(f"{tmp_path}/train-{{0..1}}.tar", "m.json") == tmp_path / "m.json"
    with pytest.raises(UsageError, match="--manifest"):
        urls.join("pipe:cat everything", "manifest.json")
    with pytest.raises(UsageError, match="pipe:aws s3 cp s3://b/x.tar -"):
        urls.place("s3://b/x.tar")


# ---- token shards ------------------------------------------------------------------------------
def test_token_shards_over_http_pipe_and_patterns_read_as_the_local_folder(tiny_dalle_data,
                                                                           serve):
    _, tokens, _ = tiny_dalle_data
    base, _ = serve(tokens.parent)
    local = keys_and_ids(token_shards.iter_split(tokens, "train"))
    assert len(local) == 48
    for where in (f"{base}/tokens/", f"{base}/tokens",
                  f"{base}/tokens/train-{{000000..000001}}.tar",
                  f"pipe:cat {tokens}/train-{{000000..000001}}.tar",
                  f"{tokens}/train-{{000000..000001}}.tar"):
        assert keys_and_ids(token_shards.iter_split(where, "train")) == local, where
    # a pattern keeps the shards it names; the manifest's others are not read
    one = token_shards.read_manifest(f"{base}/tokens/train-000001.tar")
    assert [e["name"] for e in one["splits"]["train"]["shards"]] == ["train-000001.tar"]
    assert one["splits"]["val"]["shards"] == []

    # rank and worker splitting and the position are the local folder's
    def batches(root, rank, start):
        data = token_shards.TokenBatches(root, batch_size=4, seed=3, rank=rank, world_size=2,
                                         start_batch=start)
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
        out = []
        for i, b in enumerate(loader):
            out.append(torch.cat([b["ids"], b["codes"]], 1))
            if i == 6:
                return torch.stack(out)

    for rank, start in ((0, 0), (1, 5)):
        assert batches(f"{base}/tokens/", rank, start).equal(batches(tokens, rank, start))


def test_a_manifest_given_apart(tiny_dalle_data, serve, tmp_path):
    _, tokens, _ = tiny_dalle_data
    base, _ = serve(tokens.parent)
    moved = tmp_path / "elsewhere.json"
    moved.write_bytes((tokens / "manifest.json").read_bytes())
    where = urls.place(f"pipe:cat {tokens}/train-000000.tar", moved)
    assert [s["key"] for s in token_shards.iter_split(where, "train")] == [
        f"s{i:05d}" for i in range(24)]
    with pytest.raises(KodalleError, match="HTTP 404"):
        token_shards.read_manifest(urls.place(f"{base}/tokens/", f"{base}/nothing.json"))
    with pytest.raises(KodalleError, match="no manifest.json"):
        token_shards.read_manifest(urls.place(tokens, tmp_path / "nothing.json"))


def test_unreachable_shards_are_one_line(tiny_dalle_data, serve):
    _, tokens, _ = tiny_dalle_data
    base, server = serve(tokens.parent)
    server.shutdown()
    server.server_close()
    with pytest.raises(KodalleError) as err:
        token_shards.read_manifest(f"{base}/tokens/")
    assert "\n" not in str(err.value) and base in str(err.value)
    assert "--manifest" in str(err.value)


@pytest.mark.parametrize("ranges", [False, True], ids=["server-ignores-range", "range-206"])
def test_a_connection_closed_mid_shard_is_read_on_where_it_broke(tiny_dalle_data, serve,
                                                                 ranges):
    _, tokens, _ = tiny_dalle_data
    base, server = serve(tokens.parent, ranges=ranges)
    server.broken["/tokens/train-000001.tar"] = 2  # two cut GETs, then whole ones
    got = keys_and_ids(token_shards.iter_split(f"{base}/tokens/", "train"))
    assert got == keys_and_ids(token_shards.iter_split(tokens, "train"))
    assert urls.STATS.retries == 2 and urls.STATS.lost == []
    assert server.gets["/tokens/train-000001.tar"] == 3
    if ranges:  # each reopening asked for the rest only, from where the last one broke
        size = (tokens / "train-000001.tar").stat().st_size
        assert server.range_starts == [size // 2, size // 2 + (size - size // 2) // 2]


def test_a_shard_whose_stream_keeps_breaking_is_skipped_warned_and_counted(tiny_dalle_data,
                                                                          serve):
    _, tokens, _ = tiny_dalle_data
    base, server = serve(tokens.parent)
    url = f"{base}/tokens/train-000001.tar"
    server.broken["/tokens/train-000001.tar"] = -1
    said = []
    checks = token_shards.check_shards(f"{base}/tokens/", report=said.append,
                                       max_bad_fraction=0.0)  # lost is not bad: no stop
    train = checks["train"]
    assert train.lost == [url] and train.counts == {"train-000000.tar": 24,
                                                    "train-000001.tar": 0}
    assert train.metrics("train")["train_shards_lost"] == 1 and train.bad == []
    assert any(url in line and "skipped" in line for line in said)
    assert server.gets["/tokens/train-000001.tar"] == 1 + urls.RETRIES
    # the reader goes on with the shards that read
    data = token_shards.TokenBatches(f"{base}/tokens/", batch_size=4, counts=train.counts)
    assert [s.path for s in data.shards] == [f"{base}/tokens/train-000000.tar"]


def test_the_shard_check_cache_keys_urls_by_their_headers(tiny_dalle_data, serve, tmp_path):
    import os

    _, tokens, _ = tiny_dalle_data
    base, server = serve(tokens.parent)
    cache = tmp_path / token_shards.CHECK_CACHE

    def check(where):
        return token_shards.check_shards(where, mode="new", cache=cache,
                                         report=lambda m: None)["train"]

    cold = check(f"{base}/tokens/")
    assert (cold.read, cold.reused) == (2, 0)
    entry = json.loads(cache.read_text(encoding="utf-8"))["shards"][
        f"{base}/tokens/train-000000.tar"]
    assert entry["size"] == (tokens / "train-000000.tar").stat().st_size
    assert entry["last_modified"]
    server.gets.clear()
    warm = check(f"{base}/tokens/")
    assert (warm.read, warm.reused) == (0, 2) and warm.counts == cold.counts
    assert not any(k.endswith(".tar") for k in server.gets)  # HEAD requests only
    # a changed Last-Modified: read again
    shard = tokens / "train-000001.tar"
    stat = shard.stat()
    try:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
        assert check(f"{base}/tokens/").read == 1
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # pipe: has no stamp: always read
    pipe = f"pipe:cat {tokens}/train-{{000000..000001}}.tar"
    assert check(pipe).read == 2 and check(pipe).read == 2


# ---- training ----------------------------------------------------------------------------------
def _losses(run):
    from conftest import train_losses

    return train_losses(run)


def _weights(run):
    from safetensors.torch import load_file

    from kodalle_cli import runs

    return load_file(runs.latest_checkpoint(run) / "model.safetensors")


@pytest.mark.slow
def test_train_from_http_is_train_from_the_folder_and_resumes_exactly(tiny_dalle_data, serve,
                                                                      tmp_path, one_thread):
    from kodalle_cli.train.dalle import run_train

    backbone, tokens, _ = tiny_dalle_data
    base, server = serve(tokens.parent)
    url = f"{base}/tokens/"

    def train(data, out, **kw):
        return run_train(DalleTrainConfig(backbone=str(backbone), data=data,
                                          out=tmp_path / out, **{**TINY, **kw}))

    train(tokens, "local")
    train(url, "http")
    assert _losses(tmp_path / "http") == _losses(tmp_path / "local")
    # stopped at step 3 and resumed over HTTP: the same weights, bitwise
    train(url, "resumed", max_steps=3)
    train(url, "resumed")
    want, got = _weights(tmp_path / "http"), _weights(tmp_path / "resumed")
    assert all(got[k].equal(want[k]) for k in want)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "http")

    # a shard that never reads whole: the run goes on, and metrics.csv counts it
    server.broken["/tokens/train-000001.tar"] = -1
    train(url, "lossy", max_steps=2)
    from kodalle_cli.train.metrics import read_metrics

    data = {r["metric"]: r["value"] for r in read_metrics(tmp_path / "lossy" / "metrics.csv")
            if r["split"] == "data"}
    assert data["train_shards_lost"] == 1 and data["val_shards_lost"] == 0

    # --check-shards off: the data-loader worker meets the broken shard while training, and
    # metrics.csv counts it too (the worker sends its counts with each batch)
    train(url, "lossy-in-worker", max_steps=2, check_shards="off", workers=1)
    lost = [r["value"] for r in read_metrics(tmp_path / "lossy-in-worker" / "metrics.csv")
            if r["split"] == "train" and r["metric"] == "shards_lost"]
    assert lost and lost[-1] == 1


# ---- image shards ------------------------------------------------------------------------------
def _jpeg(colour):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def image_shards(tmp_path):
    """Two train shards and a val shard, with a manifest as `kodalle prepare` writes it."""
    out = tmp_path / "shards"
    out.mkdir()
    listed = []
    for name, split, n in (("train-000000.tar", "train", 3), ("train-000001.tar", "train", 2),
                           ("val-000000.tar", "val", 2)):
        writer = ShardWriter(out / name)
        for i in range(n):
            writer.write(f"{name[:-4]}-{i}", _jpeg((40 * i, 0, 200)), f"캡션 {name} {i}",
                         {"i": i})
        writer.commit({"samples": n})
        listed.append({"name": name, "split": split, "samples": n})
    (out / "manifest.json").write_text(json.dumps({"shards": listed}), encoding="utf-8")
    return out


def _read(source, split="train"):
    return [(s.key, s.caption, np.asarray(s.image).tolist())
            for s in iter_image_samples(source, split, split_by_worker=False)]


def test_image_shards_over_http_pipe_and_patterns(image_shards, serve):
    base, server = serve(image_shards.parent)
    local = _read(image_shards)
    assert len(local) == 5
    assert _read(f"{base}/shards/") == local  # a folder URL: its manifest lists the shards
    assert _read(f"{base}/shards/train-{{000000..000001}}.tar") == local
    assert _read(f"pipe:cat {image_shards}/train-{{000000..000001}}.tar") == local
    assert _read(f"{base}/shards/", "val") == _read(image_shards, "val")
    assert shard_paths(f"{base}/shards/", "val") == [f"{base}/shards/val-000000.tar"]
    # the manifest given apart lists the shards of a folder URL
    assert _read(urls.place(f"{base}/shards/", image_shards / "manifest.json")) == local

    # cut once: read on where it broke; cut every time: skipped, warned, counted
    server.broken["/shards/train-000000.tar"] = 1
    assert _read(f"{base}/shards/") == local and urls.STATS.retries == 1
    server.broken["/shards/train-000000.tar"] = -1
    got = _read(f"{base}/shards/")
    assert got[-2:] == local[-2:]  # train-000001 is whole
    assert urls.STATS.lost and f"{base}/shards/train-000000.tar" in urls.STATS.lost[0]
    # training reads on forever: a lost shard is not tried again, and none left is an error
    with pytest.raises(KodalleError, match="every shard"):
        list(iter_image_samples(f"{base}/shards/train-000000.tar", None, repeat=True,
                                split_by_worker=False))


def test_a_pipe_command_that_fails_is_retried_then_skipped(image_shards):
    got = _read([f"pipe:cat {image_shards}/nothing.tar",
                 f"pipe:cat {image_shards}/train-000001.tar"])
    assert [k for k, _, _ in got] == ["train-000001-0", "train-000001-1"]
    assert urls.STATS.retries == urls.RETRIES
    assert "exit status 1" in urls.STATS.lost[0] and "nothing.tar" in urls.STATS.lost[0]


def test_tokenize_reads_remote_image_shards_and_writes_a_local_folder(image_shards, serve,
                                                                     tiny_dalle_data, tmp_path):
    from kodalle_cli.configs import TokenizeConfig
    from kodalle_cli.tokenize_shards import tokenize

    backbone, _, vqgan = tiny_dalle_data
    base, server = serve(image_shards.parent)

    def run(shards, out, **kw):
        return tokenize(TokenizeConfig(vqgan=str(vqgan), backbone=str(backbone), shards=shards,
                                       out=out, device="cpu", progress=False, **kw))

    def read(out):
        manifest = token_shards.read_manifest(out)
        return {split: [(s["key"], s["ids"].tolist(), s["codes"].tolist())
                        for e in info["shards"]
                        for s in token_shards.read_shard(out / e["name"])]
                for split, info in manifest["splits"].items()}

    run(str(image_shards), tmp_path / "local")
    want = read(tmp_path / "local")
    assert [len(want[s]) for s in ("train", "val")] == [5, 2]
    run(f"{base}/shards/", tmp_path / "http")
    assert read(tmp_path / "http") == want
    pattern = f"pipe:cat {image_shards}/{{train-000000,train-000001,val-000000}}.tar"
    run(pattern, tmp_path / "pipe")
    assert read(tmp_path / "pipe") == want
    with pytest.raises(UsageError, match="--out"):
        run(f"{base}/shards/", None)
    with pytest.raises(UsageError, match="local folder only"):
        run(f"{base}/shards/", f"{base}/tokens/")

    # a shard whose stream keeps breaking is not written (nor listed); a re-run fetches it
    server.broken["/shards/train-000001.tar"] = -1
    summary = run(f"{base}/shards/", tmp_path / "lossy")
    assert summary.lost == [f"{base}/shards/train-000001.tar"]
    assert not (tmp_path / "lossy" / "train-000001.tar").exists()
    assert [k for k, _, _ in read(tmp_path / "lossy")["train"]] == [
        k for k, _, _ in want["train"][:3]]
    server.broken.clear()
    again = run(f"{base}/shards/", tmp_path / "lossy")
    assert again.lost == [] and again.shards_written == 1
    assert read(tmp_path / "lossy") == want


@pytest.mark.slow
def test_train_vqgan_over_http_is_train_vqgan_on_the_folder(image_shards, serve, tmp_path,
                                                            one_thread):
    import warnings

    from kodalle_cli.configs import VQGANTrainConfig
    from kodalle_cli.train.metrics import read_metrics
    from kodalle_cli.vqgan.train import train_vqgan

    base, server = serve(image_shards.parent)

    def run(data, out, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no perceptual loss: warned, wanted here
            train_vqgan(VQGANTrainConfig(
                data=data, out=tmp_path / out, ch=32, ch_mult=(1, 2), n_embed=32, embed_dim=8,
                resolution=8, num_res_blocks=1, lr=1e-3, batch_size=2, max_steps=3,
                log_every=1, save_every=3, progress=False, device="cpu", **kw))
        return {(r["step"], r["metric"]): r["value"]
                for r in read_metrics(tmp_path / out / "metrics.csv") if r["split"] == "train"}

    local = run(str(image_shards), "local")
    remote = run(f"{base}/shards/", "http")
    assert {k: v for k, v in remote.items() if k[1] == "loss"} == {
        k: v for k, v in local.items() if k[1] == "loss"}
    assert remote[(3, "shards_lost")] == 0
    server.broken["/shards/train-000000.tar"] = -1
    lossy = run(f"{base}/shards/", "lossy")
    assert lossy[(3, "shards_lost")] == 1 and lossy[(3, "stream_retries")] == urls.RETRIES  # once


def test_bad_samples_over_http_and_pipe_are_the_folders(tiny_dalle_data, serve, tmp_path):
    from conftest import write_tiny_tokens
    from test_robustness_train import npy, rewrite_tar

    backbone, _, vqgan = tiny_dalle_data
    tokens = write_tiny_tokens(tmp_path / "tokens", backbone, vqgan)
    rewrite_tar(tokens / "train-000000.tar", lambda name, data: npy(
        np.full(16, 64, dtype=np.int16)) if name == "s00003.codes.npy" else data)
    second = tokens / "train-000001.tar"
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2 + 700])  # cut
    base, _ = serve(tmp_path)

    def check(where):
        found = token_shards.check_shards(where, report=lambda m: None,
                                          max_bad_fraction=0.9)["train"]
        return found.counts, [(b.shard, b.key, b.reason) for b in found.bad], found.lost

    local = check(tokens)
    assert local[1] and local[1][0][1] == "s00003" and local[2] == []
    assert check(f"{base}/tokens/") == local
    assert check(f"pipe:cat {tokens}/train-{{000000..000001}}.tar") == local


def test_the_cli_says_in_one_line_that_a_url_does_not_answer(tmp_path, tiny_klue):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kodalle_cli", "train", "--backbone", str(tiny_klue), "--data",
         "http://127.0.0.1:9/tokens/", "--out", str(tmp_path / "run"), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1, lines
    assert "http://127.0.0.1:9/tokens/manifest.json" in lines[0] and "--manifest" in lines[0]
    help_text = subprocess.run([sys.executable, "-m", "kodalle_cli", "tokenize", "--help"],
                               capture_output=True, text=True, env=env, timeout=300).stdout
    assert "local folder only" in " ".join(help_text.split())


def test_a_shard_lost_while_training_is_skipped_and_the_stream_goes_on(tiny_dalle_data, serve,
                                                                      capsys):
    _, tokens, _ = tiny_dalle_data
    base, server = serve(tokens.parent)
    # --check-shards off: nothing read before training, so the reader meets the cut shard
    counts = token_shards.check_shards(f"{base}/tokens/", mode="off")["train"].counts
    server.broken["/tokens/train-000000.tar"] = -1
    data = token_shards.TokenBatches(f"{base}/tokens/", batch_size=4, shuffle=False,
                                     counts=counts)
    batches = iter(data)
    keys = {tuple(next(batches)["ids"][0].tolist()) for _ in range(6)}  # one epoch of 24
    local = {tuple(s["ids"].tolist()) for s in token_shards.iter_split(tokens, "train")
             if int(s["key"][1:]) >= 24}
    assert keys <= local  # only train-000001's samples
    assert len(urls.STATS.lost) == 1
    assert urls.STATS.lost[0].startswith(f"{base}/tokens/train-000000.tar: ")
    assert f"{base}/tokens/train-000000.tar" in capsys.readouterr().err


def test_a_stream_whose_every_shard_is_lost_stops_in_one_line(tiny_dalle_data, serve):
    _, tokens, _ = tiny_dalle_data
    base, server = serve(tokens.parent)
    counts = token_shards.check_shards(f"{base}/tokens/", mode="off")["train"].counts
    for name in counts:
        server.broken[f"/tokens/{name}"] = -1
    data = token_shards.TokenBatches(f"{base}/tokens/", batch_size=4, counts=counts)
    with pytest.raises(KodalleError, match="every train shard .* broke off .*nothing left"):
        next(iter(data))  # not an endless loop over lost shards
