"""Run files are UTF-8 whatever the locale: a run with Korean captions saved and opened by a
Python whose preferred encoding is not UTF-8 reads back whole (it used to be "damaged")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CAPTIONS = ["빨간 원피스", "파란 셔츠와 검은 바지"]

SCRIPT = textwrap.dedent("""
    import json, locale, sys
    from pathlib import Path

    from kodalle_cli.backbone import get_backbone
    from kodalle_cli.model.dalle import DALLE, DALLEConfig
    from kodalle_cli.runs import load_run, read_config, save_run

    backbone_dir, run_dir = sys.argv[1], Path(sys.argv[2])
    captions = json.loads(Path(sys.argv[3]).read_text(encoding="utf-8"))
    tok = get_backbone(backbone_dir).load_tokenizer()
    model = DALLE(DALLEConfig(num_text_tokens=len(tok), num_image_tokens=8, image_fmap_size=2,
                              dim=16, depth=1, heads=2, dim_head=8, text_seq_len=12,
                              pad_id=tok.pad_token_id, bos_id=0))
    record = {"style": "attributes", "values": {"상의.색상": {"레드": 3, "블루": 1}}}
    save_run(run_dir, model, tok, step=1, captions=captions,
             config={"captions": record, "data": {"note": "케이패션 데이터"}})
    run = load_run(run_dir, with_vqgan=False)
    print(json.dumps({
        "encoding": locale.getpreferredencoding(False),
        "config": read_config(run_dir),
        "ids": [run.caption_encoder.encode(c).ids for c in captions],
    }))
""")


def test_a_run_with_korean_captions_under_a_non_utf8_locale(tiny_klue, tmp_path):
    from kodalle_cli.backbone import get_backbone
    from kodalle_cli.text import CaptionEncoder

    run = tmp_path / "run"  # (argv itself is ASCII-escaped under this locale)
    script, captions = tmp_path / "script.py", tmp_path / "captions.json"
    script.write_text(SCRIPT, encoding="utf-8")  # source files are UTF-8 whatever the locale
    captions.write_text(json.dumps(CAPTIONS, ensure_ascii=False), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    # the C locale without PEP 538/540's UTF-8 rescue: the preferred encoding is ASCII
    env.update({"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"})
    done = subprocess.run([sys.executable, str(script), str(tiny_klue), str(run), str(captions)],
                          env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["encoding"].replace("-", "").lower() != "utf8"
    assert result["config"]["captions"]["values"] == {"상의.색상": {"레드": 3, "블루": 1}}
    assert result["config"]["data"] == {"note": "케이패션 데이터"}
    # the files on disk are UTF-8, Korean kept as it is
    assert "레드" in (run / "config.json").read_text(encoding="utf-8")
    # the run's caption encoder gives the ids the backbone's own tokenizer gives here
    encoder = CaptionEncoder.for_backbone(get_backbone(str(tiny_klue)), 12)
    assert result["ids"] == [encoder.encode(c).ids for c in CAPTIONS]
