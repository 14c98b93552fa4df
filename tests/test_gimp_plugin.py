"""The GIMP 3 plug-in in the real GIMP 3.0 (a Debian 13 chroot, ../shared/gimp3) against the real
job service running on the host (`python -m nst_core serve`, CPU, random weights, tiny sizes),
reached through a Unix socket in a folder bind-mounted into the chroot.

Batch scripts run in gimp-console-3.0 (python-fu-eval) and print `RESULT {json}` lines and a
sentinel (batch errors do not always set GIMP's exit code). The plug-in reaches the service through
a recording proxy (tests/service_recorder.py), so the tests check what the service received. The
GUI tests run gimp-3.0 under Xvfb and drive it with synthetic X events (libX11 through ctypes,
inside the chroot): Alt+O in the dialog, Ctrl+Z for the undo step, a click on the status bar's
Cancel button for GIMP's own cancel, screenshots of the canvas for the previews. GIMP 3.0 cancels a
plug-in by killing its process (app/plug-in/gimpplugin.c, gimp_plug_in_close), so the service
must cancel the job when the plug-in's connection drops, and the plug-in's first process must
leave the image as it was; that is what these tests check.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gimp_plugin import installer
from nst_core.service.client import ServiceClient
from service_recorder import RecordingProxy

pytestmark = pytest.mark.gimp

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "gimp3"
SAMPLES = REPO / "nst_core" / "samples"
CHROOT = Path(os.environ.get("NST_GIMP3_CHROOT", "/var/cache/nst-gimp3"))
ARTIFACTS = REPO / "test-artifacts"
SENTINEL = "NST_GIMP_TEST_DONE"
JOB = {"weights": "random", "device": "cpu", "quality": "custom", "size": 48, "iterations": 3}

# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chroot():
    """The GIMP 3 chroot; built with ../shared/gimp3/make-chroot.sh when missing (skip if that fails)."""
    if os.geteuid() != 0:
        pytest.skip("the GIMP 3 chroot needs root (chroot, mount namespaces)")
    if not (CHROOT / ".gimp3-ready").exists():
        script = SHARED / "make-chroot.sh"
        if not script.exists():
            pytest.skip(f"no GIMP 3 chroot at {CHROOT} and no {script} to build one")
        r = subprocess.run(["bash", str(script), str(CHROOT)], capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            pytest.skip(f"cannot build the GIMP 3 chroot: {(r.stdout + r.stderr)[-800:]}")
    return CHROOT


@pytest.fixture(scope="module")
def workdir():
    """A short path (Unix socket paths are limited to 107 bytes), bind-mounted into the chroot."""
    path = Path(tempfile.mkdtemp(prefix="nstgimp-", dir="/tmp"))
    path.chmod(0o755)
    (path / "helper.py").write_text(HELPER)
    for name in ("chelsea.png", "gravel.png"):  # the package's own samples: a photo and a texture
        shutil.copy(SAMPLES / name, path / name)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def service(workdir):
    """The real job service on the host, CPU only, as a subprocess."""
    sock = workdir / "svc" / "nst.sock"
    log = open(workdir / "service.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "nst_core", "serve", "--socket", str(sock), "--idle-exit", "0",
                             "--device", "cpu"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    client = ServiceClient(str(sock), timeout=10.0)
    deadline = time.monotonic() + 120
    while not client.ping():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the service did not start: {(workdir / 'service.log').read_text()[-2000:]}")
        time.sleep(0.2)
    yield client
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def recorder(workdir, service):
    """The plug-in's way to the service: a proxy that records what the service receives."""
    proxy = RecordingProxy(str(workdir / "proxy" / "nst.sock"), service.socket_path)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def profile(chroot, workdir, recorder):
    """A GIMP profile with the plug-in installed by the installer, pointed at the host service."""
    folder = installer.install(workdir / "gimp" / "plug-ins", socket=recorder.socket_path)[0]
    assert os.access(folder / "neural-style.py", os.X_OK)
    return workdir / "gimp"


# ---- running GIMP -------------------------------------------------------------------------------

PRELUDE = r'''
import json, os, subprocess, sys, time
from gi.repository import Gimp, Gio, Gegl, GLib
WORK = {work!r}
HELPER = os.path.join(WORK, "helper.py")
PDB = Gimp.get_pdb()
JOB = {job!r}
STATUS = {{Gimp.PDBStatusType.SUCCESS: "success", Gimp.PDBStatusType.CANCEL: "cancel",
           Gimp.PDBStatusType.EXECUTION_ERROR: "execution-error", Gimp.PDBStatusType.CALLING_ERROR: "calling-error"}}

def emit(**kw):
    print("RESULT " + json.dumps(kw), flush=True)

def make_image(w, h, bits=8, alpha=True, base=Gimp.ImageBaseType.RGB, name="photo"):
    """An image with one layer holding a gradient with varied alpha."""
    prec = Gimp.Precision.U16_NON_LINEAR if bits == 16 else Gimp.Precision.U8_NON_LINEAR
    img = Gimp.Image.new_with_precision(w, h, base, prec)
    kinds = {{(Gimp.ImageBaseType.RGB, True): Gimp.ImageType.RGBA_IMAGE, (Gimp.ImageBaseType.RGB, False): Gimp.ImageType.RGB_IMAGE,
             (Gimp.ImageBaseType.GRAY, True): Gimp.ImageType.GRAYA_IMAGE, (Gimp.ImageBaseType.GRAY, False): Gimp.ImageType.GRAY_IMAGE,
             (Gimp.ImageBaseType.INDEXED, False): Gimp.ImageType.INDEXED_IMAGE}}
    layer = Gimp.Layer.new(img, name, w, h, kinds[(base, alpha)], 100, Gimp.LayerMode.NORMAL)
    img.insert_layer(layer, None, 0)
    if base == Gimp.ImageBaseType.RGB:
        top = 65535 if bits == 16 else 255
        vals = []
        for y in range(h):
            for x in range(w):
                px = [x * top // w, y * top // h, (x * 7919 + y * 104729) % (top + 1)]
                if alpha:
                    px.append(top - (x * 5 + y * 3) % (top // 2))
                vals.extend(px)
        data = b"".join(v.to_bytes(2, sys.byteorder) for v in vals) if bits == 16 else bytes(vals)
        layer.get_buffer().set(Gegl.Rectangle.new(0, 0, w, h), fmt(alpha, bits), data)
    return img, layer

def fmt(alpha, bits):
    return "R'G'B'" + ("A" if alpha else "") + " u%d" % bits

def pixels(drawable, alpha=True, bits=8):
    w, h = drawable.get_width(), drawable.get_height()
    data = drawable.get_buffer().get(Gegl.Rectangle.new(0, 0, w, h), 1.0, fmt(alpha, bits), Gegl.AbyssPolicy.CLAMP)
    if bits == 16:
        return [int.from_bytes(data[i:i + 2], sys.byteorder) for i in range(0, len(data), 2)]
    return list(data)

def checker(size=40, name="style"):
    img = Gimp.Image.new(size, size, Gimp.ImageBaseType.RGB)
    layer = Gimp.Layer.new(img, name, size, size, Gimp.ImageType.RGB_IMAGE, 100, Gimp.LayerMode.NORMAL)
    img.insert_layer(layer, None, 0)
    data = b"".join(bytes((230, 40, 20)) if (x // 5 + y // 5) % 2 else bytes((20, 40, 230))
                    for y in range(size) for x in range(size))
    layer.get_buffer().set(Gegl.Rectangle.new(0, 0, size, size), "R'G'B' u8", data)
    return img, layer

def forget_last_values():
    """An interactive run starts from the last interactive run's values when there are some (GIMP keeps
    them in the profile); forget them so that the arguments given here fill the dialog."""
    import glob
    for path in glob.glob(os.path.join(os.environ["GIMP3_DIRECTORY"], "plug-in-settings", "*-python-fu-neural-style.last")):
        os.remove(path)

def run_ns(image, drawable, run_mode=Gimp.RunMode.NONINTERACTIVE, job=True, **args):
    proc = PDB.lookup_procedure("python-fu-neural-style")
    cfg = proc.create_config()
    cfg.set_property("run-mode", run_mode)
    cfg.set_property("image", image)
    cfg.set_core_object_array("drawables", [drawable])
    for k, v in {{**(JOB if job else {{}}), **args}}.items():
        cfg.set_property(k.replace("_", "-"), v)
    res = proc.run(cfg)
    message = res.index(1) if res.length() > 1 and isinstance(res.index(1), str) else ""
    return STATUS.get(res.index(0), str(res.index(0))), message
'''


def run_gimp(workdir: Path, profile: Path, body: str, *, gui: bool = False, timeout: float = 300,
             name: str = "script") -> tuple[str, list[dict]]:
    """Run a batch script in GIMP inside the chroot; (all output, the RESULT records). Checks the sentinel."""
    script = workdir / f"{name}.py"
    script.write_text(PRELUDE.format(work=str(workdir), job=JOB) + textwrap.dedent(body)
                      + f"\nprint({SENTINEL!r}, flush=True)\n")
    env = ["env", f"HOME={workdir}", f"GIMP3_DIRECTORY={profile}"]
    if gui:
        (workdir / "gui.sh").write_text(GUI_SH)
        inner = env + ["sh", str(workdir / "gui.sh"), str(workdir), str(script)]
        stdin = subprocess.DEVNULL
    else:
        inner = env + ["gimp-console-3.0", "-nidfs", "--batch-interpreter", "python-fu-eval", "-b", "-", "--quit"]
        stdin = open(script)
    cmd = [str(SHARED / "run.sh"), str(CHROOT), "--bind", str(workdir), "--", *inner]
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"GIMP did not finish within {timeout} s:\n{out[-4000:]}")
    finally:
        if stdin is not subprocess.DEVNULL:
            stdin.close()
    records = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert SENTINEL in out, f"the batch script did not finish:\n{out[-4000:]}"
    return out, records


def one(records: list[dict], step: str) -> dict:
    found = [r for r in records if r.get("step") == step]
    assert len(found) == 1, f"expected one {step!r} record in {records}"
    return found[0]


def jobs_count(service: ServiceClient) -> dict:
    return dict(service.status()["jobs"])


def wait_cancelled(service: ServiceClient, before: dict, timeout: float = 20.0) -> dict:
    """The service's status once it counted one more cancelled job and runs nothing."""
    deadline = time.monotonic() + timeout
    while True:
        status = service.status()
        idle = all(w.get("running") is None for w in status["workers"])
        if status["jobs"]["cancelled"] > before["cancelled"] and idle:
            return status
        assert time.monotonic() < deadline, f"the service did not cancel the job: {status}"
        time.sleep(0.2)


def correlation(received, reference: Path) -> float:
    """Pearson correlation of the RGB samples of `received` (H×W×C) with the image file `reference`
    shrunk to the same size: near 1 when the service got that picture, at any working size."""
    ref = Image.open(reference).convert("RGB").resize((received.shape[1], received.shape[0]), Image.BOX)
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = received[..., :3].astype(np.float64).ravel()
    if b.std() == 0 or a.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


# ---- console tests ------------------------------------------------------------------------------


def test_gimp_lists_the_procedure_under_filters(workdir, profile):
    _, records = run_gimp(workdir, profile, '''
        proc = PDB.lookup_procedure("python-fu-neural-style")
        emit(step="proc", found=proc is not None, menus=list(proc.get_menu_paths()), label=proc.get_menu_label(),
             args=[a.name for a in proc.get_arguments()], types=proc.get_image_types())
    ''', name="menu")
    r = one(records, "proc")
    assert r["found"]
    assert r["menus"] and all(m.startswith("<Image>/Filters") for m in r["menus"])
    assert r["label"] == "Neural Style…"
    assert {"style-source", "style-file", "style-layer", "strength", "preserve-color", "style-scale", "quality",
            "output", "device", "seed"} <= set(r["args"])


def test_the_service_receives_the_photo_and_the_style_without_the_dialog(workdir, profile, recorder):
    """Scripts, batch runs (NONINTERACTIVE): the layer and the style file, larger than the working size."""
    seen = len(recorder.jobs)
    _, records = run_gimp(workdir, profile, '''
        img = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(WORK + "/chelsea.png"))
        layer = img.get_layers()[0]
        Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, img, Gio.File.new_for_path(WORK + "/chelsea-layer.png"), None)
        status, message = run_ns(img, layer, style_source="file",
                                 style_file=Gio.File.new_for_path(WORK + "/gravel.png"), size=64)
        emit(step="run", status=status, message=message, size=[layer.get_width(), layer.get_height()])
        _, style = checker(name="style-layer")
        status, message = run_ns(img, layer, style_source="layer", style_layer=style, size=64)
        emit(step="layer", status=status, message=message)
    ''', name="received")
    for step in ("run", "layer"):
        r = one(records, step)
        assert r["status"] == "success", r["message"]
    assert one(records, "run")["size"] == [451, 300]
    file_job, layer_job = recorder.since(seen)
    content, style = file_job.images()
    assert content.shape[:2] == (43, 64) and max(style.shape[:2]) == 64  # shrunk to the working size
    assert correlation(content, workdir / "chelsea-layer.png") > 0.9
    assert correlation(style, workdir / "gravel.png") > 0.9
    content, style = layer_job.images()
    assert correlation(content, workdir / "chelsea-layer.png") > 0.9
    assert style.shape[:2] == (40, 40) and style[..., :3].std() > 50  # the 40 px checker, as it is


def test_full_resolution_stylises_the_layer_at_its_own_size(workdir, profile, service, recorder):
    """Full resolution sends the whole layer and writes the service's result as it is: detail at
    full resolution, where a working size smaller than the layer gives a smooth upscaled result."""
    seen = len(recorder.jobs)
    _, records = run_gimp(workdir, profile, f'''
        img = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(WORK + "/chelsea.png"))
        img.scale(180, 120)
        layer = img.get_layers()[0]
        Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, img, Gio.File.new_for_path(WORK + "/full-layer.png"), None)
        _, style = checker()
        # The "Full resolution" choice itself (500 steps): what it sends, then killed as GIMP's Cancel does.
        helper = subprocess.Popen([sys.executable, HELPER, "kill-when-running", {service.socket_path!r},
                                   {str(profile / "plug-ins" / "neural-style")!r}])
        status, message = run_ns(img, layer, style_source="layer", style_layer=style, quality="full")
        helper.wait(60)
        emit(step="full", status=status, helper=helper.returncode, layers=len(img.get_layers()))
        for name, size in (("own-size", 0), ("working-size", 45)):
            status, message = run_ns(img, layer, style_source="layer", style_layer=style, size=size)
            new = img.get_layers()[0]
            emit(step=name, status=status, message=message, size=[new.get_width(), new.get_height()],
                 pixels=pixels(new, alpha=False))
            img.remove_layer(new)
    ''', name="full")
    r = one(records, "full")
    assert r["helper"] == 0 and r["status"] != "success" and r["layers"] == 1
    full, own, small = recorder.since(seen)
    layer = np.asarray(Image.open(workdir / "full-layer.png").convert("RGB"))
    assert full.header["params"]["size"] == 180 and full.header["params"]["iterations"] == 500
    assert np.array_equal(full.images()[0], layer)  # the whole layer, pixel for pixel
    assert np.array_equal(own.images()[0], layer) and own.header["params"]["size"] == 180
    assert max(small.images()[0].shape[:2]) == 45

    def detail(a):  # mean difference between neighbouring pixels
        a = a.astype(np.float64)
        return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())

    results = {}
    for step, job in (("own-size", own), ("working-size", small)):
        r = one(records, step)
        assert r["status"] == "success" and r["size"] == [180, 120], r["message"]
        results[step] = np.array(r["pixels"], dtype=np.uint8).reshape(120, 180, 3)
    assert own.result_image().shape == (120, 180, 3)  # made at full size by the service …
    # … with the level and tile fields that the plug-in's status line reads (one tile at this size)
    assert own.progress and all((p["tile"], p["tiles"]) == (1, 1) for p in own.progress)
    assert np.array_equal(results["own-size"], own.result_image())  # … and put on the layer as it came
    assert small.result_image().shape[:2] == (30, 45)
    assert detail(results["own-size"]) > 2 * detail(results["working-size"])


def test_feathered_selection_gives_a_new_layer_above_that_blends(workdir, profile):
    _, records = run_gimp(workdir, profile, '''
        W, H = 96, 64
        simg, _ = checker()
        Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, simg, Gio.File.new_for_path(WORK + "/style.png"), None)
        img, layer = make_image(W, H)
        before = pixels(layer)
        Gimp.context_set_feather(True)
        Gimp.context_set_feather_radius(8, 8)
        img.select_rectangle(Gimp.ChannelOps.REPLACE, 32, 20, 32, 24)
        status, message = run_ns(img, layer, style_source="file",
                                 style_file=Gio.File.new_for_path(WORK + "/style.png"))
        layers = img.get_layers()
        emit(step="run", status=status, message=message, names=[l.get_name() for l in layers])
        new = pixels(layers[0])
        def diff(xs, ys, channels=(0, 1, 2)):
            d = [abs(new[(y * W + x) * 4 + c] - before[(y * W + x) * 4 + c]) for y in ys for x in xs for c in channels]
            return sum(d) / len(d)
        far = [(x, y) for y in range(H) for x in range(W) if x < 20 or x >= 76 or y < 8 or y >= 56]
        emit(step="pixels",
             original_unchanged=pixels(layers[1]) == before,
             far_outside_equal=all(new[(y * W + x) * 4 + c] == before[(y * W + x) * 4 + c]
                                   for x, y in far for c in range(4)),
             alpha_equal=new[3::4] == before[3::4],
             core_diff=diff(range(40, 56), range(28, 36)),
             edge_diff=diff(range(28, 31), range(28, 36)))
    ''', name="feather")
    run = one(records, "run")
    assert run["status"] == "success", run["message"]
    assert len(run["names"]) == 2
    assert "Neural Style" in run["names"][0] and run["names"][1] == "photo"  # the new layer is above
    px = one(records, "pixels")
    assert px["original_unchanged"]
    assert px["far_outside_equal"]
    assert px["alpha_equal"]
    assert px["core_diff"] > 10  # stylised inside the selection
    assert 0 < px["edge_diff"] < 0.8 * px["core_diff"]  # the feathered edge blends


def test_16_bit_rgba_in_place_keeps_16_bit_alpha_and_precision(workdir, profile):
    _, records = run_gimp(workdir, profile, '''
        img, layer = make_image(40, 30, bits=16)
        _, style = checker()
        before = pixels(layer, bits=16)
        status, message = run_ns(img, layer, style_source="layer", style_layer=style, output="in-place", size=40)
        after = pixels(layer, bits=16)
        rgb = [v for i, v in enumerate(after) if i % 4 != 3]
        emit(step="run", status=status, message=message, layers=len(img.get_layers()),
             precision=str(img.get_precision()), alpha_equal=after[3::4] == before[3::4],
             changed=sum(abs(a - b) for a, b in zip(after, before)) / len(after),
             multiples_of_257=sum(1 for v in rgb if v % 257 == 0) / len(rgb))
    ''', name="sixteen")
    r = one(records, "run")
    assert r["status"] == "success", r["message"]
    assert r["layers"] == 1 and "U16" in r["precision"]
    assert r["alpha_equal"]
    assert r["changed"] > 1000  # out of 65535
    assert r["multiples_of_257"] < 0.5  # real 16-bit samples, not 8-bit ones widened


def test_rgb_layer_without_alpha_and_a_weights_error(workdir, profile):
    _, records = run_gimp(workdir, profile, '''
        img, layer = make_image(50, 40, alpha=False)
        _, style = checker()
        before = pixels(layer, alpha=False)
        status, message = run_ns(img, layer, style_source="layer", style_layer=style, output="in-place", size=32)
        after = pixels(layer, alpha=False)
        emit(step="run", status=status, message=message, layers=len(img.get_layers()), alpha=layer.has_alpha(),
             size=[layer.get_width(), layer.get_height()], changed=sum(abs(a - b) for a, b in zip(after, before)) / len(after))
        status, message = run_ns(img, layer, style_source="layer", style_layer=style, weights=WORK + "/no-vgg19.pth")
        emit(step="weights", status=status, message=message, layers=len(img.get_layers()))
    ''', name="rgb")
    r = one(records, "run")
    assert r["status"] == "success", r["message"]
    assert r["layers"] == 1 and r["alpha"] is False and r["size"] == [50, 40]  # area 50×40, worked on at 32 px
    assert r["changed"] > 10
    r = one(records, "weights")
    assert r["status"] == "execution-error" and r["layers"] == 1
    assert "no-vgg19.pth" in r["message"] and "Advanced → Weights" in r["message"]


def test_greyscale_and_indexed_images_are_refused_with_a_message(workdir, profile):
    _, records = run_gimp(workdir, profile, '''
        for base, name in ((Gimp.ImageBaseType.GRAY, "grey"), (Gimp.ImageBaseType.INDEXED, "indexed")):
            img, layer = make_image(30, 20, base=base, alpha=False)
            status, message = run_ns(img, layer)
            emit(step=name, status=status, message=message, layers=len(img.get_layers()))
    ''', name="grey")
    for name, word in (("grey", "greyscale"), ("indexed", "indexed")):
        r = one(records, name)
        assert r["status"] == "execution-error" and r["layers"] == 1
        assert f"RGB images and this one is {word}" in r["message"] and "Image → Mode → RGB" in r["message"]


def test_no_service_and_no_interpreter_is_a_clear_error_and_gimp_carries_on(chroot, workdir):
    profile = workdir / "gimp-bare"
    folder = installer.install(profile / "plug-ins")[0]
    (folder / "nst-plugin.json").unlink()
    _, records = run_gimp(workdir, profile, f'''
        settings = {str(folder / "nst-plugin.json")!r}
        img, layer = make_image(30, 20)
        _, style = checker()
        status, message = run_ns(img, layer, style_source="layer", style_layer=style, socket=WORK + "/nobody/nst.sock")
        emit(step="none", status=status, message=message, layers=len(img.get_layers()))
        for python in ("/nonexistent/bin/python3", "/usr/bin/python3"):  # missing; present but without nst_core
            with open(settings, "w") as f:
                json.dump({{"python": python, "socket": WORK + "/nobody/nst.sock"}}, f)
            status, message = run_ns(img, layer, style_source="layer", style_layer=style)
            emit(step=python, status=status, message=message, layers=len(img.get_layers()))
        img2, layer2 = make_image(10, 10)
        layer2.fill(Gimp.FillType.WHITE)
        emit(step="after", layers=len(img2.get_layers()), white=pixels(layer2)[:4] == [255, 255, 255, 255])
    ''', name="noservice")
    r = one(records, "none")
    assert r["status"] == "execution-error" and r["layers"] == 1
    assert f"No Neural Style service answers at {workdir}/nobody/nst.sock" in r["message"]
    assert "no Python interpreter is recorded" in r["message"] and "nst gimp install" in r["message"]
    r = one(records, "/nonexistent/bin/python3")
    assert r["status"] == "execution-error" and r["layers"] == 1
    assert "starting one with /nonexistent/bin/python3 failed" in r["message"] and "nst serve" in r["message"]
    r = one(records, "/usr/bin/python3")
    assert r["status"] == "execution-error" and "No module named nst_core" in r["message"]
    assert one(records, "after") == {"step": "after", "layers": 1, "white": True}


def test_killing_the_plugin_as_gimp_cancels_it_cancels_the_job(workdir, profile, service):
    """GIMP's cancel is SIGKILL of the plug-in's job process (after a 10 ms grace); here a helper kills it."""
    before = jobs_count(service)
    out, records = run_gimp(workdir, profile, f'''
        img, layer = make_image(48, 36)
        _, style = checker()
        helper = subprocess.Popen([sys.executable, HELPER, "kill-when-running", {service.socket_path!r},
                                   {str(profile / "plug-ins" / "neural-style")!r}])
        status, message = run_ns(img, layer, style_source="layer", style_layer=style, iterations=20000)
        helper.wait(30)
        emit(step="killed", status=status, layers=len(img.get_layers()), helper=helper.returncode)
        status, message = run_ns(img, layer, style_source="layer", style_layer=style)
        emit(step="again", status=status, message=message, layers=len(img.get_layers()))
    ''', name="kill")
    r = one(records, "killed")
    assert r["helper"] == 0 and r["status"] != "success" and r["layers"] == 1
    again = one(records, "again")
    assert again["status"] == "success" and again["layers"] == 2, again["message"]
    status = wait_cancelled(service, before)
    assert status["jobs"]["done"] >= before["done"] + 1


# ---- GUI tests (gimp-3.0 under Xvfb) --------------------------------------------------------------


def test_dialog_screenshot_and_last_values(workdir, profile, recorder):
    """Through the dialog (INTERACTIVE) and Filters → Repeat (WITH_LAST_VALS): the service receives the photo."""
    shot = workdir / "dialog.png"
    seen = len(recorder.jobs)
    _, records = run_gimp(workdir, profile, f'''
        img = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(WORK + "/chelsea.png"))
        layer = img.get_layers()[0]
        Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, img, Gio.File.new_for_path(WORK + "/dialog-layer.png"), None)
        Gimp.Display.new(img)
        Gimp.displays_flush()
        def dialog(*helper_args, **args):
            helper = subprocess.Popen([sys.executable, HELPER, *helper_args], stdout=subprocess.PIPE, text=True)
            status, message = run_ns(img, layer, run_mode=Gimp.RunMode.INTERACTIVE, **args)
            seen = json.loads(helper.communicate(timeout=60)[0].strip().splitlines()[-1])
            return status, message, seen
        forget_last_values()
        status, message, seen = dialog("dialog", "escape", {str(shot)!r}, quality="full")
        emit(step="escape", status=status, message=message, dialog=seen, layers=len(img.get_layers()))
        before = pixels(layer, alpha=False)
        status, message, seen = dialog("dialog", "alt+o", style_source="file", output="in-place",
                                       style_file=Gio.File.new_for_path(WORK + "/gravel.png"))
        after = pixels(layer, alpha=False)
        emit(step="ok", status=status, message=message, layers=len(img.get_layers()), changed=after != before)
        Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, img, Gio.File.new_for_path(WORK + "/dialog-after.png"), None)
        # No arguments: GIMP supplies the values of the last interactive run (defaults would need ImageNet weights).
        status, message = run_ns(img, layer, run_mode=Gimp.RunMode.WITH_LAST_VALS, job=False)
        emit(step="last", status=status, message=message, layers=len(img.get_layers()),
             changed=pixels(layer, alpha=False) != after)
    ''', gui=True, name="dialog")
    r = one(records, "escape")
    assert r["dialog"]["title"] == "Neural Style" and r["dialog"]["width"] > 300 and r["dialog"]["height"] > 300
    assert r["status"] == "cancel" and r["layers"] == 1  # Escape closed the dialog; nothing ran
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "gimp-neural-style-dialog.png")
    Image.open(shot).crop((0, 0, r["dialog"]["width"], r["dialog"]["height"])).save(
        ARTIFACTS / "gimp-dialog.png")  # docs/images/gimp-dialog.png is this
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000
    r = one(records, "ok")
    assert r["status"] == "success" and r["layers"] == 1 and r["changed"], r["message"]  # OK ran it, in place
    r = one(records, "last")
    assert r["status"] == "success" and r["layers"] == 1 and r["changed"], r["message"]
    # What the service received, in both run modes: the layer as it was then, and the style file.
    ok_job, last_job = recorder.since(seen)
    for job, layer_file in ((ok_job, "dialog-layer.png"), (last_job, "dialog-after.png")):
        content, style = job.images()
        assert max(content.shape[:2]) == JOB["size"] and max(style.shape[:2]) == JOB["size"]
        assert correlation(content, workdir / layer_file) > 0.9, layer_file
        assert correlation(style, workdir / "gravel.png") > 0.9


def test_one_undo_step_removes_the_result(workdir, profile, recorder):
    """Through the dialog, with previews drawn during the run: the result is still one undo step."""
    seen = len(recorder.jobs)
    _, records = run_gimp(workdir, profile, '''
        img, layer = make_image(96, 64)
        _, style = checker()
        before = pixels(layer)
        Gimp.context_set_feather(True)
        Gimp.context_set_feather_radius(6, 6)
        img.select_rectangle(Gimp.ChannelOps.REPLACE, 20, 10, 50, 40)
        img.clean_all()
        Gimp.Display.new(img)
        Gimp.displays_flush()
        forget_last_values()
        press_ok = subprocess.Popen([sys.executable, HELPER, "dialog", "alt+o"], stdout=subprocess.DEVNULL)
        status, message = run_ns(img, layer, run_mode=Gimp.RunMode.INTERACTIVE, style_source="layer",
                                 style_layer=style, iterations=30)
        press_ok.wait(60)
        emit(step="run", status=status, message=message, layers=len(img.get_layers()), dirty=img.is_dirty(),
             names=[l.get_name() for l in img.get_layers()])
        def press(keys, want_layers):
            subprocess.run([sys.executable, HELPER, "key", keys], check=True, timeout=30)
            deadline = time.time() + 10
            while len(img.get_layers()) != want_layers and time.time() < deadline:
                time.sleep(0.2)
            return len(img.get_layers())
        emit(step="undo", layers=press("ctrl+z", 1), dirty=img.is_dirty(), original=pixels(img.get_layers()[0]) == before)
        emit(step="redo", layers=press("ctrl+y", 2), names=[l.get_name() for l in img.get_layers()])
    ''', gui=True, name="undo")
    r = one(records, "run")
    assert r["status"] == "success" and r["layers"] == 2 and r["dirty"], r["message"]
    assert r["names"] == ["photo (Neural Style, random weights)", "photo"]  # the preview layer is gone
    [job] = recorder.since(seen)
    assert job.previews >= 1 and job.result is not None  # the last step always brings one
    undo = one(records, "undo")
    # One Ctrl+Z takes away the new layer and its pixels, and the image is clean again: one step.
    assert undo == {"step": "undo", "layers": 1, "dirty": False, "original": True}
    redo = one(records, "redo")
    assert redo["layers"] == 2 and "Neural Style" in redo["names"][0]


def test_cancel_in_gimps_progress_bar_cancels_the_job(workdir, profile, service):
    before = jobs_count(service)
    shot = workdir / "progress.png"
    _, records = run_gimp(workdir, profile, f'''
        img, layer = make_image(48, 36)
        _, style = checker()
        Gimp.Display.new(img)
        Gimp.displays_flush()
        helper = subprocess.Popen([sys.executable, HELPER, "click-cancel-when-running", {service.socket_path!r},
                                   {str(profile / "plug-ins" / "neural-style")!r}, {str(shot)!r}])
        t0 = time.time()
        status, message = run_ns(img, layer, style_source="layer", style_layer=style, iterations=20000)
        helper.wait(30)
        emit(step="cancel", status=status, message=message, seconds=time.time() - t0, layers=len(img.get_layers()),
             helper=helper.returncode)
    ''', gui=True, name="cancel")
    r = one(records, "cancel")
    assert r["helper"] == 0
    assert r["status"] == "cancel" and r["layers"] == 1
    wait_cancelled(service, before)
    if shot.exists():
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "gimp-neural-style-progress.png")


def test_previews_on_the_new_layer_and_cancel_leaves_the_image_as_it_was(workdir, profile, service, recorder):
    """Through the dialog at full resolution: the current result shows on the new layer every few
    seconds; GIMP's Cancel then leaves the layers, the undo history and the clean state as they were."""
    before = jobs_count(service)
    seen = len(recorder.jobs)
    shots = [workdir / f"preview-{name}.png" for name in ("before", "first", "later", "after")]
    _, records = run_gimp(workdir, profile, f'''
        W, H = 160, 120
        img = Gimp.Image.new(W, H, Gimp.ImageBaseType.RGB)
        layer = Gimp.Layer.new(img, "photo", W, H, Gimp.ImageType.RGB_IMAGE, 100, Gimp.LayerMode.NORMAL)
        img.insert_layer(layer, None, 0)
        # Green with faint gradients: the screenshots find the canvas by its colour.
        layer.get_buffer().set(Gegl.Rectangle.new(0, 0, W, H), "R'G'B' u8",
                               bytes(v for y in range(H) for x in range(W) for v in (x * 60 // W, 230, y * 60 // H)))
        _, style = checker()
        marker = Gimp.Layer.new(img, "marker", 8, 8, Gimp.ImageType.RGBA_IMAGE, 100, Gimp.LayerMode.NORMAL)
        img.insert_layer(marker, None, 1)  # the last undo step before Neural Style: "add layer"
        img.clean_all()  # as if just saved
        Gimp.Display.new(img)
        Gimp.displays_flush()
        time.sleep(1.0)
        subprocess.run([sys.executable, HELPER, "shot", {str(shots[0])!r}], check=True, timeout=30)
        names = [l.get_name() for l in img.get_layers()]
        forget_last_values()
        press_ok = subprocess.Popen([sys.executable, HELPER, "dialog", "alt+o"], stdout=subprocess.DEVNULL)
        canceller = subprocess.Popen([sys.executable, HELPER, "click-cancel-when-running", {service.socket_path!r},
                                      {str(profile / "plug-ins" / "neural-style")!r}, {str(shots[1])!r},
                                      {str(shots[2])!r}])
        status, message = run_ns(img, layer, run_mode=Gimp.RunMode.INTERACTIVE, style_source="layer",
                                 style_layer=style, size=0, iterations=20000)
        press_ok.wait(60)
        canceller.wait(60)
        time.sleep(1.0)
        subprocess.run([sys.executable, HELPER, "shot", {str(shots[3])!r}], check=True, timeout=30)
        emit(step="cancel", status=status, message=message, helper=canceller.returncode, names_before=names,
             names=[l.get_name() for l in img.get_layers()], dirty=img.is_dirty(), undo=img.undo_is_enabled())
        def press(keys, want_layers):
            subprocess.run([sys.executable, HELPER, "key", keys], check=True, timeout=30)
            deadline = time.time() + 10
            while len(img.get_layers()) != want_layers and time.time() < deadline:
                time.sleep(0.2)
            return [l.get_name() for l in img.get_layers()]
        emit(step="undo", names=press("ctrl+z", 1), dirty=img.is_dirty())
        emit(step="redo", names=press("ctrl+y", 2))
    ''', gui=True, name="previews")
    r = one(records, "cancel")
    assert r["helper"] == 0 and r["status"] == "cancel", r["message"]
    assert r["names"] == r["names_before"] == ["photo", "marker"]  # no preview layer left behind
    assert not r["dirty"] and r["undo"]  # still "saved"; undo works again
    # The last undo step is still the marker's: one Ctrl+Z removes it (which GIMP counts as a change
    # since the save, as it would have without Neural Style).
    assert one(records, "undo") == {"step": "undo", "names": ["photo"], "dirty": True}
    assert one(records, "redo")["names"] == ["photo", "marker"]
    wait_cancelled(service, before)
    ARTIFACTS.mkdir(exist_ok=True)
    for shot in shots:
        shutil.copy(shot, ARTIFACTS / f"gimp-neural-style-{shot.name}")
    [job] = recorder.since(seen)
    assert job.header["params"]["size"] == 160 and job.header["preview"]["max_side"] == 160  # full resolution
    assert job.previews >= 2
    before_shot, first, later, after = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in shots)
    green = (before_shot[..., 1] > 200) & (before_shot[..., 0] < 80) & (before_shot[..., 2] < 80)
    rows, cols = np.nonzero(green.sum(1) >= 150)[0], np.nonzero(green.sum(0) >= 100)[0]  # not the thumbnails
    canvas = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    assert green[canvas].sum() > 0.95 * 160 * 120  # the photo, shown at 100 %

    def change(a, b):
        return float(np.abs(a - b)[canvas].mean())
    assert change(first, before_shot) > 30  # a preview is on the canvas, not the photo
    assert change(later, first) > 3  # … and a newer one replaced it during the run
    assert change(after, before_shot) < 1  # after Cancel the canvas shows the photo again


# ---- chroot-side pieces -------------------------------------------------------------------------

GUI_SH = r'''
# usage: gui.sh WORKDIR SCRIPT: Xvfb on a free display, then gimp-3.0 running SCRIPT in batch mode.
W=$1; SCRIPT=$2
rm -f "$W/display"
Xvfb -displayfd 3 -screen 0 1280x800x24 -nolisten tcp 3>"$W/display" 2>"$W/xvfb.log" &
XPID=$!
for i in $(seq 100); do [ -s "$W/display" ] && break; sleep 0.1; done
export DISPLAY=":$(cat "$W/display")" GDK_CORE_DEVICE_EVENTS=1   # GDK takes synthetic core events
gimp-3.0 -n -d -f -s --batch-interpreter python-fu-eval -b - --quit < "$SCRIPT"
rc=$?
kill $XPID
exit $rc
'''

HELPER = r'''
"""Runs inside the chroot: synthetic X11 input for GIMP (libX11 via ctypes) and job watching."""
import ctypes, json, os, signal, subprocess, sys, time

_X_ERROR_HANDLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_ignore_x_error = _X_ERROR_HANDLER(lambda display, event: 0)

def x11():
    X = ctypes.CDLL("libX11.so.6")
    X.XOpenDisplay.restype = ctypes.c_void_p
    X.XDefaultRootWindow.restype = ctypes.c_ulong
    X.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
    X.XQueryTree.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.c_ulong),
                             ctypes.POINTER(ctypes.POINTER(ctypes.c_ulong)), ctypes.POINTER(ctypes.c_uint)]
    X.XFetchName.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_char_p)]
    X.XGetWindowAttributes.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p]
    X.XKeysymToKeycode.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
    X.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    X.XWarpPointer.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int, ctypes.c_int,
                               ctypes.c_uint, ctypes.c_uint, ctypes.c_int, ctypes.c_int]
    X.XFlush.argtypes = [ctypes.c_void_p]
    # Xlib's default handler exits on any error: a window that closes while we list the windows (the
    # previous dialog) would end this helper with BadWindow, and nobody would press the key.
    X.XSetErrorHandler.argtypes = [_X_ERROR_HANDLER]
    X.XSetErrorHandler(_ignore_x_error)
    d = X.XOpenDisplay(None)
    assert d, "cannot open the X display"
    return X, d, X.XDefaultRootWindow(d)

class Attrs(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("width", ctypes.c_int), ("height", ctypes.c_int),
                ("border_width", ctypes.c_int), ("depth", ctypes.c_int), ("visual", ctypes.c_void_p), ("root", ctypes.c_ulong),
                ("class_", ctypes.c_int), ("bit_gravity", ctypes.c_int), ("win_gravity", ctypes.c_int),
                ("backing_store", ctypes.c_int), ("backing_planes", ctypes.c_ulong), ("backing_pixel", ctypes.c_ulong),
                ("save_under", ctypes.c_int), ("colormap", ctypes.c_ulong), ("map_installed", ctypes.c_int),
                ("map_state", ctypes.c_int), ("all_event_masks", ctypes.c_long), ("your_event_mask", ctypes.c_long),
                ("do_not_propagate_mask", ctypes.c_long), ("override_redirect", ctypes.c_int), ("screen", ctypes.c_void_p)]

class Event(ctypes.Structure):  # XKeyEvent and XButtonEvent share this layout; padded to sizeof(XEvent)
    _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int), ("display", ctypes.c_void_p),
                ("window", ctypes.c_ulong), ("root", ctypes.c_ulong), ("subwindow", ctypes.c_ulong), ("time", ctypes.c_ulong),
                ("x", ctypes.c_int), ("y", ctypes.c_int), ("x_root", ctypes.c_int), ("y_root", ctypes.c_int),
                ("state", ctypes.c_uint), ("detail", ctypes.c_uint), ("same_screen", ctypes.c_int), ("pad", ctypes.c_char * 128)]

def windows():
    """Mapped top-level windows: dicts with id, title (None for non-Latin-1 titles), geometry."""
    X, d, root = x11()
    r, p, n = ctypes.c_ulong(), ctypes.c_ulong(), ctypes.c_uint()
    children = ctypes.POINTER(ctypes.c_ulong)()
    X.XQueryTree(d, root, ctypes.byref(r), ctypes.byref(p), ctypes.byref(children), ctypes.byref(n))
    found = []
    for i in range(n.value):
        a, name = Attrs(), ctypes.c_char_p()
        if not X.XGetWindowAttributes(d, children[i], ctypes.byref(a)):
            continue  # gone since XQueryTree
        title = name.value.decode("latin-1") if X.XFetchName(d, children[i], ctypes.byref(name)) and name.value else None
        if a.map_state == 2:
            found.append({"id": children[i], "title": title, "x": a.x, "y": a.y, "width": a.width, "height": a.height})
    return found

def main_window():
    """GIMP's image window: the largest mapped one (its UTF-8 title has no Latin-1 WM_NAME)."""
    return max(windows(), key=lambda w: w["width"] * w["height"])

def send(win, kind, detail, x=10, y=10, state=0):
    X, d, root = x11()
    mask = {2: 1, 3: 2, 4: 4, 5: 8}[kind]  # KeyPress/KeyRelease/ButtonPress/ButtonRelease masks
    ev = Event(type=kind, display=d, window=win["id"], root=root, x=x, y=y, x_root=win["x"] + x, y_root=win["y"] + y,
               state=state, detail=detail, same_screen=1)
    assert X.XSendEvent(d, win["id"], 1, mask, ctypes.byref(ev))
    X.XFlush(d)

def key(win, spec):
    X, d, _ = x11()
    *mods, name = spec.split("+")
    state = 4 if "ctrl" in mods else 0
    state |= 1 if "shift" in mods else 0
    state |= 8 if "alt" in mods else 0
    code = X.XKeysymToKeycode(d, {"z": 0x7A, "y": 0x79, "o": 0x6F, "escape": 0xFF1B}[name])
    send(win, 2, code, state=state)
    send(win, 3, code, state=state)

def click(win, x, y):
    X, d, root = x11()
    X.XWarpPointer(d, 0, root, 0, 0, 0, 0, win["x"] + x, win["y"] + y)  # real pointer motion: GTK sees it enter
    X.XFlush(d)
    time.sleep(0.5)
    send(win, 4, 1, x, y)
    time.sleep(0.1)
    send(win, 5, 1, x, y, state=256)

def screenshot(path):
    subprocess.run(f"xwd -root | xwdtopnm 2>/dev/null | pnmtopng > '{path}'", shell=True, check=True)

def wait_running(socket_path, plugin_dir, timeout=120):
    """Until the service runs the plug-in's job and has made a step."""
    sys.path.insert(0, plugin_dir)
    import nst_client
    client = nst_client.ServiceClient(socket_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        for w in client.status()["workers"]:
            job = w.get("running")
            if job and job.get("client") == "gimp-neural-style" and job.get("step", 0) >= 1:
                return
        time.sleep(0.2)
    raise SystemExit("the plug-in's job never ran")

def plugin_pid():
    """The job's process: Neural Style… runs its job in a second, younger process of the plug-in."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                started = int(f.read().rsplit(")", 1)[1].split()[19])
        except OSError:
            continue
        if any(a.endswith(b"neural-style/neural-style.py") for a in argv) and b"-run" in argv:
            found.append((started, int(pid)))
    if not found:
        raise SystemExit("no running neural-style plug-in process")
    return max(found)[1]

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "key":
        key(main_window(), sys.argv[2])
    elif cmd == "kill-when-running":
        wait_running(sys.argv[2], sys.argv[3])
        os.kill(plugin_pid(), signal.SIGKILL)  # what GIMP 3.0 does on cancel (gimp_plug_in_close)
    elif cmd == "click-cancel-when-running":  # SOCKET PLUGIN_DIR SHOT...: shots 1 s in, then every 4 s
        wait_running(sys.argv[2], sys.argv[3])
        for i, shot in enumerate(sys.argv[4:]):
            time.sleep(4.0 if i else 1.0)
            screenshot(shot)
        win = main_window()
        # The status bar's Cancel button (shown while a plug-in reports progress), in GIMP 3.0.4's default
        # single-window layout on a fresh profile: 283 px left of the window's right edge, 18 px up.
        click(win, win["width"] - 283, win["height"] - 18)
    elif cmd == "shot":
        screenshot(sys.argv[2])
    elif cmd == "dialog":  # dialog KEY [SCREENSHOT]: wait for the dialog, (shoot it,) press KEY in it
        deadline = time.time() + 60
        while time.time() < deadline:
            dialogs = [w for w in windows() if w["title"] == "Neural Style"]
            if dialogs:
                break
            time.sleep(0.3)
        else:
            raise SystemExit("the Neural Style dialog did not appear")
        time.sleep(2.0)  # let it draw
        if len(sys.argv) > 3:
            screenshot(sys.argv[3])
        key(dialogs[0], sys.argv[2])
        print(json.dumps({k: dialogs[0][k] for k in ("title", "width", "height")}))
'''
