#!/usr/bin/env python3
"""Neural Style for GIMP 3: Filters → Artistic → Neural Style…

Stylises the active layer (or the selection in it) with a style image (Gatys et al. 2016). The work
is done by the Neural Style job service (the daemon's, a user's `nst serve`, or a private one this
plug-in starts from the Python interpreter its installer recorded); the plug-in only moves pixels
and never imports torch, numpy or Pillow. `nst gimp install` puts it in GIMP's plug-ins folder as
neural-style/neural-style.py with nst_plugin_helpers.py (its GIMP-free part), nst_client.py and
nst-plugin.json beside it.

GIMP 3.0 cancels a plug-in (the × beside its progress bar) by killing its process; the service
cancels a job whose connection closes, so cancelling in GIMP stops the job in the service.
"""

import math
import os
import sys
import time
import traceback

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("GimpUi", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp, GimpUi, GLib, GObject  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))  # nst_plugin_helpers, nst_client
from nst_plugin_helpers import (  # noqa: E402
    HERE, MENU_PATH, PROC_NAME, QUALITY_PRESETS, START, STRENGTH_MAX, STRENGTH_MIN, UserError, build_params,
    choose_socket, explain, keep_alpha, pixels_disagree, progress_text, read_settings, red_stats, scaled_dims,
    swap16)


def fmt_name(channels: int, bit_depth: int) -> str:
    return f"R'G'B'{'A' if channels == 4 else ''} u{bit_depth}"


def read_pixels(drawable, x, y, w, h, longest, channels, bit_depth):
    """A region of `drawable` as a RawImage, shrunk to at most `longest` pixels by GIMP itself.

    The plug-in reads only at scale 1: a scaled `GeglBuffer.get` returns zeros unless GEGL is
    initialised in this process (GimpUi.init does it, so only runs without the dialog were hit).
    GIMP crops and scales a copy in a scratch image, and its histogram of that copy checks
    that the bytes that arrived here are those pixels.
    """
    import nst_client
    sw, sh, scale = scaled_dims(w, h, longest)
    fmt = fmt_name(channels, bit_depth)
    precision = Gimp.Precision.U16_NON_LINEAR if bit_depth == 16 else Gimp.Precision.U8_NON_LINEAR
    tmp = Gimp.Image.new_with_precision(w, h, Gimp.ImageBaseType.RGB, precision)
    try:
        tmp.undo_disable()
        copy = Gimp.Layer.new_from_drawable(drawable, tmp)
        tmp.insert_layer(copy, None, 0)
        copy.resize(w, h, -x, -y)
        copy.set_offsets(0, 0)
        if scale < 1.0:
            Gimp.context_push()
            Gimp.context_set_interpolation(Gimp.InterpolationType.LOHALO)  # GIMP's choice for shrinking
            copy.scale(sw, sh, False)
            Gimp.context_pop()
        data = bytes(copy.get_buffer().get(Gegl.Rectangle.new(0, 0, sw, sh), 1.0, fmt, Gegl.AbyssPolicy.CLAMP))
        _, mean, std, *_ = copy.histogram(Gimp.HistogramChannel.RED, 0.0, 1.0)
    finally:
        tmp.delete()
    if pixels_disagree(red_stats(data, channels, bit_depth), mean, std):
        raise UserError(f"GIMP handed the plug-in pixels of {drawable.get_name()!r} that are not the layer's "
                        "(a GIMP or GEGL problem); nothing was sent. Please report this with GIMP's version.")
    if bit_depth == 16 and sys.byteorder == "big":
        data = swap16(data)
    return nst_client.RawImage(sw, sh, channels, bit_depth, data)


def fit_result(result, w, h, fmt):
    """The result's pixels at w×h in babl format `fmt`, scaled by GIMP (cubic) when needed."""
    data = result.data
    if result.bit_depth == 16 and sys.byteorder == "big":
        data = swap16(data)
    src_fmt = fmt_name(result.channels, result.bit_depth)
    if (result.width, result.height) == (w, h) and src_fmt == fmt:
        return data
    precision = Gimp.Precision.U16_NON_LINEAR if result.bit_depth == 16 else Gimp.Precision.U8_NON_LINEAR
    tmp = Gimp.Image.new_with_precision(result.width, result.height, Gimp.ImageBaseType.RGB, precision)
    try:
        tmp.undo_disable()
        kind = Gimp.ImageType.RGBA_IMAGE if result.channels == 4 else Gimp.ImageType.RGB_IMAGE
        layer = Gimp.Layer.new(tmp, "result", result.width, result.height, kind, 100.0, Gimp.LayerMode.NORMAL)
        tmp.insert_layer(layer, None, 0)
        buf = layer.get_buffer()
        buf.set(Gegl.Rectangle.new(0, 0, result.width, result.height), src_fmt, data)
        buf.flush()
        if (result.width, result.height) != (w, h):
            Gimp.context_push()
            Gimp.context_set_interpolation(Gimp.InterpolationType.CUBIC)
            layer.scale(w, h, False)
            Gimp.context_pop()
        return layer.get_buffer().get(Gegl.Rectangle.new(0, 0, w, h), 1.0, fmt, Gegl.AbyssPolicy.CLAMP)
    finally:
        tmp.delete()


def style_image(config, longest):
    """The style as a RawImage (8-bit RGB) from the chosen file or layer."""
    if config.get_property("style-source") == "layer":
        layer = config.get_property("style-layer")
        if layer is None:
            raise UserError("Choose a style layer (or set Style source to File and choose an image file).")
        return read_pixels(layer, 0, 0, layer.get_width(), layer.get_height(), longest, 3, 8)
    gfile = config.get_property("style-file")
    if gfile is None or not gfile.get_path():
        raise UserError("Choose a style image file (or set Style source to Layer and choose a layer).")
    path = gfile.get_path()
    if not os.path.isfile(path):
        raise UserError(f"The style image {path} does not exist.")
    try:
        img = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, gfile)
    except GLib.Error as e:
        raise UserError(f"GIMP cannot open the style image {path}: {e.message}") from None
    if img is None:
        raise UserError(f"GIMP cannot open the style image {path}.")
    try:
        layer = img.flatten()
        return read_pixels(layer, 0, 0, layer.get_width(), layer.get_height(), longest, 3, 8)
    finally:
        img.delete()


def connect(config, settings):
    import nst_client
    socket_path = choose_socket(config.get_property("socket"), settings)
    python = settings.get("python")
    probe = nst_client.ServiceClient(socket_path, timeout=10.0, client_name="gimp-neural-style")
    if probe.ping():
        return probe
    if not python:
        raise UserError(
            f"No Neural Style service answers at {probe.socket_path}, and no Python interpreter is "
            "recorded to start one.\n\nStart the service with `nst serve`, or run `nst gimp install` "
            "from the Python environment that has Neural Style installed.")
    Gimp.progress_set_text("Neural Style: starting the service…")
    try:
        nst_client.start_private_service(python, probe.socket_path)
    except nst_client.ServiceError as e:
        raise UserError(
            f"No Neural Style service answers at {probe.socket_path}, and starting one with {python} "
            f"failed: {e.message}\n\nRun `nst gimp install` again from the Python environment that has "
            "Neural Style installed, or start the service yourself with `nst serve`.") from None
    return probe


def stylize(image, drawable, config):
    """Run the job; on success write the result (new layer or in place) as one undo step.

    8-bit images travel as 8-bit, all others as 16-bit (the protocol's deepest); the image is
    left untouched until the service has answered, so a cancel or an error changes nothing.
    """
    import nst_client
    settings = read_settings()
    ok, x, y, w, h = drawable.mask_intersect()
    if not ok or w < 1 or h < 1:
        raise UserError("The selection does not touch this layer: select an area on it, or Select → None.")
    high = image.get_precision() not in (Gimp.Precision.U8_LINEAR, Gimp.Precision.U8_NON_LINEAR,
                                         Gimp.Precision.U8_PERCEPTUAL)
    bit_depth = 16 if high else 8
    channels = 4 if drawable.has_alpha() else 3
    fmt = fmt_name(channels, bit_depth)
    quality = config.get_property("quality")
    params = build_params(
        quality=quality, custom_size=config.get_property("size"),
        custom_iterations=config.get_property("iterations"), strength=config.get_property("strength"),
        preserve_color=config.get_property("preserve-color"), style_scale=config.get_property("style-scale"),
        seed=config.get_property("seed"), device=config.get_property("device"),
        weights=config.get_property("weights") or "", region_w=w, region_h=h)
    if max(w, h) < 16:
        raise UserError("The area to stylise is smaller than 16 pixels; select a larger area.")

    Gimp.progress_init("Neural Style: connecting to the service…")
    client = connect(config, settings)
    style = style_image(config, max(16, math.ceil(params["size"] * params["style_scale"])))
    content = read_pixels(drawable, x, y, w, h, params["size"], channels, bit_depth)

    last = [0.0]

    def on_progress(event):
        now = time.monotonic()
        if now - last[0] < 0.1 and event.get("step") != event.get("total"):
            return
        last[0] = now
        total = event.get("total") or 1
        Gimp.progress_update(min(1.0, event.get("step", 0) / total))
        Gimp.progress_set_text(progress_text(event))

    def on_status(event):
        if event.get("type") == "accepted" and event.get("position"):
            Gimp.progress_set_text(f"Neural Style: waiting for {event['position']} job(s) in the service…")
        elif event.get("type") == "started":
            Gimp.progress_set_text(f"Neural Style: running on {event.get('device')}…")

    Gimp.progress_set_text("Neural Style: sending the job…")
    try:
        result = client.stylize(content, [style], params, priority="interactive",
                                on_progress=on_progress, on_status=on_status)
    except nst_client.ServiceError as e:
        raise UserError(explain(e.kind, e.message)) from None
    Gimp.progress_set_text("Neural Style: writing the result…")
    Gimp.progress_update(1.0)

    original = drawable.get_buffer().get(Gegl.Rectangle.new(x, y, w, h), 1.0, fmt, Gegl.AbyssPolicy.CLAMP)
    pixels = fit_result(result, w, h, fmt)
    if channels == 4:
        pixels = keep_alpha(pixels, original, bit_depth // 8)

    image.undo_group_start()
    try:
        target = drawable
        if config.get_property("output") == "new-layer":
            target = drawable.copy()
            note = ", random weights" if result.info.get("weights_note") else ""
            target.set_name(f"{drawable.get_name()} (Neural Style{note})")
            image.insert_layer(target, drawable.get_parent(), image.get_item_position(drawable))
        shadow = target.get_shadow_buffer()
        shadow.set(Gegl.Rectangle.new(x, y, w, h), fmt, pixels)
        shadow.flush()
        target.merge_shadow(True)
        target.update(x, y, w, h)
    finally:
        image.undo_group_end()
    Gimp.displays_flush()
    return result


def dialog(procedure, config) -> bool:
    GimpUi.init("neural-style")
    dlg = GimpUi.ProcedureDialog.new(procedure, config, "Neural Style")
    dlg.get_label("advanced-label", "Advanced", False, False)
    dlg.fill_box("advanced-box", ["size", "iterations", "device", "seed", "weights", "socket"])
    dlg.fill_expander("advanced", "advanced-label", False, "advanced-box")
    dlg.fill(["style-source", "style-file", "style-layer", "strength", "preserve-color", "style-scale",
              "quality", "output", "advanced"])
    for prop, other, value in (("style-file", "style-source", "file"), ("style-layer", "style-source", "layer"),
                               ("size", "quality", "custom"), ("iterations", "quality", "custom")):
        values = Gimp.ValueArray.new_from_values([GObject.Value(GObject.TYPE_STRING, value)])
        dlg.set_sensitive_if_in(prop, None, other, values, True)
    ok = dlg.run()
    dlg.destroy()
    return ok


def choice(*items):
    c = Gimp.Choice.new()
    for i, (nick, label, help_) in enumerate(items):
        c.add(nick, i, label, help_)
    return c


def add_arguments(proc) -> None:
    """The procedure's arguments: the dialog's fields and a script's parameters."""
    flags = GObject.ParamFlags.READWRITE
    proc.add_choice_argument(
        "style-source", "Style so_urce", "Take the style from an image file or from a layer of an open image",
        choice(("file", "File", "An image file GIMP can open"),
               ("layer", "Layer", "A layer of an open image")), "file", flags)
    proc.add_file_argument(
        "style-file", "Style i_mage", "The artwork whose style is transferred",
        Gimp.FileChooserAction.OPEN, True, None, flags)
    proc.add_drawable_argument(
        "style-layer", "Style la_yer", "A layer of an open image used as the style (Style source: Layer)",
        True, flags)
    proc.add_double_argument(
        "strength", "S_trength",
        "How much style: the content-to-style ratio α/β is 10^-(strength+1): 1 → 1e-2 (mostly the "
        "photo), 2 → 1e-3 (the paper's default), 3 → 1e-4, 4 → 1e-5 (mostly the style)",
        STRENGTH_MIN, STRENGTH_MAX, START["strength"], flags)
    proc.add_choice_argument(
        "preserve-color", "Preser_ve colour", "Keep the layer's colours",
        choice(("none", "Off", "Take the style's colours"),
               ("luminance", "Luminance", "Transfer the style on brightness only; keep the layer's colours"),
               ("histogram", "Histogram", "Match the style's colours to the layer's first")),
        START["preserve_color"], flags)
    proc.add_double_argument(
        "style-scale", "Style sc_ale",
        "Size of the style's brush strokes: the style image is resized to this times the working size",
        0.1, 8.0, START["style_scale"], flags)
    presets = "; ".join(f"{label}: {size} px, {steps} steps" for label, size, steps in QUALITY_PRESETS.values())
    proc.add_choice_argument(
        "quality", "_Quality",
        f"Working size (longest side, never more than the area's) and optimiser steps. {presets}; "
        "Custom: Size and Iterations under Advanced",
        choice(*[(k, f"{label} ({size} px, {steps} steps)", f"{size} px, {steps} steps")
                 for k, (label, size, steps) in QUALITY_PRESETS.items()],
               ("custom", "Custom", "Size and Iterations under Advanced")),
        "standard", flags)
    proc.add_choice_argument(
        "output", "Out_put", "Where the result goes",
        choice(("new-layer", "New layer", "A new layer above the active one"),
               ("in-place", "Replace pixels", "Replace the active layer's pixels")),
        "new-layer", flags)
    proc.add_int_argument(
        "size", "Si_ze", "Custom quality: longest side of the working image in pixels", 16, 4096, 512, flags)
    proc.add_int_argument(
        "iterations", "_Iterations", "Custom quality: optimiser steps", 1, 5000, 300, flags)
    proc.add_choice_argument(
        "device", "_Device", "Where the service computes",
        choice(("auto", "Auto", "The GPU when there is one, else the CPU"),
               ("gpu", "GPU", "The GPU (CUDA; Metal on macOS)"),
               ("cpu", "CPU", "The CPU (slow)")),
        START["device"], flags)
    proc.add_int_argument("seed", "S_eed", "Random seed of the starting noise", 0, 2**31 - 1, START["seed"], flags)
    proc.add_string_argument(
        "weights", "_Weights",
        "Empty: the service's VGG-19 ImageNet weights. Or the path of a VGG-19 weights file, or "
        "\"random\" (untrained: for tests only)", "", flags)
    proc.add_string_argument(
        "socket", "Service soc_ket",
        "The service's socket. Empty: $NST_SOCKET, the installer's setting, or the default path", "", flags)


def run(procedure, run_mode, image, drawables, config, data):
    Gegl.init(None)  # GimpUi.init does it for the dialog; without the dialog nobody else does

    def fail(message, status=Gimp.PDBStatusType.EXECUTION_ERROR):
        return procedure.new_return_values(status, GLib.Error.new_literal(Gimp.PlugIn.error_quark(), message, 0))

    try:
        if len(drawables) != 1:
            raise UserError("Select exactly one layer for Neural Style.")
        drawable = drawables[0]
        if image.get_base_type() != Gimp.ImageBaseType.RGB:
            mode = "indexed" if image.get_base_type() == Gimp.ImageBaseType.INDEXED else "greyscale"
            raise UserError(f"Neural Style works on RGB images and this one is {mode}. "
                            "Convert it with Image → Mode → RGB, then run Neural Style again.")
        if not isinstance(drawable, Gimp.Layer) or drawable.is_group_layer():
            raise UserError("Neural Style works on a layer: select a layer (not a mask, channel or group).")
        if run_mode == Gimp.RunMode.INTERACTIVE and not dialog(procedure, config):
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, None)
        try:
            import nst_client
            del nst_client
        except ImportError:
            raise UserError(f"nst_client.py is missing beside the plug-in in {HERE}. "
                            "Run `nst gimp install` again.") from None
        result = stylize(image, drawable, config)
    except UserError as e:
        return fail(str(e))
    except Exception as e:  # a bug: a message for the user, the traceback on stderr
        traceback.print_exc()
        return fail(f"Neural Style failed unexpectedly: {e}\n\n"
                    "Please report this with GIMP's error console output.")
    note = result.info.get("weights_note")
    if note:
        Gimp.message(f"Neural Style: {note}")
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, None)


class NeuralStyle(Gimp.PlugIn):
    __gtype_name__ = "NeuralStylePlugIn"

    def do_query_procedures(self):
        return [PROC_NAME]

    def do_set_i18n(self, name):
        return False

    def do_create_procedure(self, name):
        proc = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run, None)
        proc.set_image_types("*")
        proc.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        proc.set_menu_label("Neural Style…")
        proc.add_menu_path(MENU_PATH)
        proc.set_documentation(
            "Repaint the layer in the style of an image (neural style transfer)",
            "Stylises the active layer, or the selection in it, with a style image (Gatys et al. 2016), "
            "through the Neural Style service. The result goes to a new layer above (or replaces the "
            "layer's pixels) as one undo step; a feathered selection blends.",
            name)
        proc.set_attribution("Neural Style", "Neural Style contributors", "2025")
        add_arguments(proc)
        return proc


Gimp.main(NeuralStyle.__gtype__, sys.argv)
