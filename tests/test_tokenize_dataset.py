"""recipes/tokenize_dataset.py: image folder + captions in, pre-tokenised data out, 1 and 2 processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from digits import load_digits_dataset, save_splits  # examples/digits/digits.py, on pytest's pythonpath

from unimodal.data import PROCESSOR_SUBFOLDER, load_pretokenized, read_metadata
from unimodal.processor import UnimodalProcessor

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tokenize_dataset.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pipeline_factory):
    """An image folder of 11 captioned digits (one file corrupt) and a saved processor."""
    tmp = tmp_path_factory.mktemp("tokenize")
    folder = tmp / "images"
    folder.mkdir()
    digits = load_digits_dataset(image_size=16, split="test").select(range(10))
    meta = []
    for i, row in enumerate(digits):
        row["image"].save(folder / f"{i:02d}.png")
        meta.append({"file_name": f"{i:02d}.png", "caption": row["caption"], "label": row["label"]})
    (folder / "05b.png").write_bytes(b"\x89PNG\r\n\x1a\n this file is cut short")
    meta.insert(6, {"file_name": "05b.png", "caption": "broken", "label": 0})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))

    processor = tiny_pipeline_factory(image_size=16, pixel_size=4).processor  # 4x4 = 16 image tokens
    processor.save_pretrained(tmp / "processor")
    config = {"source": str(folder), "processor": str(tmp / "processor"), "tasks": ["t2i", "i2t"],
              "keep_columns": ["label"], "batch_size": 4, "cache_dir": str(tmp / "cache")}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp


def _run_in_process(args):
    # What RECIPE (a two-line wrapper) runs; the two-process test below launches the file itself.
    from unimodal.recipes import tokenize_dataset

    tokenize_dataset.main(args)


def test_one_process_writes_loadable_data(setup, capsys):
    out = setup / "one"
    _run_in_process(["--config", str(setup / "config.yaml"), "--output_dir", str(out)])
    assert "wrote 20 samples from 11 rows" in capsys.readouterr().out
    processor = UnimodalProcessor.from_pretrained(out / PROCESSOR_SUBFOLDER)
    data = load_pretokenized(out, processor)
    stats = read_metadata(out)["stats"]
    assert stats["num_skipped"] == 1 and "row 6:" in stats["skipped"][0]
    assert len(data) == 20 and data["task"] == ["t2i", "i2t"] * 10
    digit = load_digits_dataset(image_size=16, split="test")[1]  # the second image, 01.png
    codes = processor.encode_images(digit["image"])
    assert data[2]["input_ids"] == processor.text_to_image_ids(digit["caption"], codes[0])
    with pytest.raises(FileExistsError, match="--overwrite true"):
        _run_in_process(["--config", str(setup / "config.yaml"), "--output_dir", str(out)])


def test_the_digits_are_ordinary_data_and_a_source_is_required(setup, capsys):
    # No built-in data set: the demo's digits are a save_to_disk folder, read like any user's.
    splits = save_splits(setup / "digits", image_size=8)  # 8 px: the processor resizes to its 16
    out = setup / "from-disk"
    _run_in_process(["--config", str(setup / "config.yaml"), "--source", str(splits["test"]),
                     "--output_dir", str(out)])
    assert "wrote 720 samples from 360 rows" in capsys.readouterr().out
    processor = UnimodalProcessor.from_pretrained(out / PROCESSOR_SUBFOLDER)
    first = load_digits_dataset(image_size=8, split="test")[0]
    codes = processor.encode_images(first["image"])
    assert load_pretokenized(out)[0]["input_ids"] == processor.text_to_image_ids(first["caption"], codes[0])
    with pytest.raises(ValueError, match="set `source`"):
        _run_in_process(["--config", str(setup / "config.yaml"), "--source", "", "--output_dir", str(setup / "x")])


def test_two_processes_merge_to_the_one_process_result(setup):
    if not (setup / "one").exists():
        _run_in_process(["--config", str(setup / "config.yaml"), "--output_dir", str(setup / "one")])
    out = setup / "two"
    with socket.socket() as sock:  # a free port: other tests may launch at the same time
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", port, str(RECIPE),
           "--config", str(setup / "config.yaml"), "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank encoded its own contiguous half of the 11 rows
    assert "process 0/2: rows [0, 6)" in proc.stdout and "process 1/2: rows [6, 11)" in proc.stdout
    one, two = load_pretokenized(setup / "one"), load_pretokenized(out)
    assert two.column_names == one.column_names
    for name in one.column_names:
        assert two[name] == one[name], name
    assert read_metadata(out)["stats"] == read_metadata(setup / "one")["stats"]
    assert not (setup / ".two-shards").exists()
