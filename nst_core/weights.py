"""VGG-19 weights: ImageNet (found or fetched, hash-checked), a state dict file, or seeded random.

`load_network` is the one entry point. Where things live:

- ImageNet weights (torchvision's ``IMAGENET1K_V1``, ``vgg19-dcbb9e9d.pth``) are looked for in
  this order: ``weights`` as a path → ``$NST_WEIGHTS`` → the torch hub cache
  (``torch.hub.get_dir()/checkpoints``) → a download into that cache. ``$NST_WEIGHTS_URL``
  replaces the download URL (mirrors, tests). As in torch hub, the cached file is named after the
  URL's last path component, and the hex digits after its last ``-`` are the expected prefix of
  the file's SHA-256; so a mirror or test serving another file names its own hash, and never
  lands under torchvision's name. Files found via a path or ``$NST_WEIGHTS`` are the user's
  choice: they are checked for structure, not hash.
- Our own cache (``$NST_CACHE_DIR``, else ``$XDG_CACHE_HOME/nst``, else ``~/.cache/nst``) holds
  ``sha256.json``, the SHA-256 of files already hashed keyed by (path, size, mtime_ns), so a
  548 MB file is hashed once, not at every start (a change that keeps both size and mtime goes
  unnoticed: this guards against damage, not tampering), and ``scales/``, the normalisation
  scales per weights file, pooling and calibration set.

Normalisation (the paper's normalised network; the default, and always applied to random
weights) is `nst_core.normalization`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import torch

from .errors import ParamError, WeightsError
from .outputs import atomic_write
from .params import POOLINGS, VGG19_LAYERS, StyleParams
from .normalization import apply_scales, normalization_scales
from .vgg import VGGFeatures, conv_names, state_dict_key, state_dict_shapes

_DEFAULTS = StyleParams()  # pooling and normalisation when a caller gives none

IMAGENET_FILE = "vgg19-dcbb9e9d.pth"
DOWNLOAD_TIMEOUT = 30.0  # seconds without data before a download counts as failed
RANDOM_INIT = "kaiming-normal-v1"  # part of the scales cache key for random weights

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^-]*$")


# ---- the entry point ----------------------------------------------------------------------------

def load_network(weights: str, *, pooling: str = _DEFAULTS.pooling, normalize: bool = _DEFAULTS.normalize_network,
                 last: str = "relu5_4", device: torch.device | str = "cpu", progress: bool | Callable = False) -> VGGFeatures:
    """VGG-19 up to `last` on `device`, eval mode, frozen; `weights`: imagenet, random[:SEED] or a path.

    The result has ``weights_label`` (for people and result notes), ``is_random`` and
    ``normalized``. `progress` applies to a download: True draws a bar on stderr, a callable gets
    ``(bytes_done, bytes_total_or_None)``.
    """
    if pooling not in POOLINGS:
        raise ParamError("pooling", f"must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if last not in VGG19_LAYERS:
        raise ParamError("last", f"unknown VGG-19 layer {last!r}")
    weights = os.fspath(weights)
    device = torch.device(device)
    seed = _random_seed(weights)
    if seed is not None:
        state = random_state_dict(seed)
        normalize = True
        key = f"random-{seed}-{RANDOM_INIT}"
        name, details = "random", [f"seed {seed}"]
    else:
        path, name, details = _locate(weights, progress)
        state = read_state_dict(path, "relu5_4" if normalize else last)
        key = file_sha256(path) if normalize else ""
    if normalize:
        state = apply_scales(state, normalization_scales(state, pooling, key, cache_dir() / "scales", device))
        details.append("normalised")
    net = VGGFeatures(pooling, last)
    net.load_state_dict({k: state[k] for k in net.state_dict()})
    del state  # the convolutions beyond `last` go here
    net.weights_label = name + (f" ({', '.join(details)})" if details else "")
    net.is_random = seed is not None
    net.normalized = normalize
    return net.to(device).eval().requires_grad_(False)


def _random_seed(weights: str) -> int | None:
    if weights == "random":
        return 0
    if weights.startswith("random:"):
        text = weights[len("random:"):]
        if not text.isdigit() or int(text) >= 2**63:
            raise WeightsError(f"weights {weights!r}: random:SEED needs a whole number 0 … 2^63-1")
        return int(text)
    return None


# ---- finding files ------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Neural Style's cache: $NST_CACHE_DIR, else $XDG_CACHE_HOME/nst, else ~/.cache/nst."""
    if os.environ.get("NST_CACHE_DIR"):
        return Path(os.environ["NST_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nst"


def imagenet_url() -> str:
    """$NST_WEIGHTS_URL, or torchvision's URL for VGG-19 IMAGENET1K_V1."""
    url = os.environ.get("NST_WEIGHTS_URL")
    if url:
        return url
    from torchvision.models import VGG19_Weights

    return VGG19_Weights.IMAGENET1K_V1.url


def imagenet_file_name(url: str | None = None) -> tuple[str, str]:
    """(file name, expected SHA-256 prefix) from the URL, torch hub's convention."""
    url = url or imagenet_url()
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    m = _HASH_IN_NAME.search(name)
    if not m:
        raise WeightsError(
            f"download URL {url} must name a file like vgg19-<first 8+ hex digits of its SHA-256>.pth "
            f"(torch hub's convention), so that it can be verified"
        )
    return name, m.group(1)


def hub_cache_path(url: str | None = None) -> Path:
    """Where the ImageNet file is looked for and downloaded to: torch hub's checkpoints folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / imagenet_file_name(url)[0]


def _locate(weights: str, progress) -> tuple[Path, str, list[str]]:
    """(file to load, label, label details) for a path or imagenet; downloads where needed."""
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: no such weights file (weights are imagenet, random, random:SEED or a path)")
        return path, str(path), []
    env = os.environ.get("NST_WEIGHTS")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise WeightsError(f"NST_WEIGHTS={env}: no such file")
        return path, str(path), []
    url = imagenet_url()
    name, expected = imagenet_file_name(url)
    path = hub_cache_path(url)
    if path.is_file():
        actual = file_sha256(path)
        if not actual.startswith(expected):
            raise WeightsError(
                f"{path}: SHA-256 {actual[:16]}… does not start with {expected}, so the file is damaged or "
                f"not the expected weights. Delete it to have it downloaded again from {url}."
            )
        return path, "imagenet", [name]
    try:
        download(url, path, expected, progress)
    except WeightsError as e:
        raise WeightsError(_where_to_get(url, path, e.message)) from None
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
        raise WeightsError(_where_to_get(url, path, f"download failed: {e}")) from None
    return path, "imagenet", [name]


def _where_to_get(url: str, path: Path, reason: str) -> str:
    return (
        f"ImageNet VGG-19 weights are not available: {reason}\n"
        f"Fetch {path.name} from {url}\n"
        f"and put it at {path}, or anywhere and pass --weights PATH or set NST_WEIGHTS=PATH."
    )


def download(url: str, dest: Path, sha256_prefix: str, progress: bool | Callable = False) -> None:
    """Fetch `url` into `dest` (outputs.atomic_write: a temporary file in the same folder), renamed
    only once verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    report, done = None, 0

    def fetch(f) -> None:
        nonlocal report, done
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r:
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            report = _progress_reporter(progress, dest.name, total)
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                report(done)
        report(done, final=True)
        if total is not None and done != total:
            raise WeightsError(f"download incomplete ({done} of {total} bytes)")
        actual = digest.hexdigest()
        if not actual.startswith(sha256_prefix):
            raise WeightsError(
                f"the downloaded file's SHA-256 {actual[:16]}… does not start with {sha256_prefix}; nothing was kept"
            )

    try:
        atomic_write(dest, fetch)
    except BaseException:
        if report is not None:
            report(done, final=True)  # end the progress line before the error is shown
        raise
    _remember_sha256(dest, digest.hexdigest())


def _progress_reporter(progress, name: str, total: int | None):
    """A callable(done, final=False): the caller's callback, nothing, or a bar on stderr.

    On a terminal the bar redraws in place (at most 5 times a second); elsewhere (logs, the
    journal) it prints a line at every 10%.
    """
    if callable(progress):
        return lambda done, final=False: None if final else progress(done, total)
    if not progress:
        return lambda done, final=False: None
    tty = sys.stderr.isatty()
    state = {"t": 0.0, "step": -1, "ended": False}

    def bar(done: int, final: bool = False) -> None:
        if state["ended"]:
            return
        now, step = time.monotonic(), (10 * done // total if total else done // 50_000_000)
        again = now - state["t"] < 0.2 if tty else step == state["step"]
        state.update(ended=final)
        if again and not (final and tty):
            return
        state.update(t=now, step=step)
        line = f"Downloading {name}: {done / 1e6:.0f}"
        line += f"/{total / 1e6:.0f} MB ({100 * done // total}%)" if total else " MB"
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if tty else line + "\n")
        sys.stderr.flush()

    return bar


# ---- hashing, remembered ------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    """The file's SHA-256, remembered in the cache by (path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = _read_memo()
    hit = memo.get(str(path))
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    _remember_sha256(path, digest.hexdigest(), st)
    return digest.hexdigest()


def _memo_path() -> Path:
    return cache_dir() / "sha256.json"


def _read_memo() -> dict:
    try:
        data = json.loads(_memo_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember_sha256(path: Path, sha256: str, st: os.stat_result | None = None) -> None:
    path = Path(path).resolve()
    st = st or path.stat()
    memo = {p: v for p, v in _read_memo().items() if os.path.exists(p)}
    memo[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    try:
        _memo_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write(_memo_path(), lambda f: f.write(json.dumps(memo, indent=1).encode()))
    except OSError:
        pass  # a read-only cache only costs a rehash next time


# ---- state dicts --------------------------------------------------------------------------------

def read_state_dict(path: Path, last: str = "relu5_4") -> dict[str, torch.Tensor]:
    """The convolutions up to `last` from a VGG-19 state dict file, keyed ``features.N.weight|bias``.

    Accepts torchvision's full state dict (the classifier and anything else is dropped at once), a
    features-only one, and keys without the ``features.`` prefix. Keys and shapes of all 16
    convolutions are checked; values (finite) only of those returned. Zip-format files are
    memory-mapped, so what is not returned (the classifier: 470 MB in torchvision's) is not read.
    """
    path = Path(path)
    try:
        mmap = zipfile.is_zipfile(path)
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many kinds for damaged or foreign files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"{path}: not a readable PyTorch state dict ({reason})") from None
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    keep = {f"{state_dict_key(c)}.{part}" for c in conv_names(last) for part in ("weight", "bias")}
    out: dict[str, torch.Tensor] = {}
    for key, shape in state_dict_shapes().items():
        t = loaded.get(key)
        if t is None:
            t = loaded.get(key[len("features."):])
        if t is None:
            raise WeightsError(f"{path}: not a VGG-19 state dict: missing {key}")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise WeightsError(f"{path}: {key} is not a floating-point tensor")
        if tuple(t.shape) != shape:
            raise WeightsError(f"{path}: {key} has shape {tuple(t.shape)}, VGG-19 needs {shape}")
        if key in keep:
            t = t.float()  # a mapped file is mapped privately: nothing writes back to it
            if not torch.isfinite(t).all():
                raise WeightsError(f"{path}: {key} holds NaN or infinite values")
            out[key] = t
    del loaded
    return out


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """All 16 convolutions Kaiming-normal (fan in, ReLU gain), zero bias; same seed → same tensors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in state_dict_shapes().items():
        if key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        else:
            out[key] = torch.zeros(shape)
    return out
