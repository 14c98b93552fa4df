"""The `nst` command as scripts run it: `python -m nst_core ...` in a real subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nst_core.images import fit
from nst_core.params import StyleParams
from nst_core.samples import sample_path

REPO = Path(__file__).resolve().parents[1]
RANDOM_NOTE = "made with random (untrained) VGG-19 weights"
TINY = ["--size", "32", "--iterations", "3", "--weights", "random", "--device", "cpu"]


@pytest.fixture(scope="module")
def env(nst_cache_dir, tmp_path_factory) -> dict:
    """The environment of every `nst` run here: a shared NST cache, a private torch home, no
    weights variables, a wide terminal (one help entry per block), no progress bar timing."""
    e = dict(os.environ)
    for k in ("NST_WEIGHTS", "NST_WEIGHTS_URL", "XDG_CACHE_HOME"):
        e.pop(k, None)
    e["NST_CACHE_DIR"] = str(nst_cache_dir)
    e["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch-home"))
    e["COLUMNS"] = "200"
    e["PYTHONUNBUFFERED"] = "1"
    return e


def nst(env, *args, extra_env=None, timeout=300) -> subprocess.CompletedProcess:
    run_env = dict(env, **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "nst_core", *map(str, args)], cwd=REPO, env=run_env,
                          capture_output=True, text=True, timeout=timeout)


# The package's own samples, so that a fresh clone tests the command.
@pytest.fixture(scope="module")
def content() -> Path:
    return sample_path("chelsea")  # 451×300


@pytest.fixture(scope="module")
def style() -> Path:
    return sample_path("coffee")


def assert_usage_error(proc, *needles):
    """Exit 2, a one-line `nst:` message naming what is wrong, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle.lower() in proc.stderr.lower(), (needle, proc.stderr)


# ---- help ---------------------------------------------------------------------------------------

def help_blocks(text: str) -> dict[str, str]:
    """Option → its help text, from argparse's layout (an entry starts with two spaces and a dash)."""
    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-\S.*)$", line)
        if m:
            current = m.group(1)
            names = re.findall(r"(--?[\w-]+)", current.split("  ")[0])
            for n in names:
                blocks[n] = current
            key = names
        elif current is not None and line.startswith("    "):
            for n in key:
                blocks[n] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r"\s+", " ", v) for k, v in blocks.items()}


def test_help_shows_the_options_scripts_rely_on_with_defaults(env):
    proc = nst(env, "stylize", "--help")
    assert proc.returncode == 0, proc.stderr
    blocks = help_blocks(proc.stdout)
    d = StyleParams()
    expected_defaults = {
        "--size": str(d.size), "--iterations": str(d.iterations), "--weights": d.weights, "--seed": str(d.seed),
        "--device": d.device, "--init": d.init, "--ratio": f"{d.ratio:g}", "--preserve-color": d.preserve_color,
        "--save-every": "0", "--normalize-network": "True", "--levels": "0",
    }
    for option, default in expected_defaults.items():
        assert option in blocks, f"{option} missing from nst stylize --help"
        assert f"(default: {default}" in blocks[option], (option, blocks[option])
    assert "--json" in blocks
    # the paper's values, from the one source of defaults
    assert "(default: 512)" in blocks["--size"] and "(default: 0.001" in blocks["--ratio"]
    assert "relu4_2" in blocks["--content-layers"] and "relu5_1:0.2" in blocks["--style-layers"]
    assert "(default: avg)" in blocks["--pooling"] and "(default: lbfgs)" in blocks["--optimizer"]
    assert "--no-normalize-network" in blocks
    # what levels 0 does at each size
    assert "one pass up to 512 px" in blocks["--levels"] and "2048: 512, 1024, 2048" in blocks["--levels"]
    # choices are shown where there are choices
    assert "imagenet|random|PATH" in blocks["--weights"]
    assert "none|luminance|histogram" in blocks["--preserve-color"]
    # every option says its default once, and none is an unhelpful "None"
    for option, text in blocks.items():
        assert text.count("(default:") <= 1, (option, text)
    assert "(default: None)" not in proc.stdout


def test_no_command_is_a_usage_error(env):
    proc = nst(env)
    assert proc.returncode == 2
    assert "stylize" in proc.stderr


# ---- a tiny run ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(env, content, style, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "out.png"
    proc = nst(env, "stylize", content, style, "-o", out, *TINY, "--seed", "5")
    return proc, out


def test_a_tiny_run_writes_the_output_and_says_random_weights(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (32, 21)  # chelsea is 451×300
        text = dict(im.text)
    assert RANDOM_NOTE in proc.stderr
    assert str(out) in proc.stderr
    assert RANDOM_NOTE in text.get("nst:note", "")
    assert json.loads(text["nst:params"])["seed"] == 5
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.png"]  # nothing else left behind


def test_same_seed_same_bytes_other_seed_other_pixels(env, content, style, tiny_run, tmp_path):
    _, first = tiny_run
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    assert nst(env, "stylize", content, style, "-o", again, *TINY, "--seed", "5", "-q").returncode == 0
    assert nst(env, "stylize", content, style, "-o", other, *TINY, "--seed", "6", "-q").returncode == 0
    assert again.read_bytes() == first.read_bytes()
    with Image.open(first) as a, Image.open(other) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))


# ---- --json and --save-every --------------------------------------------------------------------

@pytest.fixture(scope="module")
def json_run(env, content, style, tmp_path_factory):
    out = tmp_path_factory.mktemp("json") / "result.png"
    proc = nst(env, "stylize", content, style, "-o", out, "--size", "32", "--iterations", "5", "--weights",
               "random", "--device", "cpu", "--json", "--save-every", "2")
    return proc, out


def test_json_prints_one_object_per_event(json_run):
    proc, out = json_run
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5]
    for e in progress:
        assert e["total"] == 5
        assert set(e["losses"]) >= {"total", "content", "style"}
        assert all(isinstance(v, (int, float)) for v in e["losses"].values())
        assert isinstance(e["elapsed"], (int, float)) and isinstance(e["eta"], (int, float))
    done = events[-1]
    assert done["event"] == "done"
    assert done["output"] == str(out)
    assert RANDOM_NOTE in done["note"]
    assert set(done["losses"]) >= {"total", "content", "style"}
    assert len(events) == len(progress) + 1


def test_save_every_writes_intermediate_images(json_run):
    proc, out = json_run
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.parent.iterdir())
    # steps 2 and 4 of 5; the last step is the output itself
    assert names == ["result.png", "result_step00002.png", "result_step00004.png"]
    for name in names:
        with Image.open(out.parent / name) as im:
            assert im.size == (32, 21)
    with Image.open(out.parent / "result_step00002.png") as a, Image.open(out) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def small_png(src: Path, dest: Path) -> bytes:
    with Image.open(src) as im:
        im.convert("RGB").resize((40, 30)).save(dest)
    return dest.read_bytes()


def test_save_every_refuses_to_overwrite_an_input(env, content, style, tmp_path):
    # the report: the content was named like an intermediate image, and step 2 overwrote it
    photo = tmp_path / "result_step00002.png"
    before = small_png(content, photo)
    proc = nst(env, "stylize", photo, style, "-o", tmp_path / "result.png", "--save-every", "2", *TINY,
               "--iterations", "5")
    assert_usage_error(proc, str(photo), "input", "--save-every")
    assert photo.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result_step00002.png"]

    # a style reached through a symbolic link elsewhere is the same file
    painting = tmp_path / "r_step00004.png"
    painting_bytes = small_png(style, painting)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "style.png").symlink_to(painting)
    proc = nst(env, "stylize", photo, tmp_path / "links" / "style.png", "-o", tmp_path / "r.png",
               "--save-every", "4", *TINY, "--iterations", "9")
    assert_usage_error(proc, "r_step00004.png", "input")
    assert painting.read_bytes() == painting_bytes and photo.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["links", "r_step00004.png", "result_step00002.png"]


def test_save_every_names_too_long_for_the_file_system_are_refused_before_the_run(env, content, style, tmp_path):
    out = tmp_path / ("n" * 246 + ".png")  # 250 bytes: fits; its _step00002 name (260 bytes) does not
    proc = nst(env, "stylize", content, style, "-o", out, "--save-every", "2", *TINY)
    assert_usage_error(proc, "260 bytes", "255", "--save-every")
    assert list(tmp_path.iterdir()) == []


def test_output_names_up_to_the_limit_are_written(env, content, style, tmp_path):
    # names of 242-255 bytes were refused because the temporary name was 14 bytes longer
    out = tmp_path / ("a" + "é" * 120 + ".png")
    assert len(out.name.encode()) == 245
    proc = nst(env, "stylize", content, style, "-o", out, "--save-every", "2", *TINY, "-q")
    assert proc.returncode == 0, proc.stderr
    step = out.with_name(out.stem + "_step00002.png")
    assert len(step.name.encode()) == 255
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, step.name])
    with Image.open(content) as im:
        h, w = fit(im.height, im.width, 32)
    for path in (out, step):
        with Image.open(path) as im:
            assert im.size == (w, h)


# ---- alpha ---------------------------------------------------------------------------------------

def test_alpha_survives_the_command(env, content, style, tmp_path):
    with Image.open(content) as im:
        rgb = np.asarray(im.convert("RGB").resize((40, 30), Image.LANCZOS))
    alpha = np.random.default_rng(7).integers(0, 256, size=(30, 40), dtype=np.uint8)
    alpha[:5] = 0
    alpha[-5:] = 255
    src = tmp_path / "in.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src)
    out = tmp_path / "out.png"
    proc = nst(env, "stylize", src, style, "-o", out, "--size", "40", "--iterations", "2", "--weights", "random",
               "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        assert im.mode == "RGBA" and im.size == (40, 30)
        assert np.array_equal(np.asarray(im)[..., 3], alpha)


# ---- bad input: exit 2, the file and the problem named, nothing written ---------------------------

@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_missing_content_file(env, style, tmp_path, out_dir):
    missing = tmp_path / "no-such-photo.jpg"
    proc = nst(env, "stylize", missing, style, "-o", out_dir / "o.png", *TINY)
    assert_usage_error(proc, str(missing), "no such file")
    assert list(out_dir.iterdir()) == []


def test_style_that_is_not_an_image(env, content, tmp_path, out_dir):
    fake = tmp_path / "x.jpg"
    fake.write_text("this is a text file with an image's name\n")
    proc = nst(env, "stylize", content, fake, "-o", out_dir / "o.png", *TINY)
    assert_usage_error(proc, str(fake), "not an image")
    # the output appears whole or not at all: no output, no temporary file
    assert list(out_dir.iterdir()) == []


def test_truncated_jpeg(env, content, tmp_path, out_dir):
    whole = tmp_path / "whole.jpg"
    with Image.open(content) as im:
        im.save(whole, quality=90)
    data = whole.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 6 // 10])
    proc = nst(env, "stylize", content, cut, "-o", out_dir / "o.png", *TINY)
    assert_usage_error(proc, str(cut), "truncated")
    assert list(out_dir.iterdir()) == []


def test_unknown_output_extension(env, content, style, out_dir):
    target = out_dir / "x.xyz"
    proc = nst(env, "stylize", content, style, "-o", target, *TINY)
    assert_usage_error(proc, str(target), "extension", ".png")
    assert list(out_dir.iterdir()) == []


def test_output_that_is_an_input_is_refused(env, style, tmp_path, content):
    src = tmp_path / "photo.png"
    with Image.open(content) as im:
        im.convert("RGB").resize((40, 30)).save(src)
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    # the same file under another spelling of its path
    proc = nst(env, "stylize", src, style, "-o", tmp_path / "sub" / ".." / "photo.png", *TINY)
    assert_usage_error(proc, "photo.png", "input")
    assert src.read_bytes() == before
    # a style given as the output is refused too
    style_copy = tmp_path / "style.png"
    shutil.copy(src, style_copy)
    proc = nst(env, "stylize", content, style_copy, "-o", style_copy, *TINY)
    assert_usage_error(proc, "style.png", "input")
    assert style_copy.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "style.png", "sub"]


@pytest.mark.parametrize("option,value,needles", [
    ("--size", "abc", ("size", "abc")),
    ("--iterations", "1.5", ("iterations", "1.5")),
    ("--preserve-color", "foo", ("preserve", "foo", "luminance")),
    ("--style-layers", "relu9_9", ("style", "relu9_9")),
    ("--pooling", "median", ("pooling", "median")),
    ("--ratio", "x", ("ratio", "x")),
])
def test_bad_option_value(env, content, style, out_dir, option, value, needles):
    proc = nst(env, "stylize", content, style, "-o", out_dir / "o.png", *TINY, option, value)
    assert_usage_error(proc, *needles)
    assert list(out_dir.iterdir()) == []


def test_no_style_images_with_the_default_weights(env, content, out_dir):
    proc = nst(env, "stylize", content, "-o", out_dir / "o.png", *TINY)
    assert_usage_error(proc, "style")
    assert list(out_dir.iterdir()) == []


# ---- weights ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """A VGG-19 state dict in torchvision's layout, as a user's weights file."""
    import torch
    from nst_core.weights import random_state_dict

    path = tmp_path_factory.mktemp("weights") / "vgg19-own.pth"
    torch.save(random_state_dict(7), path)
    return path


def test_no_normalize_network_uses_the_files_own_scales(env, content, style, vgg_file, tmp_path):
    # The default normalises a weights file (calibration: see test_weights); the option turns it off.
    out = tmp_path / "plain.png"
    proc = nst(env, "stylize", content, style, "-o", out, "--size", "32", "--iterations", "1", "--device", "cpu",
               "--weights", vgg_file, "--no-normalize-network")
    assert proc.returncode == 0, proc.stderr
    assert f"weights {vgg_file}\n" in proc.stderr  # not "(normalised)"
    assert RANDOM_NOTE not in proc.stderr
    with Image.open(out) as im:
        assert json.loads(im.text["nst:params"])["normalize_network"] is False


# ---- weights, offline -----------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connections are refused


def test_imagenet_weights_offline_say_what_to_fetch_and_where(env, content, style, tmp_path, out_dir):
    torch_home, cache = tmp_path / "torch-home", tmp_path / "nst-cache"
    url = f"http://127.0.0.1:{closed_port()}/models/vgg19-dcbb9e9d.pth"
    proc = nst(env, "stylize", content, style, "-o", out_dir / "o.png", "--size", "32", "--iterations", "2",
               "--weights", "imagenet", "--device", "cpu",
               extra_env={"TORCH_HOME": str(torch_home), "NST_CACHE_DIR": str(cache), "NST_WEIGHTS_URL": url})
    where = torch_home / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    assert_usage_error(proc, "vgg19-dcbb9e9d.pth", str(where), url, "NST_WEIGHTS")
    assert list(out_dir.iterdir()) == []
    # no partial download left behind
    checkpoints = torch_home / "hub" / "checkpoints"
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []


# ---- whole or not at all --------------------------------------------------------------------------

def test_interrupted_run_writes_nothing(env, content, style, out_dir):
    target = out_dir / "o.png"
    args = [sys.executable, "-m", "nst_core", "stylize", str(content), str(style), "-o", str(target),
            "--size", "48", "--iterations", "100000", "--weights", "random", "--device", "cpu", "--json"]
    # Ctrl-C as a terminal delivers it: a test run started in the background (`cmd &` in a script)
    # would otherwise pass on SIGINT ignored, and the command would rightly keep running.
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = json.loads(proc.stdout.readline())  # the run is under way
        assert first["event"] == "progress"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_importing_nst_core_changes_no_environment_and_the_entry_points_set_the_openmp_policy(env, tmp_path):
    """The OpenMP wait policy is the entry points' (nst, nst-daemon, the service process, which is
    `nst serve`); a program that imports the engine keeps its environment, and a value set wins."""
    clean = {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}
    probe = ("import os, sys\n"
             "import nst_core, nst_core.engine, nst_core.service.server, daemon.main, gimp_plugin.installer\n"
             "print('import', os.environ.get('OMP_WAIT_POLICY'))\n"
             "from nst_core import cli\n"
             "cli.main(['status', '--socket', sys.argv[1]])\n"
             "print('nst', os.environ.get('OMP_WAIT_POLICY'))\n"
             "os.environ.pop('OMP_WAIT_POLICY')\n"
             "daemon.main.main(['--units-dir'])\n"
             "print('nst-daemon', os.environ.get('OMP_WAIT_POLICY'))\n")

    def run(**extra):
        return subprocess.run([sys.executable, "-c", probe, str(tmp_path / "none.sock")], cwd=REPO, text=True,
                              env={**clean, **extra}, capture_output=True, timeout=120)

    out = run().stdout.splitlines()
    assert [line for line in out if " " in line and not line.startswith("/")] == [
        "import None", "nst PASSIVE", "nst-daemon PASSIVE"]
    kept = run(OMP_WAIT_POLICY="ACTIVE").stdout
    assert "import ACTIVE" in kept and "nst ACTIVE" in kept


def test_size_original_tiled_json_events_carry_the_tiles(env, content, style, tmp_path):
    src = tmp_path / "content.png"
    with Image.open(content) as im:
        im.convert("RGB").resize((72, 50)).save(src)
    out = tmp_path / "full.png"
    proc = nst(env, "stylize", src, style, "-o", out, "--size", "original", "--tile", "16", "--iterations", "2",
               "--weights", "random", "--device", "cpu", "--content-layers", "relu2_1",
               "--style-layers", "relu1_1,relu2_1", "--json")
    assert proc.returncode == 0, proc.stderr
    progress = [e for e in map(json.loads, proc.stdout.splitlines()) if e["event"] == "progress"]
    tiles = progress[-1]["tiles"]
    assert tiles == 5 * 4  # interiors of 16 px over 72×50: columns 16·4 + 8, rows 16·3 + 2
    within = [(0, t) for t in range(1, tiles)]  # tiles done within the first step, then the step
    assert [(e["step"], e["tile"]) for e in progress] == [*within, (1, tiles), *((1, t) for t in range(1, tiles)),
                                                         (2, tiles)]
    with Image.open(out) as im:
        assert im.size == (72, 50)
