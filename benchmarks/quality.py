#!/usr/bin/env python3
"""The paper's experiment on real pictures, for the day ImageNet weights are here.

`nst stylize`'s defaults (the paper's: normalised VGG-19, relu4_2 content, relu1_1 … relu5_1
style with w_l = 1/5, α/β = 1e-3, L-BFGS from white noise, one pass at 512 px) on the photograph
and the public-domain paintings in ../shared/images (read in place). For every content × style it
prints the final losses and the per-layer balance β·w_l·E_l / α·L_content, recomputed on the
result (the paper's balance makes the style terms comparable to the content term: a layer far
below 1 hardly shapes the result, far above it drowns the photograph), and writes the results and
a contact sheet (sheet.png: styles along the top, one row per content).

    .venv/bin/python benchmarks/quality.py                        # ImageNet weights; exit 2 where absent
    .venv/bin/python benchmarks/quality.py --weights random --size 64 --iterations 20
    .venv/bin/python benchmarks/quality.py --content a.jpg --styles b.jpg c.jpg --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "scripts"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from nst_core.runtime import prepare_process  # noqa: E402

prepare_process()  # before torch loads, as the entry points do

import torch  # noqa: E402

from contact_sheet import contact_sheet  # noqa: E402
from nst_core import Session, StyleParams, devices, losses, stylize  # noqa: E402
from nst_core.engine import resize  # noqa: E402
from nst_core.errors import NSTError  # noqa: E402
from nst_core.images import fit, load_image, save_image  # noqa: E402

SHARED = REPO.parent / "shared" / "images"
CONTENTS = [SHARED / "tubingen.jpg"]
STYLES = [SHARED / "starry_night.jpg", SHARED / "the_scream.jpg", SHARED / "shipwreck.jpg"]


def balance(net, params: StyleParams, content, style, result) -> dict:
    """α·L_content, β·L_style and β·w_l·E_l per style layer, for the result as it was written.

    The targets are made as the engine makes them: the content at the output size, the style
    scaled to the output's longest side times style_scale.
    """
    x = result.rgb
    h, w = x.shape[-2:]
    sh, sw = fit(style.height, style.width, max(16, round(max(h, w) * params.style_scale)))
    layers = sorted(set(params.content_layers) | set(params.style_layers))
    device = next(net.parameters()).device

    def features(rgb):
        with torch.no_grad():
            return net(rgb.unsqueeze(0).to(device), layers)

    fx, fc, fs = features(x), features(resize(content.rgb, h, w)), features(resize(style.rgb, sh, sw))
    l_content = sum(wl * float(losses.content_loss(fx[n], fc[n])) for n, wl in params.content_layers.items())
    per_layer = {}
    for n, wl in params.style_layers.items():
        m = fs[n].shape[-1] * fs[n].shape[-2]
        per_layer[n] = params.style_weight * wl * float(losses.style_layer_loss(fx[n], losses.gram(fs[n]) / m))
    return {"alpha_content": params.content_weight * l_content, "beta_style": sum(per_layer.values()),
            "beta_wl_El": per_layer}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=StyleParams.default("weights"), help="imagenet (default), random, or a path")
    ap.add_argument("--size", type=int, default=StyleParams.default("size"))
    ap.add_argument("--iterations", type=int, default=StyleParams.default("iterations"))
    ap.add_argument("--device", default=StyleParams.default("device"))
    ap.add_argument("--content", nargs="+", type=Path, default=CONTENTS, help="photographs (default: ../shared/images)")
    ap.add_argument("--styles", nargs="+", type=Path, default=STYLES, help="paintings (default: ../shared/images)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "quality", help="folder for results and sheet.png")
    ap.add_argument("--json", action="store_true", help="also print everything as one JSON object at the end")
    args = ap.parse_args(argv)

    missing = [str(p) for p in [*args.content, *args.styles] if not p.is_file()]
    if missing:
        print(f"quality: no such image: {', '.join(missing)} (the defaults read ../shared/images; "
              f"give --content and --styles)", file=sys.stderr)
        return 2
    try:
        params = StyleParams(weights=args.weights, size=args.size, iterations=args.iterations, device=args.device)
        session = Session()
        device = devices.pick_device(params.device)
        net = session.network(params, device)  # the weights first: missing ImageNet weights say so at once
        contents = [load_image(p) for p in args.content]
        styles = [load_image(p) for p in args.styles]
    except NSTError as e:
        print(f"quality: {e.message}", file=sys.stderr)
        return e.exit_code

    print(f"weights {net.weights_label} on {devices.describe(device)}; size {params.size}, {params.iterations} "
          f"iterations, α/β = {params.ratio:g}, levels {[s for s, _ in params.level_sizes()]}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, records = [("", None)] + [(f"style: {p.stem}", preview(s)) for p, s in zip(args.styles, styles)], []
    for cpath, content in zip(args.content, contents):
        rows.append((f"content: {cpath.stem}", preview(content)))
        for spath, style in zip(args.styles, styles):
            started = time.perf_counter()
            result = stylize(content, [style], params, session=session)
            out = args.out / f"{cpath.stem}--{spath.stem}.png"
            save_image(result.picture, out)
            b = balance(net, params, content, style, result.picture)
            record = {"content": str(cpath), "style": str(spath), "output": str(out),
                      "seconds": time.perf_counter() - started, "engine_losses": result.losses, **b,
                      "balance": {n: v / b["alpha_content"] if b["alpha_content"] > 0 else math.inf
                                  for n, v in b["beta_wl_El"].items()}}
            records.append(record)
            print_record(record)
            rows.append((f"{cpath.stem} / {spath.stem}", out))
    sheet = args.out / "sheet.png"
    contact_sheet(rows, columns=1 + len(styles), height=max(128, min(256, params.size))).save(sheet)
    print(f"wrote {sheet}")
    if result.weights_note:
        print(f"note: {result.weights_note}")
    if args.json:
        print(json.dumps({"weights": net.weights_label, "params": params.to_mapping(), "runs": records}))
    return 0


def preview(picture):
    from PIL import Image

    rgb = (picture.rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(rgb, "RGB")


def print_record(r: dict) -> None:
    e = r["engine_losses"]
    print(f"\n{Path(r['content']).name} × {Path(r['style']).name}: {r['seconds']:.0f} s → {r['output']}")
    print(f"  engine, last step: L_content {e['content']:.4g}, L_style {e['style']:.4g}, total {e['total']:.4g}")
    print(f"  result as written (clamped to [0, 1]): α·L_content {r['alpha_content']:.4g}, β·L_style {r['beta_style']:.4g} "
          f"(style/content {r['beta_style'] / r['alpha_content'] if r['alpha_content'] else math.inf:.3g})")
    print("  β·w_l·E_l / α·L_content: " + ", ".join(f"{n} {v:.3g}" for n, v in r["balance"].items()))


if __name__ == "__main__":
    sys.exit(main())
