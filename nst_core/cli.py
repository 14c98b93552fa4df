"""The `nst` command: stylise images, run the job service, install the GIMP plug-in.

Every stylisation option is generated from `StyleParams`, so the command has no defaults of its
own. Exit codes: 0 done, 2 bad input or usage, 1 unexpected error, 130 cancelled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path

from .errors import ImageError, NSTError, ParamError, WeightsError
from . import params as params_mod
from .params import StyleParams

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# The options that scripts and the other front ends rely on have short, fixed names.
_RENAMED = {"weights": "--weights", "style_blend": "--style-blend"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 2 like every bad-input error
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"nst: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nst", description="Neural Style: artistic style transfer (Gatys et al., CVPR 2016).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    st = sub.add_parser(
        "stylize", aliases=["stylise"], help="stylise a content image with one or more style images",
        description="Stylise CONTENT with STYLE(s) and write OUT. Defaults are the paper's.",
    )
    st.add_argument("content", help="the content image (a photograph)")
    st.add_argument("styles", nargs="*", metavar="STYLE",
                    help="style image(s) (an artwork); none for a content-only reconstruction (--style-weight 0)")
    st.add_argument("-o", "--output", required=True, help="output file; its extension picks the format (png, jpg, webp, tif)")
    _add_param_options(st)
    st.add_argument("--save-every", type=int, default=0, metavar="N",
                    help="also write the image every N steps as OUT_stepNNNNN.ext (default: 0, never)")
    st.add_argument("--json", action="store_true", help="print one JSON object per progress event on stdout")
    st.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    st.set_defaults(func=cmd_stylize)

    demo = sub.add_parser("demo", help="stylise the bundled sample (ImageNet weights, or random where none can be had)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("-o", "--output", default="out/demo.png", help="output file")
    demo.add_argument("--size", type=int, default=256, help="longest side of the output")
    demo.add_argument("--iterations", type=int, default=150, help="optimiser steps")
    demo.add_argument("--device", default=StyleParams.default("device"), help=StyleParams.help("device"))
    demo.set_defaults(func=cmd_demo)

    for extra in ("nst_core.service.commands", "gimp_plugin.installer"):
        try:
            module = __import__(extra, fromlist=["add_parsers"])
        except ImportError:
            continue
        module.add_parsers(sub)
    return parser


def _add_param_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("stylisation parameters (defaults: Gatys et al. 2016)")
    for f in fields(StyleParams):
        flag = _RENAMED.get(f.name, "--" + f.name.replace("_", "-"))
        default = StyleParams.default(f.name)
        shown = _show(default)
        text = StyleParams.help(f.name)
        if "(default:" not in text:  # style_blend and learning_rate say their default in words
            text = f"{text} (default: {shown})"
        kwargs = {"dest": f.name, "default": None, "help": text}
        if params_mod.value_type(f.name) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = _metavar(f.name)
        group.add_argument(flag, **kwargs)
        if f.name == "content_weight":
            group.add_argument("--ratio", type=float, default=None, metavar="A/B",
                               help="alpha/beta, content-to-style ratio: sets --style-weight to content weight / ratio "
                                    f"(default: {_show(StyleParams().ratio)}; smaller means more style)")


def _show(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{v:g}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_METAVARS = {
    "content_layers": "LAYER[:W],...", "style_layers": "LAYER[:W],...", "style_blend": "W,...",
    "pooling": "|".join(params_mod.POOLINGS), "optimizer": "|".join(params_mod.OPTIMIZERS),
    "init": "|".join(params_mod.INITS) + "|PATH", "preserve_color": "|".join(params_mod.PRESERVE_COLORS),
    "weights": "|".join(params_mod.WEIGHTS_NAMES) + "|PATH", "device": "auto|cuda[:N]|mps|cpu",
    "precision": "|".join(params_mod.PRECISIONS), "size": "N|original", "max_memory": "BYTES",
    "tile": "auto|off|PX",
}


def _metavar(name: str) -> str:
    return _METAVARS.get(name) or {int: "N", float: "X"}.get(params_mod.value_type(name), "VALUE")


def params_from_args(args: argparse.Namespace) -> StyleParams:
    """StyleParams from the options given on the command line (the rest keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(StyleParams) if getattr(args, f.name, None) is not None}
    if getattr(args, "ratio", None) is not None:
        given["ratio"] = args.ratio
    for name in ("size", "iterations", "seed", "levels"):
        if name in given and not (name == "size" and given[name].strip().lower() == "original"):
            given[name] = _int_option(name, given[name])
    return StyleParams.from_mapping(given)


def _int_option(name, value):
    try:
        return int(value)
    except ValueError:
        raise ParamError(name, f"must be a whole number, got {value!r}") from None


# ---- nst stylize ----------------------------------------------------------------------------------

def cmd_stylize(args) -> int:
    params = params_from_args(args)  # before torch loads, so that a bad option is reported at once
    from . import engine, images, outputs

    out = Path(args.output)
    inputs = [Path(args.content), *map(Path, args.styles)]
    if params.init not in params_mod.INITS:
        inputs.append(Path(params.init))
    images.check_output_path(out)
    outputs.refuse_inputs(out, inputs)
    if args.save_every < 0:
        raise ParamError("save_every", "must be 0 or more")
    _check_save_every(out, inputs, args.save_every, params.iterations)

    report = _Reporter(json_mode=args.json, quiet=args.quiet)

    def on_progress(event: engine.Progress):
        report.progress(event)
        step_done = event.tile == event.tiles  # not an event from within a tiled step
        if args.save_every and step_done and event.step % args.save_every == 0 and event.step < event.total:
            images.save_image(event.image(), _step_path(out, event.step))

    try:
        result = engine.stylize(args.content, args.styles, params, progress=on_progress)
    except KeyboardInterrupt:
        report.finish()
        print("nst: interrupted; nothing written", file=sys.stderr)
        return 130
    report.finish()
    images.save_image(result.picture, out, metadata=outputs.metadata(result, "nst stylize"))
    report.done(result, out)
    return EXIT_OK


def _step_path(out: Path, step: int) -> Path:
    """Where --save-every writes the image of `step`: OUT_stepNNNNN.ext."""
    return out.with_name(f"{out.stem}_step{step:05d}{out.suffix}")


def _check_save_every(out: Path, inputs: list[Path], every: int, total: int) -> None:
    """Before the run: every name --save-every will write fits the file system and is none of the inputs."""
    from .outputs import name_max

    steps = range(every, total, every) if every else range(0)
    if not steps:
        return
    longest = _step_path(out, steps[-1])
    size, limit = len(os.fsencode(longest.name)), name_max(longest.parent)
    if size > limit:
        raise ImageError(longest, f"the file name is {size} bytes long, the file system allows at most {limit}: "
                                  "a name --save-every would write; choose a shorter output name")
    taken = {}
    for path in inputs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        taken[(st.st_dev, st.st_ino)] = path
    for step in steps:
        target = _step_path(out, step)
        try:
            st = os.stat(target)
        except OSError:
            continue
        source = taken.get((st.st_dev, st.st_ino))
        if source is not None:
            what = ("an input image" if os.path.abspath(source) == os.path.abspath(target)
                    else f"the same file as the input {str(source)!r}")
            raise ImageError(target, f"is {what}; --save-every would overwrite it at step {step}: "
                                     "choose another output name")


class _Reporter:
    """A progress bar on stderr (or JSON lines on stdout), and the closing summary."""

    def __init__(self, json_mode: bool, quiet: bool):
        self.json = json_mode
        self.quiet = quiet or json_mode
        self.tty = sys.stderr.isatty()
        self.last_line = 0.0
        self.shown = False

    def progress(self, e) -> None:
        if self.json:
            print(json.dumps({"event": "progress", **e.to_mapping()}), flush=True)
            return
        if self.quiet:
            return
        now = time.monotonic()
        if not self.tty and now - self.last_line < 2.0 and e.step != e.total:
            return
        self.last_line = now
        width = 24
        filled = int(width * e.step / max(e.total, 1))
        rate = e.step / e.elapsed if e.elapsed > 0 else 0.0
        level = f" level {e.level}/{e.levels}" if e.levels > 1 else ""
        level += f" tile {e.tile}/{e.tiles}" if e.tiles > 1 else ""
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {e.step}/{e.total}{level}  loss {e.losses['total']:.4g}"
                f"  {rate:.2f} it/s  ETA {_duration(e.eta)}")
        if self.tty:
            sys.stderr.write("\r" + line + "\033[K")
            self.shown = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            self.shown = False

    def done(self, result, out: Path) -> None:
        if self.json:
            print(json.dumps({"event": "done", "output": str(out), "losses": result.losses, "elapsed": result.elapsed,
                              "device": result.device, "weights": result.weights_label,
                              "note": result.weights_note}), flush=True)
        else:
            print(f"wrote {out} ({result.picture.width}×{result.picture.height}) in {_duration(result.elapsed)} "
                  f"on {result.device}, weights {result.weights_label}", file=sys.stderr)
        if result.weights_note:
            print(f"nst: note: {result.weights_note}", file=sys.stderr)


def _duration(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---- nst demo -------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from .samples import sample_path

    content, style = sample_path("content"), sample_path("style")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    base = ["stylize", str(content), str(style), "-o", args.output, "--size", str(args.size),
            "--iterations", str(args.iterations), "--device", args.device,
            "--init", "content"]  # a recognisable result in few steps; `nst stylize` starts from noise
    parser = build_parser()
    try:
        return _run(parser.parse_args(base + ["--weights", "imagenet"]))
    except WeightsError as e:
        print(f"nst: {e.message}", file=sys.stderr)
        print("nst: the ImageNet weights cannot be had here, so the demo runs with random weights instead "
              "(the result shows that everything works, not an artistic style).", file=sys.stderr)
        return _run(parser.parse_args(base + ["--weights", "random"]))


# ---- entry point ----------------------------------------------------------------------------------

def _run(args) -> int:
    return args.func(args)


def main(argv=None) -> int:
    from .runtime import prepare_process

    prepare_process()  # before anything loads torch
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except NSTError as e:
        print(f"nst: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("nst: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("nst: unexpected error (a bug): please report it with the trace above", file=sys.stderr)
        return EXIT_ERROR
