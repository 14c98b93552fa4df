"""nst_core.weights with real files, a real HTTP server on 127.0.0.1 and real calibration runs.

ImageNet weights are never available here, so the code paths for them run on a VGG-19-shaped
state dict written by the tests (torchvision's key layout, with a small stand-in classifier).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch

from nst_core.errors import WeightsError
from nst_core.params import FEATURE_LAYERS
from nst_core.vgg import conv_names, state_dict_key
from nst_core import weights as W

CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}


@functools.lru_cache(maxsize=4)
def vgg_state(seed: int, classifier: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors in torchvision's vgg19 layout; the classifier is small but keyed as there.

    Cached: callers must not modify the tensors.
    """
    g = torch.Generator().manual_seed(seed)
    sd, cin = {}, 3
    for name in conv_names("relu5_4"):
        cout = CHANNELS[int(name[4])]
        sd[f"{state_dict_key(name)}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        sd[f"{state_dict_key(name)}.bias"] = torch.randn(cout, generator=g) * 0.01
        cin = cout
    if classifier:
        for i, shape in ((0, (32, 64)), (3, (32, 32)), (6, (10, 32))):
            sd[f"classifier.{i}.weight"] = torch.randn(shape, generator=g)
            sd[f"classifier.{i}.bias"] = torch.randn(shape[0], generator=g)
    return sd


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "vgg19-test.pth"
    torch.save(vgg_state(1), path)
    return path


@pytest.fixture(scope="module")
def random_cache(tmp_path_factory) -> Path:
    """An NST cache shared by the tests that load random weights, so each calibration runs once."""
    return tmp_path_factory.mktemp("random-cache")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NST_CACHE_DIR", str(tmp_path / "nst-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("NST_WEIGHTS", raising=False)
    monkeypatch.delenv("NST_WEIGHTS_URL", raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a folder; yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def assert_convs_equal(net, sd, n=None):
    names = conv_names(net.last)
    assert len(names) == (n if n is not None else len(names))
    for conv in names:
        key = state_dict_key(conv)
        assert torch.equal(net.state_dict()[f"{key}.weight"], sd[f"{key}.weight"]), conv
        assert torch.equal(net.state_dict()[f"{key}.bias"], sd[f"{key}.bias"]), conv


# ---- files ----------------------------------------------------------------------------------------

def test_explicit_path_loads_convolutions_only(vgg_file):
    net = W.load_network(str(vgg_file))
    sd = vgg_state(1)
    assert_convs_equal(net, sd, 16)
    keys = set(net.state_dict())
    assert not any(k.startswith("classifier") for k in keys)
    assert len(keys) == 32
    assert sum(p.numel() for p in net.parameters()) == sum(v.numel() for k, v in sd.items() if k.startswith("features"))
    assert net.weights_label == str(vgg_file)
    assert net.is_random is False and net.normalized is False
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_truncated_to_last(vgg_file):
    net = W.load_network(str(vgg_file), last="relu2_1", pooling="max")
    assert list(net.convs()) == ["conv1_1", "conv1_2", "conv2_1"]
    assert net.names[-1] == "relu2_1" and len(net.state_dict()) == 6
    assert isinstance(net.features[4], torch.nn.MaxPool2d)
    assert_convs_equal(net, vgg_state(1), 3)


def test_features_only_and_unprefixed_keys(tmp_path):
    sd = vgg_state(2, classifier=False)
    path = tmp_path / "bare.pth"
    torch.save({k.removeprefix("features."): v.half() for k, v in sd.items()}, path)
    net = W.load_network(path, last="relu1_2")
    assert torch.equal(net.state_dict()["features.2.weight"], sd["features.2.weight"].half().float())


def test_nst_weights_environment_variable(vgg_file, monkeypatch, tmp_path):
    monkeypatch.setenv("NST_WEIGHTS", str(vgg_file))
    net = W.load_network("imagenet", last="relu1_1")
    assert_convs_equal(net, vgg_state(1), 1)
    assert net.weights_label == str(vgg_file)
    monkeypatch.setenv("NST_WEIGHTS", str(tmp_path / "gone.pth"))
    with pytest.raises(WeightsError, match="gone.pth"):
        W.load_network("imagenet")


@pytest.mark.parametrize("content", [b"this is not a torch file", None], ids=["garbage", "truncated"])
def test_corrupt_file_names_it(vgg_file, tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content if content is not None else vgg_file.read_bytes()[: vgg_file.stat().st_size // 2])
    with pytest.raises(WeightsError) as e:
        W.load_network(str(path))
    assert str(path) in e.value.message and e.value.exit_code == 2


def test_missing_key_and_wrong_shape_named(tmp_path):
    sd = vgg_state(3)
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in sd.items() if k != "features.10.weight"}, missing)
    with pytest.raises(WeightsError) as e:
        W.load_network(str(missing), last="relu1_1")  # validation covers all 16 convolutions
    assert str(missing) in e.value.message and "features.10.weight" in e.value.message
    shape = tmp_path / "shape.pth"
    torch.save({**sd, "features.2.bias": torch.zeros(65)}, shape)
    with pytest.raises(WeightsError, match=r"shape\.pth: features\.2\.bias has shape \(65,\)"):
        W.load_network(str(shape))


def test_bad_names():
    with pytest.raises(WeightsError, match="no such weights file"):
        W.load_network("/nonexistent/vgg.pth")
    with pytest.raises(WeightsError, match="random:SEED"):
        W.load_network("random:abc")


# ---- ImageNet: hub cache, download, offline -------------------------------------------------------

def test_default_source_is_torchvisions_file():
    from torchvision.models import VGG19_Weights

    assert W.imagenet_url() == VGG19_Weights.IMAGENET1K_V1.url
    assert W.imagenet_file_name() == (W.IMAGENET_FILE, "dcbb9e9d")
    assert W.hub_cache_path() == Path(torch.hub.get_dir()) / "checkpoints" / "vgg19-dcbb9e9d.pth"
    assert str(W.hub_cache_path()).startswith(os.environ["TORCH_HOME"])


def test_hub_cache_checked_once_by_hash(vgg_file, monkeypatch, tmp_path):
    name = f"vgg19-{sha256(vgg_file)[:8]}.pth"
    monkeypatch.setenv("NST_WEIGHTS_URL", f"http://127.0.0.1:{closed_port()}/{name}")
    cached = W.hub_cache_path()
    assert cached.name == name
    cached.parent.mkdir(parents=True)
    shutil.copyfile(vgg_file, cached)
    net = W.load_network("imagenet", last="relu1_2")
    assert net.weights_label == f"imagenet ({name})" and not net.is_random
    assert_convs_equal(net, vgg_state(1), 2)
    # The hash is remembered by (path, size, mtime): same size and mtime → not hashed again ...
    st = cached.stat()
    other = tmp_path / vgg_file.name  # torch.save names the archive after the file: same name, same size
    torch.save(vgg_state(4), other)
    shutil.copyfile(other, cached)
    assert cached.stat().st_size == st.st_size
    os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert_convs_equal(W.load_network("imagenet", last="relu1_1"), vgg_state(4), 1)
    # ... a new mtime → hashed again, and the mismatch is found.
    os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(WeightsError, match=f"{name}: SHA-256 .* does not start with {name[6:14]}"):
        W.load_network("imagenet")


def test_damaged_file_under_torchvisions_name_is_refused(vgg_file):
    cached = W.hub_cache_path()
    cached.parent.mkdir(parents=True)
    shutil.copyfile(vgg_file, cached)
    with pytest.raises(WeightsError, match="vgg19-dcbb9e9d.pth: SHA-256 .* does not start with dcbb9e9d"):
        W.load_network("imagenet")


def test_download_lands_in_hub_cache(vgg_file, http_dir, monkeypatch, capsys):
    root, base = http_dir
    name = f"vgg19-{sha256(vgg_file)[:8]}.pth"
    shutil.copyfile(vgg_file, root / name)
    monkeypatch.setenv("NST_WEIGHTS_URL", f"{base}/{name}")
    calls = []
    net = W.load_network("imagenet", last="relu1_1", progress=lambda done, total: calls.append((done, total)))
    cached = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / name
    assert cached.read_bytes() == vgg_file.read_bytes()
    assert calls[-1] == (vgg_file.stat().st_size,) * 2
    assert net.weights_label == f"imagenet ({name})"
    assert [p.name for p in cached.parent.iterdir()] == [name]
    # progress=True draws a bar on stderr
    cached.unlink()
    W.load_network("imagenet", last="relu1_1", progress=True)
    err = capsys.readouterr().err
    assert f"Downloading {name}" in err and "(100%)" in err


def test_download_with_wrong_hash_keeps_nothing(vgg_file, http_dir, monkeypatch):
    root, base = http_dir
    actual = sha256(vgg_file)
    wrong = ("1" if actual[0] == "0" else "0") + actual[1:8]
    name = f"vgg19-{wrong}.pth"
    shutil.copyfile(vgg_file, root / name)
    monkeypatch.setenv("NST_WEIGHTS_URL", f"{base}/{name}")
    with pytest.raises(WeightsError) as e:
        W.load_network("imagenet", progress=True)
    assert f"does not start with {wrong}" in e.value.message and name in e.value.message
    checkpoints = W.hub_cache_path().parent
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []


@pytest.mark.parametrize("where", ["closed port", "404"])
def test_offline_says_what_to_fetch_and_where(http_dir, monkeypatch, where):
    base = f"http://127.0.0.1:{closed_port()}" if where == "closed port" else http_dir[1]
    url = f"{base}/models/vgg19-dcbb9e9d.pth"
    monkeypatch.setenv("NST_WEIGHTS_URL", url)
    with pytest.raises(WeightsError) as e:
        W.load_network("imagenet")
    msg = e.value.message
    expected_cache = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    assert "vgg19-dcbb9e9d.pth" in msg and url in msg and str(expected_cache) in msg
    assert "NST_WEIGHTS" in msg and "--weights PATH" in msg
    assert e.value.exit_code == 2
    assert not expected_cache.parent.exists() or list(expected_cache.parent.iterdir()) == []


def test_url_without_hash_is_refused(monkeypatch):
    monkeypatch.setenv("NST_WEIGHTS_URL", f"http://127.0.0.1:{closed_port()}/vgg19.pth")
    with pytest.raises(WeightsError, match="must name a file like vgg19-"):
        W.load_network("imagenet")


# ---- random and normalised ------------------------------------------------------------------------

def relu_and_conv_means(net, images, upto="relu5_4"):
    layers = [n for n in FEATURE_LAYERS if FEATURE_LAYERS.index(n) <= FEATURE_LAYERS.index(upto)]
    with torch.no_grad():
        out = net(images, layers)
    for relu in (n for n in layers if n.startswith("relu")):
        conv = "conv" + relu[4:]
        yield relu, out[relu].mean(dim=(0, 2, 3)), out[conv].abs().mean(dim=(0, 2, 3))


def assert_normalised(net, upto="relu5_4"):
    """Every live filter has mean activation 1, except the rare ones whose scale was capped (mean < 1)."""
    exact = total = 0
    for relu, mean, magnitude in relu_and_conv_means(net, W.calibration_images(), upto):
        dead = mean <= W.DEAD_RATIO * magnitude
        assert (mean[dead] <= 1e-4 * magnitude[dead]).all()
        live = mean[~dead]
        capped = live < 1 - 1e-3
        assert torch.allclose(live[~capped], torch.ones(()), atol=1e-3), relu
        exact += int((~capped).sum())
        total += mean.numel()
    assert exact > 0.7 * total  # measured: 78% of the random network's filters exactly 1, the rest capped or dead


def test_scales_are_capped_at_ten_times_the_layer_median():
    scales = W.compute_scales(W.random_state_dict(0), "avg", W.calibration_images())
    capped_layers = 0
    for name, s in scales.items():
        cap = W.MAX_SCALE_OVER_MEDIAN * s[s != 1].median()
        assert float(s.max()) <= float(cap) * (1 + 1e-6), name
        capped_layers += int(bool((s >= cap * (1 - 1e-6)).any()))
    assert capped_layers > 0  # the random network has rarely firing filters: the cap is exercised


def test_random_is_deterministic_and_seeded(random_cache, monkeypatch, tmp_path):
    assert torch.equal(W.random_state_dict(0)["features.34.weight"], W.random_state_dict(0)["features.34.weight"])
    monkeypatch.setenv("NST_CACHE_DIR", str(random_cache))
    a = W.load_network("random")
    monkeypatch.setenv("NST_CACHE_DIR", str(tmp_path / "fresh"))  # calibrated again, from scratch
    b = W.load_network("random:0")
    assert a.is_random and a.normalized
    assert a.weights_label == b.weights_label == "random (seed 0, normalised)"
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    c = W.load_network("random:1", last="relu1_1")
    assert c.weights_label == "random (seed 1, normalised)"
    assert not torch.equal(c.state_dict()["features.0.weight"], a.state_dict()["features.0.weight"])


def test_random_is_normalised(random_cache, monkeypatch):
    monkeypatch.setenv("NST_CACHE_DIR", str(random_cache))
    assert_normalised(W.load_network("random", normalize=False))  # random is always normalised


def test_scales_do_not_depend_on_last(random_cache, monkeypatch):
    monkeypatch.setenv("NST_CACHE_DIR", str(random_cache))
    full = W.load_network("random").state_dict()
    short = W.load_network("random", last="relu2_1").state_dict()
    assert len(short) == 6 and all(torch.equal(v, full[k]) for k, v in short.items())


def test_calibration_depends_on_pooling(random_cache, monkeypatch):
    monkeypatch.setenv("NST_CACHE_DIR", str(random_cache))
    avg = W.load_network("random").state_dict()
    net = W.load_network("random", pooling="max")
    assert_normalised(net, upto="relu1_2")
    mx = net.state_dict()
    assert torch.equal(avg["features.0.weight"], mx["features.0.weight"])  # before any pooling
    assert not torch.allclose(avg["features.5.weight"], mx["features.5.weight"])
    # names: <key>-<pooling>-<calibration>-<method>.pt
    assert {p.name.rsplit("-", 3)[1] for p in (random_cache / "scales").glob("random-0-*")} == {"avg", "max"}


def test_normalised_file_keeps_features_up_to_channel_scale_and_caches_scales(vgg_file):
    plain = W.load_network(str(vgg_file))
    net = W.load_network(str(vgg_file), normalize=True)
    assert net.weights_label == f"{vgg_file} (normalised)" and net.normalized and not net.is_random
    assert_normalised(net, upto="relu1_2")
    # The same features as the plain network, each channel multiplied by its filter's scale.
    image = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(5))
    layers = ["relu1_1", "relu3_2", "relu5_4"]
    with torch.no_grad():
        a, b = plain(image, layers), net(image, layers)
    files = list((Path(os.environ["NST_CACHE_DIR"]) / "scales").iterdir())
    assert len(files) == 1 and files[0].name.startswith(sha256(vgg_file)[:40] + "-avg-")
    scales = torch.load(files[0], weights_only=True)["scales"]
    for layer in layers:
        s = scales["conv" + layer[4:]].view(1, -1, 1, 1)
        assert torch.allclose(b[layer], a[layer] * s, rtol=1e-3, atol=1e-4 * float(b[layer].abs().max())), layer
    # A second load reuses the cached scales: rewrite them and see the network follow.
    mtime = files[0].stat().st_mtime_ns
    W.load_network(str(vgg_file), normalize=True, last="relu1_1")
    assert files[0].stat().st_mtime_ns == mtime
    torch.save({"scales": {k: v * 2 for k, v in scales.items()}}, files[0])
    doubled = W.load_network(str(vgg_file), normalize=True, last="relu1_1")
    assert torch.allclose(doubled.state_dict()["features.0.weight"], net.state_dict()["features.0.weight"] * 2)


def test_scales_cached_by_another_method_are_not_reused(monkeypatch, tmp_path):
    """Scales written before a change of calibration method must not be read back after it."""
    monkeypatch.setenv("NST_CACHE_DIR", str(tmp_path))
    W.load_network("random")
    (first,) = (tmp_path / "scales").iterdir()
    assert W.SCALES_METHOD in first.name
    monkeypatch.setattr(W, "SCALES_METHOD", "v-test")
    W.load_network("random")
    names = sorted(p.name for p in (tmp_path / "scales").iterdir())
    assert len(names) == 2 and any("v-test" in n for n in names)
