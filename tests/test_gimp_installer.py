"""The GIMP plug-in's installer (`nst gimp install|uninstall`) and the plug-in's GIMP-free helpers.

Fast and GIMP-free: real files in temporary folders, the real `nst` argument parser, and the
plug-in's helper module (nst_plugin_helpers.py) imported as the plug-in imports it. The plug-in
itself runs in the real GIMP 3 in tests/test_gimp_plugin.py (marked gimp).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from gimp_plugin import installer
from nst_core import cli
from nst_core.params import StyleParams

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "gimp_plugin" / "neural-style" / "neural-style.py"
HELPERS = PLUGIN.with_name("nst_plugin_helpers.py")
CLIENT = REPO / "nst_core" / "service" / "client.py"


@pytest.fixture(scope="module")
def plugin():
    """The plug-in's GIMP-free helpers, loaded from their file as GIMP's Python loads them."""
    spec = importlib.util.spec_from_file_location("nst_plugin_helpers", HELPERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_copies_the_plugin_makes_it_executable_and_records_python(tmp_path, capsys):
    dest = tmp_path / "plug-ins"
    [folder] = installer.install(dest)
    assert folder == dest / "neural-style"
    assert (folder / "neural-style.py").read_bytes() == PLUGIN.read_bytes()
    assert os.access(folder / "neural-style.py", os.X_OK)
    assert (folder / "nst_plugin_helpers.py").read_bytes() == HELPERS.read_bytes()
    assert (folder / "nst_client.py").read_bytes() == CLIENT.read_bytes()
    settings = json.loads((folder / "nst-plugin.json").read_text())
    assert settings == {"python": sys.executable, "socket": None}
    out = capsys.readouterr().out
    assert f"Installed the Neural Style plug-in in {folder}" in out and sys.executable in out


def test_install_again_upgrades_in_place(tmp_path, capsys):
    dest = tmp_path / "plug-ins"
    folder = installer.install(dest)[0]
    (folder / "neural-style.py").write_text("# an old version\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "nst_client.cpython-313.pyc").write_bytes(b"stale")
    (folder / "user-notes.txt").write_text("mine")
    capsys.readouterr()
    installer.install(dest, python="/opt/nst/bin/python", socket="/run/nst/nst.sock")
    assert (folder / "neural-style.py").read_bytes() == PLUGIN.read_bytes()
    assert os.access(folder / "neural-style.py", os.X_OK)
    assert not (folder / "__pycache__").exists()
    assert (folder / "user-notes.txt").read_text() == "mine"
    assert json.loads((folder / "nst-plugin.json").read_text()) == {"python": "/opt/nst/bin/python",
                                                                     "socket": "/run/nst/nst.sock"}
    assert "Upgraded" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["neural-style.py", "nst-plugin.json", "nst_client.py",
                                                        "nst_plugin_helpers.py", "user-notes.txt"]


def test_uninstall_removes_only_the_plugins_files(tmp_path, capsys):
    dest = tmp_path / "plug-ins"
    folder = installer.install(dest)[0]
    assert installer.uninstall(dest) == [folder]
    assert not folder.exists() and dest.is_dir()
    assert installer.uninstall(dest) == []
    assert "nothing to remove" in capsys.readouterr().out

    folder = installer.install(dest)[0]
    (folder / "user-notes.txt").write_text("mine")
    installer.uninstall(dest)
    assert [p.name for p in folder.iterdir()] == ["user-notes.txt"]
    assert "user-notes.txt" in capsys.readouterr().out


def test_plugin_folders_per_platform(tmp_path):
    home = tmp_path / "home"
    assert installer.plugin_dirs({"GIMP3_DIRECTORY": "/x/gimp"}, "linux", home) == [Path("/x/gimp/plug-ins")]
    assert installer.plugin_dirs({}, "linux", home) == [home / ".config/GIMP/3.0/plug-ins"]
    assert installer.plugin_dirs({"XDG_CONFIG_HOME": "/cfg"}, "linux", home) == [Path("/cfg/GIMP/3.0/plug-ins")]
    (home / ".var/app/org.gimp.GIMP").mkdir(parents=True)
    assert installer.plugin_dirs({}, "linux", home) == [
        home / ".config/GIMP/3.0/plug-ins", home / ".var/app/org.gimp.GIMP/config/GIMP/3.0/plug-ins"]
    assert installer.plugin_dirs({"APPDATA": r"C:\Users\ann\AppData\Roaming"}, "win32", home) == [
        Path(r"C:\Users\ann\AppData\Roaming") / "GIMP" / "3.0" / "plug-ins"]
    assert installer.plugin_dirs({}, "darwin", home) == [home / "Library/Application Support/GIMP/3.0/plug-ins"]


def test_nst_gimp_install_and_uninstall_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GIMP3_DIRECTORY", str(tmp_path / "profile"))
    assert cli.main(["gimp", "install"]) == 0
    folder = tmp_path / "profile" / "plug-ins" / "neural-style"
    assert os.access(folder / "neural-style.py", os.X_OK)
    assert cli.main(["gimp", "install", "--dest", str(tmp_path / "other"), "--socket", "/tmp/s.sock"]) == 0
    assert json.loads((tmp_path / "other/neural-style/nst-plugin.json").read_text())["socket"] == "/tmp/s.sock"
    assert cli.main(["gimp", "uninstall"]) == 0
    assert not folder.exists() and (tmp_path / "other/neural-style").is_dir()
    capsys.readouterr()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "neural-style").write_text("a file where the folder goes")
    assert cli.main(["gimp", "install", "--dest", str(tmp_path / "ro")]) == 2
    assert "cannot install the plug-in into" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["gimp"])
    assert e.value.code == 2


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", [PLUGIN, HELPERS, CLIENT], ids=["plugin", "helpers", "client"])
def test_plugin_side_never_imports_torch_numpy_or_pillow(path):
    assert not imported(path) & {"torch", "torchvision", "numpy", "PIL", "nst_core"}


def test_the_plugin_is_gimps_shape_and_its_helpers_need_no_gimp():
    """A Gimp.PlugIn subclass at module level, as GIMP's plug-ins/python/*.py; the helpers import no gi."""
    tree = ast.parse(PLUGIN.read_text())
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert [ast.unparse(b) for c in classes for b in c.bases] == ["Gimp.PlugIn"]
    assert ast.unparse(tree.body[-1]) == "Gimp.main(NeuralStyle.__gtype__, sys.argv)"
    assert "nst_plugin_helpers" in imported(PLUGIN)
    assert imported(HELPERS) <= set(sys.stdlib_module_names) | {"__future__"}


def test_every_plugin_setting_makes_valid_engine_params(plugin):
    for quality in [*plugin.QUALITY_PRESETS, "custom"]:
        for preserve in plugin.PRESERVE_COLORS:
            for device in plugin.DEVICES:
                for strength in (1.0, 2.5, 4.0):
                    p = plugin.build_params(quality=quality, custom_size=64, custom_iterations=7, strength=strength,
                                            preserve_color=preserve, style_scale=0.5, seed=3, device=device,
                                            weights="random", region_w=5000, region_h=300)
                    sp = StyleParams.from_mapping(p)  # the engine's own validation
                    assert sp.preserve_color == preserve and sp.weights == "random" and sp.seed == 3
                    assert sp.ratio == pytest.approx(10.0 ** -(strength + 1))
                    if quality == "custom":
                        assert (sp.size, sp.iterations) == (64, 7)
                    elif quality == "full":  # the area's own longest side
                        assert (sp.size, sp.iterations) == (5000, plugin.QUALITY_PRESETS["full"][2])
                    else:
                        assert (sp.size, sp.iterations) == plugin.QUALITY_PRESETS[quality][1:]
    p = plugin.build_params(quality="custom", custom_size=64, custom_iterations=7, strength=2, preserve_color="none",
                            style_scale=1, seed=0, device="gpu", weights=" ", region_w=10, region_h=30)
    assert "weights" not in p and p["size"] == 30  # no upscaling of a small area


def test_full_resolution_is_the_areas_own_size(plugin):
    """Full resolution (or Custom with size 0) sends the area's longest side: no small result scaled up."""
    common = dict(custom_iterations=7, strength=2, preserve_color="none", style_scale=1, seed=0, device="cpu",
                  weights="random")
    for w, h in ((6000, 4000), (300, 4500), (17, 16)):
        full = plugin.build_params(quality="full", custom_size=512, region_w=w, region_h=h, **common)
        custom = plugin.build_params(quality="custom", custom_size=plugin.OWN_SIZE, region_w=w, region_h=h, **common)
        assert full["size"] == custom["size"] == max(w, h)
        assert StyleParams.from_mapping(full).size == max(w, h)
    high = plugin.build_params(quality="high", custom_size=0, region_w=6000, region_h=4000, **common)
    assert high["size"] == 1024
    assert plugin.label("full") == "Full resolution (the area's own size, 500 steps)"
    assert plugin.label("standard") == "Standard (512 px, 300 steps)"
    # Previews: the working size, at most PREVIEW_MAX_SIDE (GIMP scales them onto the layer).
    assert plugin.preview_side(6000) == plugin.PREVIEW_MAX_SIDE and plugin.preview_side(300) == 300
    assert plugin.device_name("gpu", "darwin") == "mps" and plugin.device_name("gpu", "linux") == "cuda"


def test_dialog_starts_at_the_engines_defaults(plugin):
    engine = StyleParams()
    start = plugin.START
    assert plugin.strength_to_ratio(start["strength"]) == pytest.approx(engine.ratio)
    assert (start["style_scale"], start["seed"], start["preserve_color"]) == (
        engine.style_scale, engine.seed, engine.preserve_color)
    assert plugin.device_name(start["device"]) == engine.device


def test_strength_scale_matches_its_tooltip(plugin):
    assert plugin.strength_to_ratio(2.0) == pytest.approx(1e-3)
    assert plugin.strength_to_ratio(1.0) == pytest.approx(1e-2)
    assert plugin.strength_to_ratio(4.0) == pytest.approx(1e-5)
    assert plugin.strength_to_ratio(9.0) == pytest.approx(1e-5)


def test_pixel_helpers(plugin):
    result = bytes([10, 20, 30, 40, 50, 60, 70, 80])
    original = bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert plugin.keep_alpha(result, original, 1) == bytes([10, 20, 30, 4, 50, 60, 70, 8])
    r16 = bytes(range(100, 116))
    o16 = bytes(range(16))
    assert plugin.keep_alpha(r16, o16, 2) == bytes([100, 101, 102, 103, 104, 105, 6, 7,
                                                    108, 109, 110, 111, 112, 113, 14, 15])
    assert plugin.swap16(bytes([1, 2, 3, 4])) == bytes([2, 1, 4, 3])
    assert plugin.scaled_dims(1000, 500, 256) == (256, 128, 0.256)
    assert plugin.scaled_dims(100, 50, 256) == (100, 50, 1.0)


def test_socket_choice_and_settings(plugin, tmp_path):
    settings = {"socket": "/from/installer.sock"}
    assert plugin.choose_socket("/typed.sock", settings, {"NST_SOCKET": "/env.sock"}) == "/typed.sock"
    assert plugin.choose_socket("", settings, {"NST_SOCKET": "/env.sock"}) == "/env.sock"
    assert plugin.choose_socket("", settings, {}) == "/from/installer.sock"
    assert plugin.choose_socket("", {}, {}) is None
    assert plugin.read_settings(str(tmp_path)) == {}
    (tmp_path / "nst-plugin.json").write_text("{not json")
    with pytest.raises(plugin.UserError, match="nst gimp install"):
        plugin.read_settings(str(tmp_path))


def test_error_messages_say_what_to_do(plugin):
    text = plugin.explain("out_of_memory", "out of memory on cuda:0 at 1024 px")
    assert text.startswith("Out of memory on cuda:0 at 1024 px.") and "lower Quality" in text
    assert "Weights" in plugin.explain("weights", "VGG-19 weights not found: fetch X and put it in Y")
    assert "nst serve" in plugin.explain("unavailable", "the service closed the connection")
    assert "select a part" in plugin.explain("image", "content: 9000×9000 = 81,000,000 pixels is more than …")
    event = {"step": 5, "total": 10, "level": 1, "levels": 2, "losses": {"total": 1234.5}, "eta": 2.2}
    assert plugin.progress_text(event) == "Neural Style: step 5/10 · level 1/2 · loss 1234 · 3 s left"


def test_progress_says_which_level_and_tile(plugin):
    event = {"step": 40, "total": 500, "level": 3, "levels": 4, "tile": 7, "tiles": 12, "eta": None}
    assert plugin.progress_text(event) == "Neural Style: step 40/500 · level 3/4 · tile 7/12"
    one_tile = {"step": 40, "total": 500, "level": 1, "levels": 1, "tile": 1, "tiles": 1}
    assert plugin.progress_text(one_tile) == "Neural Style: step 40/500"
    assert plugin.progress_text({"step": 1, "total": 2, "levels": None, "tiles": None}) == "Neural Style: step 1/2"


def test_pixels_that_are_not_the_layers_are_caught(plugin):
    gradient = bytes(v for i in range(256) for v in (i, 255 - i, 7))  # 256 RGB pixels, red 0…255
    mean, std = plugin.red_stats(gradient, 3, 8)
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.2898, abs=1e-3)
    # GIMP 3.0's histogram of the same pixels: 0…255 for 8-bit layers, 0…1 for deeper ones.
    assert not plugin.pixels_disagree((mean, std), 127.5, 73.9)
    assert not plugin.pixels_disagree((mean, std), 0.5, 0.29)
    assert plugin.pixels_disagree(plugin.red_stats(bytes(len(gradient)), 3, 8), 127.5, 73.9)  # all zero
    assert plugin.pixels_disagree(plugin.red_stats(bytes([128, 0, 0]) * 256, 3, 8), 127.5, 73.9)  # flat grey
    # Alpha weighs as in GIMP: invisible pixels do not count; 16-bit samples are native-endian.
    half = bytes([255, 0, 0, 255, 0, 0, 0, 0]) * 8
    assert plugin.red_stats(half, 4, 8) == (1.0, 0.0)
    deep = b"".join(v.to_bytes(2, sys.byteorder) for i in range(256) for v in (i * 257, 0, 0))
    assert plugin.red_stats(deep, 3, 16)[0] == pytest.approx(0.5)
