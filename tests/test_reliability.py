"""Reliability and security of `captioner caption` and `captioner export` at the process level.

Every broken or hostile input goes through the real command line (`python -m captioner ...` in
a subprocess), because what a user sees is the process: its stdout, its stderr and its exit
status. The contract (DESIGN.md): a captioned image is one `PATH<TAB>caption` line on stdout;
an image that cannot be captioned is exactly one `captioner: error: PATH: reason` line on
stderr; the others are still captioned; the exit status is 0 when all succeeded, 1 when any
failed, 2 for usage errors; never a traceback. Model files are never unpickled.

Inputs are generated in tmp_path; the model is conftest's tiny real-format model file.
Subprocesses are the slow part (a few seconds each, mostly importing torch), so each one
checks as much as it can.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

REPO = Path(__file__).resolve().parents[1]
ERROR = "captioner: error: "

# A strict UTF-8 stdout (what a user with an en_US.UTF-8 locale gets; the C.UTF-8 locale of
# this machine would silently use surrogateescape), one thread so we stay out of the way of
# other work on the machine, and no Python warnings filters changed.
CLI_ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str | os.PathLike, timeout: float = 180, env: dict | None = None,
            **kwargs) -> subprocess.CompletedProcess:
    """`python -m captioner ARGS`; stdout/stderr decoded like file names (surrogateescape)."""
    proc = subprocess.run([sys.executable, "-m", "captioner", *map(os.fsdecode, args)], cwd=REPO,
                          capture_output=True, timeout=timeout, env=env or CLI_ENV, **kwargs)
    proc.stdout = proc.stdout.decode("utf-8", "surrogateescape")
    proc.stderr = proc.stderr.decode("utf-8", "surrogateescape")
    return proc


def assert_no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR)]


def shown(path: str | os.PathLike) -> str:
    """How the CLI prints a path: as given, with line breaks and control characters escaped
    reversibly (one line per image; captioner.formats)."""
    from captioner.formats import escape_name
    return escape_name(os.fsdecode(path))


# ------------------------------------------------------------------------------ the corpus


def gradient(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    noise = rng.integers(0, 40, (height, width, 3))
    pixels = np.clip(np.concatenate([x + 0 * y, y + 0 * x, 255 - x + 0 * y], axis=2) + noise, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 12_000) -> bytes:
    """A real decompression bomb: a valid greyscale PNG of side x side black pixels (144
    megapixels, 144 MB decoded) that is about 0.6 MB on disk."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    packer = zlib.compressobj(1)
    rows = b"\x00" * ((side + 1) * 100)  # 100 rows of filter byte + black pixels
    idat = b"".join(packer.compress(rows) for _ in range(side // 100)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def png_with_bad_crc() -> bytes:
    data = bytearray(encoded(gradient(), "PNG"))
    start = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[start - 4:start])
    data[start + 4 + length // 2] ^= 0x55  # pixel data changed, CRC left as it was
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encoded(gradient(64, 32), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [gradient(seed=i).convert("P") for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


@dataclass
class Case:
    name: str            # for the report
    path: Path           # what is passed on the command line
    ok: bool             # expected: captioned (True) or one error line (False)
    reason: str = ""     # a word the error must contain


def build_corpus(root: Path) -> list[Case]:
    """Every kind of odd input, good and bad, generated in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    jpeg = encoded(gradient(), "JPEG", quality=90)
    cases: list[Case] = []

    def add(name: str, filename: str | bytes, data: bytes | None, ok: bool, reason: str = "") -> Path:
        path = Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(filename))))
        if data is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        cases.append(Case(name, path, ok, reason))
        return path

    add("plain JPEG", "good.jpg", jpeg, True)
    add("truncated JPEG", "truncated.jpg", jpeg[: len(jpeg) * 2 // 3], False, "truncated")
    add("zero-byte file", "empty.jpg", b"", False, "empty")
    add("text file named .jpg", "notes.jpg", b"these are my holiday notes\n" * 5, False, "not an image")
    add("PNG with a wrong CRC", "bad-crc.png", png_with_bad_crc(), False, "corrupt")
    add("1x1 image", "one-pixel.png", encoded(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), True)
    sixteen = Image.fromarray(np.linspace(0, 65535, 32 * 32, dtype=np.uint16).reshape(32, 32))
    add("16-bit greyscale PNG", "sixteen-bit.png", encoded(sixteen, "PNG"), True)
    add("CMYK JPEG", "cmyk.jpg", encoded(gradient().convert("CMYK"), "JPEG"), True)
    add("palette GIF", "palette.gif", encoded(gradient().convert("P"), "GIF"), True)
    add("animated GIF", "animated.gif", animated_gif(), True)
    rgba = gradient().convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    add("RGBA PNG", "rgba.png", encoded(rgba, "PNG"), True)
    add("EXIF-rotated JPEG", "rotated.jpg", exif_rotated_jpeg(), True)
    if features.check("webp"):
        add("WebP", "photo.webp", encoded(gradient(), "WEBP"), True)
    add("decompression bomb (144 Mpx PNG, 0.6 MB)", "bomb.png", png_bomb(), False, "too large")
    directory = add("directory named x.jpg", "x.jpg", None, False, "no images")
    directory.mkdir()
    locked = add("file with mode 000", "locked.jpg", jpeg, True)
    locked.chmod(0)
    # Root reads through mode 000: then the image is simply captioned.
    if not os.access(locked, os.R_OK):
        cases[-1].ok, cases[-1].reason = False, "permission denied"
    add("path with spaces and non-ASCII", "my photos/été à Zürich 写真.jpg", jpeg, True)
    add("file name that is not UTF-8", b"caf\xe9 latin-1.jpg", jpeg, True)
    add("bad file with a line break in its name", "two\nlines.jpg", b"garbage", False, "not an image")
    add("file that does not exist", "missing.jpg", None, False, "no such file")
    add("glob matching nothing", "*.nothing-here", None, False, "no such file")
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Case]:
    root = tmp_path_factory.mktemp("corpus")
    cases = build_corpus(root)
    yield cases
    for case in cases:
        if case.path.exists() and not case.path.is_dir():
            case.path.chmod(0o644)  # so pytest can clean up


def check_outcomes(cases: list[Case], captioned: dict[str, object], errors: dict[str, str]) -> None:
    for case in cases:
        key = shown(case.path)
        if case.ok:
            assert key in captioned, f"{case.name}: not captioned; errors: {errors.get(key)}"
            assert key not in errors, f"{case.name}: also reported as an error"
        else:
            assert key in errors, f"{case.name}: no error line; captioned: {captioned.get(key)!r}"
            assert case.reason in errors[key], f"{case.name}: {errors[key]!r} lacks {case.reason!r}"
            assert key not in captioned, f"{case.name}: also captioned"


def parse_errors_for(stderr: str, cases: list[Case]) -> dict[str, str]:
    """Match error lines to known paths exactly (reasons may contain ': ' themselves)."""
    lines = error_lines(stderr)
    out: dict[str, str] = {}
    for case in cases:
        prefix = f"{ERROR}{shown(case.path)}: "
        mine = [line for line in lines if line.startswith(prefix)]
        assert len(mine) <= 1, f"{case.name}: {len(mine)} error lines: {mine}"
        if mine:
            out[shown(case.path)] = mine[0][len(prefix):]
    return out


@pytest.mark.slow
def test_bad_image_corpus_text_output(corpus, tiny_model_file):
    proc = run_cli("caption", *[c.path for c in corpus], "--model", tiny_model_file, "--max-length", "6")
    assert_no_traceback(proc)
    # Each stdout line is PATH<TAB>caption (n-best 1: no alternative lines).
    captioned = {}
    for line in proc.stdout.splitlines():
        path, sep, caption = line.partition("\t")
        assert sep, f"stdout line without a tab: {line!r}"
        assert path not in captioned, f"{path} captioned twice"
        captioned[path] = caption
    errors = parse_errors_for(proc.stderr, corpus)
    check_outcomes(corpus, captioned, errors)
    # Nothing else on stderr: exactly one line per failed input, and only those.
    assert len(error_lines(proc.stderr)) == sum(not c.ok for c in corpus), proc.stderr
    assert proc.stderr.count("\n") == len(error_lines(proc.stderr)), proc.stderr
    assert len(captioned) == sum(c.ok for c in corpus)
    assert proc.returncode == 1


@pytest.mark.slow
def test_bad_image_corpus_jsonl_output(corpus, tiny_model_file):
    proc = run_cli("caption", *[c.path for c in corpus], "--model", tiny_model_file, "--max-length", "6",
                   "--format", "jsonl", "--n-best", "2")
    assert_no_traceback(proc)
    captioned = {}
    for line in proc.stdout.splitlines():
        item = json.loads(line)  # every line is one JSON object
        assert set(item) == {"image", "caption", "log_prob", "alternatives"}
        assert isinstance(item["caption"], str) and isinstance(item["log_prob"], float)
        assert len(item["alternatives"]) == 2 and item["alternatives"][0]["caption"] == item["caption"]
        # JSON text must be valid UTF-8; a non-UTF-8 file name comes back as \udcXX escapes that
        # os.fsencode turns back into the original bytes.
        line.encode("utf-8")
        captioned[shown(item["image"])] = item
    check_outcomes(corpus, captioned, parse_errors_for(proc.stderr, corpus))
    assert proc.returncode == 1


@pytest.mark.slow
def test_all_good_exits_0_and_seeded_sampling_matches_the_api(corpus, tiny_model_file):
    """All inputs good: exit 0, nothing on stderr. `--sample --seed 3` is reproducible: the
    process prints exactly what the API gives in this process for the same seed."""
    import torch

    from captioner.api import Captioner

    good = [c.path for c in corpus if c.ok and c.path.suffix in (".jpg", ".png")][:4]
    proc = run_cli("caption", *good, "--model", tiny_model_file, "--sample", "--seed", "3", "--max-length", "8")
    assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess (OMP_NUM_THREADS=1)
    try:
        results = Captioner.load(tiny_model_file, device="cpu").caption(good, sample=True, seed=3, max_length=8)
    finally:
        torch.set_num_threads(threads)
    assert proc.stdout.splitlines() == [f"{shown(r.image)}\t{r.caption}" for r in results]


@pytest.mark.parametrize("args", [
    ["caption"],                                     # no paths
    ["caption", "x.jpg", "--no-such-option"],        # unknown option
    ["caption", "x.jpg", "--format", "xml"],         # bad choice
    ["caption", "x.jpg", "--beam-size", "0"],        # out of range
    ["caption", "x.jpg", "--beam-size", "three"],
    ["caption", "x.jpg", "--sample", "--temperature", "0"],
    ["caption", "x.jpg", "--top-k", "-1"],
    ["caption", "x.jpg", "--n-best", "4", "--beam-size", "2"],
    ["frobnicate"],                                  # unknown command
    [],                                              # no command
    ["export", "only-one-argument.ckpt"],
])
def test_usage_errors_exit_2(args):
    """Usage errors are found by argument parsing, before torch is imported: fast."""
    proc = run_cli(*args, timeout=60)
    assert_no_traceback(proc)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == "" or args == []  # `captioner` alone prints its help


@pytest.mark.slow
def test_closed_stdout_pipe_is_not_a_traceback(corpus, tiny_model_file):
    """`captioner caption *.jpg | head -1`: head exits early; we must stop quietly."""
    good = [os.fsdecode(c.path) for c in corpus if c.ok][:3]
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "caption", *good, "--model",
                             str(tiny_model_file), "--max-length", "4", "--batch-size", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLI_ENV)
    proc.stdout.close()  # the reader is gone before the first caption is printed
    stderr = proc.stderr.read().decode("utf-8", "replace")
    returncode = proc.wait(timeout=180)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert returncode == 1  # the output was not delivered


def test_attention_maps_dir_that_is_a_file_is_one_error(corpus, tiny_model_file, tmp_path, capsys):
    # In-process (the CLI's main() with captured streams): a problem with the output directory
    # is reported before any work, not as a traceback after the first image.
    from captioner.cli import main

    blocker = tmp_path / "maps"
    blocker.write_text("a file where a directory should be")
    good = [os.fsdecode(c.path) for c in corpus if c.name == "plain JPEG"]
    rc = main(["caption", *good, "--model", str(tiny_model_file), "--attention-maps", str(blocker)])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err.splitlines() == [f"{ERROR}{blocker}: is a file; attention maps need a directory"]


# ------------------------------------------------------------------------------ fuzz


def mutants(data: bytes, rng: random.Random, count: int):
    """Random byte flips, truncations, duplicated and deleted runs of a real image file."""
    for _ in range(count):
        blob = bytearray(data)
        kind = rng.random()
        if kind < 0.25:
            blob = blob[: rng.randrange(1, len(blob))]
        elif kind < 0.35:
            start = rng.randrange(len(blob))
            blob[start:start] = blob[start:start + rng.randint(1, 64)]
        elif kind < 0.45:
            start = rng.randrange(len(blob))
            del blob[start:start + rng.randint(1, 64)]
        for _ in range(rng.randint(0 if kind < 0.45 else 1, 6)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        yield bytes(blob)


FUZZ_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")


def fuzz_corpus(directory: Path, per_format: int, seed: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for fmt in FUZZ_FORMATS:
        if fmt == "WEBP" and not features.check("webp"):
            continue
        data = encoded(gradient(40, 30, seed=len(paths)), fmt)
        for i, blob in enumerate(mutants(data, rng, per_format)):
            path = directory / f"{fmt.lower()}-{i:03d}.{fmt.lower()}"
            path.write_bytes(blob)
            paths.append(path)
    return paths


def test_fuzzed_images_through_the_api(tmp_path, tiny_model_file):
    """A few hundred mutated images in batches: every input gets exactly one result, a
    caption or a one-line error, in input order; nothing raises."""
    import torch

    from captioner.api import Captioner

    paths = fuzz_corpus(tmp_path, per_format=40, seed="captioner-fuzz-api")
    captioner = Captioner.load(tiny_model_file, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = captioner.caption(paths, beam_size=2, max_length=4, batch_size=32)
    finally:
        torch.set_num_threads(threads)
    assert [r.image for r in results] == [str(p) for p in paths]
    n_ok = 0
    for result in results:
        if result.ok:
            n_ok += 1
            assert isinstance(result.caption, str) and np.isfinite(result.log_prob)
        else:
            assert result.error and "\n" not in result.error and result.caption == ""
    assert 0 < n_ok < len(results)  # the fuzz both breaks files and leaves some decodable


@pytest.mark.slow  # the API test above covers the bulk; this adds the process boundary
def test_fuzzed_images_through_the_cli(tmp_path, tiny_model_file):
    paths = fuzz_corpus(tmp_path, per_format=2, seed="captioner-fuzz-cli")
    proc = run_cli("caption", *paths, "--model", tiny_model_file, "--max-length", "4")
    assert_no_traceback(proc)
    captioned = [line.partition("\t")[0] for line in proc.stdout.splitlines()]
    errors = [line[len(ERROR):].partition(": ")[0] for line in proc.stderr.splitlines()]
    assert all(line.startswith(ERROR) for line in proc.stderr.splitlines()), proc.stderr
    assert sorted(captioned + errors) == sorted(str(p) for p in paths)  # each exactly once
    assert proc.returncode == (1 if errors else 0)


# ------------------------------------------------------------------------------ model files


class Evil:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def evil_files(tmp_path):
    """A `.ckpt` written by torch.save (zip + pickle) and raw pickles under other names."""
    import torch

    marker = tmp_path / "PWNED"
    files = {}
    files["ckpt"] = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": Evil(marker)}, "hyper_parameters": {"vocab_size": 10}}, files["ckpt"])
    for name in ("evil.pt", "evil.safetensors", "evil-raw.ckpt"):
        files[name] = tmp_path / name
        files[name].write_bytes(pickle.dumps({"state_dict": Evil(marker)}))
    return marker, files


@pytest.mark.slow
def test_malicious_ckpt_as_model_is_refused_without_running(evil_files, corpus, tiny_model_file):
    marker, files = evil_files
    good = [c.path for c in corpus if c.name == "plain JPEG"]
    proc = run_cli("caption", *good, "--model", files["ckpt"])
    assert_no_traceback(proc)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{ERROR}{files['ckpt']}: "), proc.stderr
    assert "pickle" in lines[0] and "captioner export" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("name", ["evil.pt", "evil.safetensors"])
def test_malicious_pickle_under_other_names_in_process(evil_files, corpus, capsys, name):
    from captioner.cli import main

    marker, files = evil_files
    good = [os.fsdecode(c.path) for c in corpus if c.name == "plain JPEG"]
    assert main(["caption", *good, "--model", str(files[name])]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(f"{ERROR}{files[name]}: ")
    assert not marker.exists()


@pytest.mark.slow
def test_export_refuses_malicious_checkpoint_without_running(evil_files):
    marker, files = evil_files
    out = files["ckpt"].parent / "out.safetensors"
    proc = run_cli("export", files["ckpt"], out)
    assert_no_traceback(proc)
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{ERROR}{files['ckpt']}: "), proc.stderr
    assert "refused" in lines[0]
    assert not marker.exists()
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.safetensors")]


@pytest.mark.parametrize("name", ["evil-raw.ckpt", "garbage", "truncated", "empty", "missing", "not-a-dict"])
def test_export_of_broken_checkpoints_in_process(evil_files, capsys, name):
    import torch

    from captioner.cli import main

    marker, files = evil_files
    directory = files["ckpt"].parent
    path = {"evil-raw.ckpt": files["evil-raw.ckpt"], "garbage": directory / "garbage.ckpt",
            "truncated": directory / "truncated.ckpt", "empty": directory / "empty.ckpt",
            "missing": directory / "missing.ckpt", "not-a-dict": directory / "list.ckpt"}[name]
    if name == "garbage":
        path.write_text("not a checkpoint at all\n")
    elif name == "truncated":
        data = files["ckpt"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif name == "empty":
        path.write_bytes(b"")
    elif name == "not-a-dict":
        torch.save([1, 2, 3], path)
    out = directory / "out.safetensors"
    assert main(["export", str(path), str(out)]) == 1
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1 and lines[0].startswith(f"{ERROR}{path}: "), err
    assert not marker.exists() and not out.exists()


def _variant(tmp_path: Path, tiny_model_file: Path, kind: str) -> Path:
    """Model files that are broken in one specific way."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / f"{kind}.safetensors"
    data = tiny_model_file.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return path
    if kind == "empty":
        path.write_bytes(b"")
        return path
    with safe_open(str(tiny_model_file), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if kind == "wrong-version":
        meta["format_version"] = "99"
    elif kind == "vocab-mismatch":
        words = json.loads(meta["vocabulary"])
        if isinstance(words, dict):
            key = next(k for k, v in words.items() if isinstance(v, list))
            words[key] = words[key][:-2]
        else:
            words = words[:-2]
        meta["vocabulary"] = json.dumps(words)
    elif kind == "not-captioner":
        meta = {"format": "something-else"}
    elif kind == "nan-weights":
        name = next(iter(tensors))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("kind", ["truncated", "empty", "wrong-version", "vocab-mismatch",
                                  "not-captioner", "nan-weights", "directory", "missing"])
def test_broken_model_file_is_one_clear_line(kind, tmp_path, corpus, tiny_model_file, capsys):
    from captioner.cli import main

    if kind == "directory":
        path = tmp_path / "model.safetensors"
        path.mkdir()
    elif kind == "missing":
        path = tmp_path / "missing.safetensors"
    else:
        path = _variant(tmp_path, tiny_model_file, kind)
    good = [os.fsdecode(c.path) for c in corpus if c.name == "plain JPEG"]
    assert main(["caption", *good, "--model", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"{ERROR}{path}: "), err
    word = {"truncated": "valid safetensors", "empty": "valid safetensors", "wrong-version": "version",
            "vocab-mismatch": "vocabulary", "not-captioner": "not a captioner model",
            "nan-weights": "NaN", "directory": "directory", "missing": "no such"}[kind]
    assert word in err


@pytest.mark.slow  # the in-process test above covers every kind; this is the real process
def test_broken_model_file_through_the_cli(tmp_path, corpus, tiny_model_file):
    """The same refusal as a real process (one representative case)."""
    from captioner.modelfile import READABLE_VERSIONS
    path = _variant(tmp_path, tiny_model_file, "wrong-version")
    good = [c.path for c in corpus if c.name == "plain JPEG"]
    proc = run_cli("caption", *good, "--model", path)
    assert_no_traceback(proc)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"{ERROR}{path}: model format version '99' is not supported (this captioner reads versions "
        f"{', '.join(READABLE_VERSIONS)})"]
