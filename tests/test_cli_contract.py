"""Options and output stay inside their contract, and outputs never destroy anything:
bounded options are usage errors before any work, JSON never carries NaN or infinity, names are
escaped reversibly in text output, stdout on a full disk is one line, output targets are
checked before the work (never a device, a FIFO or one of the inputs), and a malicious
--ckpt_path is refused in one line."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli import main
from captioner.errors import OutputError
from captioner.formats import escape_name, json_line, unescape_name
from captioner.outputs import atomic_write_text, check_output

REPO = Path(__file__).resolve().parents[1]
ERROR = "captioner: error: "


@pytest.fixture()
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), (120, 60, 200)).save(path)
    return path


# ---- option bounds ------------------------------------------------------------------------

@pytest.mark.parametrize("option", [
    ["--max-length", "100000000"], ["--beam-size", "100000"], ["--beam-size", "0"], ["--n-best", "-1"],
    ["--sample", "--temperature", "1e-300"], ["--temperature", "nan"], ["--temperature", "inf"],
    ["--seed", "12345678901234567890123"], ["--seed", "-1"], ["--top-k", "1e9"], ["--length-penalty", "-1000"],
    ["--length-penalty", "nan"], ["--batch-size", "0"], ["--batch-size", "99999999"], ["--beam-size", "３"],
])
def test_out_of_range_options_are_usage_errors_before_loading(option, photo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(photo), "--model", "/nonexistent/model.safetensors", *option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "must be" in err.splitlines()[-1]
    assert "nonexistent" not in err  # refused before the model was looked at


def test_n_best_above_the_models_beam_is_a_usage_error(photo, tiny_model_file, capsys):
    assert main(["caption", str(photo), "--model", str(tiny_model_file), "--n-best", "5"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"{ERROR}n_best 5 needs beam_size >= 5")


# ---- JSON and text output -----------------------------------------------------------------

def test_json_lines_never_carry_nan_or_infinity():
    line = json_line({"image": "x", "log_prob": float("-inf"), "alternatives": [{"score": float("nan")}]})
    assert json.loads(line) == {"image": "x", "log_prob": None, "alternatives": [{"score": None}]}
    assert "Infinity" not in line and "NaN" not in line


def test_extreme_length_penalty_prints_valid_json(photo, tiny_model_file, capsys):
    code = main(["caption", str(photo), "--model", str(tiny_model_file), "--length-penalty=-5", "--beam-size", "3",
                 "--n-best", "3", "--format", "jsonl"])
    assert code == 0
    row = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON number {c}"))
    assert len(row["alternatives"]) == 3


NAMES = ["tab\there.jpg", "esc\x1b[31mred.jpg", "line\u2028sep.jpg", "next\u0085line.jpg", "real\nnewline.jpg",
         "literal\\nbackslash-n.jpg", "back\\slash.jpg", "bell\x07.jpg", "caf\udce9 latin-1.jpg", "zero\u200bwidth.jpg"]


@pytest.mark.parametrize("name", NAMES)
def test_names_are_escaped_reversibly(name):
    escaped = escape_name(name)
    assert unescape_name(escaped) == name
    assert escaped.isprintable() and "\t" not in escaped
    assert escape_name("plain é 写真.jpg") == "plain é 写真.jpg"  # the common case is left alone


def test_text_output_keeps_one_line_per_image(tmp_path, tiny_model_file, capsys):
    for name in NAMES:
        Image.new("RGB", (20, 20)).save(Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), os.fsencode(name)))),
                                        format="JPEG")
    assert main(["caption", str(tmp_path), "--model", str(tiny_model_file), "--beam-size", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(NAMES)
    printed = {Path(unescape_name(line.split("\t")[0])).name for line in lines}
    assert printed == set(NAMES)
    assert all(line.count("\t") == 1 for line in lines)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_disk_is_one_line(photo, tiny_model_file):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "captioner", "caption", str(photo), "--model",
                               str(tiny_model_file)], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{ERROR}stdout: cannot write")


# ---- output targets ------------------------------------------------------------------------

def test_non_regular_targets_are_refused(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    for target in ("/dev/null", str(fifo), str(tmp_path)):
        with pytest.raises(OutputError, match="must be a regular file"):
            check_output(target, "metrics file")
    with pytest.raises(OutputError, match="not replaced"):
        atomic_write_text("/dev/null", "x")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_an_input_is_never_an_output(tmp_path):
    source = tmp_path / "last.ckpt"
    source.write_bytes(b"precious")
    link = tmp_path / "link.ckpt"
    link.symlink_to(source)
    for target in (source, link):
        with pytest.raises(OutputError, match="also an input"):
            check_output(target, "model file", inputs=[source])
    assert source.read_bytes() == b"precious"


def test_export_over_its_own_checkpoint_or_a_device_changes_nothing(tmp_path, capsys):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"not really a checkpoint, but mine")
    assert main(["export", str(checkpoint), str(checkpoint)]) == 1
    assert "also an input" in capsys.readouterr().err
    assert checkpoint.read_bytes() == b"not really a checkpoint, but mine"
    assert main(["export", str(checkpoint), "/dev/null"]) == 1
    assert "is a character device" in capsys.readouterr().err


def test_an_unwritable_output_is_found_before_the_work(tmp_path, tiny_model_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    data = tmp_path / "no-dataset"  # reading it would fail later: the output check comes first
    code = main(["evaluate", "--model", str(tiny_model_file), "--dataset", "folder", "--data-root", str(data),
                 "--output", str(blocker / "metrics.json")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{ERROR}{blocker / 'metrics.json'}: cannot write the metrics file there")


def test_same_named_images_from_two_folders_get_two_attention_maps(tmp_path, tiny_model_file, capsys):
    for folder, colour in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32), colour).save(tmp_path / folder / "x.jpg")
    maps = tmp_path / "maps"
    code = main(["caption", str(tmp_path / "a"), str(tmp_path / "b"), "--model", str(tiny_model_file),
                 "--attention-maps", str(maps), "--format", "jsonl"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    written = {row["attention_map"] for row in rows}
    assert len(written) == 2 and all(Path(p).is_file() for p in written)
    assert sorted(p.name for p in maps.iterdir()) == sorted(Path(p).name for p in written)


# ---- checkpoints -------------------------------------------------------------------------

class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/captioner-pwned",))


def test_train_refuses_a_malicious_ckpt_path_in_one_line(tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    shutil.rmtree("/tmp/captioner-pwned", ignore_errors=True)
    for protocol, says in ((2, "refused: unpickling it would import posix.system"), (4, "nothing in it was run")):
        evil.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=protocol))
        code = main(["train", "--config", str(REPO / "configs" / "base.yaml"), "--ckpt_path", str(evil)])
        assert code == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [err.strip()]  # one line
        assert says in err and "weights_only" not in err
    assert not os.path.exists("/tmp/captioner-pwned")
