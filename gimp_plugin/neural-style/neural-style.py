#!/usr/bin/env python3
"""Neural Style for GIMP 3: Filters → Artistic → Neural Style…

Stylises the active layer (or the selection in it) with a style image (Gatys et al. 2016). The work
is done by the Neural Style job service (the daemon's, a user's `nst serve`, or a private one this
plug-in starts from the Python interpreter its installer recorded); the plug-in only moves pixels
and never imports torch, numpy or Pillow. `nst gimp install` puts it in GIMP's plug-ins folder as
neural-style/neural-style.py with nst_plugin_helpers.py (its GIMP-free part), nst_client.py and
nst-plugin.json beside it.

GIMP 3.0 cancels a plug-in (the × beside its progress bar) by killing its process; the service
cancels a job whose connection closes, so cancelling in GIMP stops the job in the service. The job
runs in a second process of this plug-in (see `run`), so that the first one can take the preview
layer away again and leave the image as it was.
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
    HERE, JOB_PROC_NAME, MENU_PATH, OWN_SIZE, PREVIEW_INTERVAL, PROC_NAME, QUALITY_PRESETS, START, STRENGTH_MAX,
    STRENGTH_MIN, UserError, build_params, choose_socket, explain, keep_alpha, label, pixels_disagree,
    preview_side, progress_text, read_settings, red_stats, scaled_dims, swap16)


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


def send_to_service(drawable, config, preview_layer, result_layer) -> str | None:
    """Run the job in the service and put its result, at the area's size, into `result_layer`;
    draw the previews the service sends on `preview_layer` (when there is one). Returns the
    service's note on the weights (None for ImageNet's).

    8-bit images travel as 8-bit, all others as 16-bit (the protocol's deepest).
    """
    import nst_client
    settings = read_settings()
    _, x, y, w, h = drawable.mask_intersect()
    bit_depth = 16 if high_precision(drawable.get_image()) else 8
    channels = 4 if drawable.has_alpha() else 3
    fmt = fmt_name(channels, bit_depth)
    params = build_params(
        quality=config.get_property("quality"), custom_size=config.get_property("size"),
        custom_iterations=config.get_property("iterations"), strength=config.get_property("strength"),
        preserve_color=config.get_property("preserve-color"), style_scale=config.get_property("style-scale"),
        seed=config.get_property("seed"), device=config.get_property("device"),
        weights=config.get_property("weights") or "", region_w=w, region_h=h)

    Gimp.progress_init("Neural Style: connecting to the service…")
    client = connect(config, settings)
    style = style_image(config, max(16, math.ceil(params["size"] * params["style_scale"])))
    content = read_pixels(drawable, x, y, w, h, params["size"], channels, bit_depth)
    original = None
    if channels == 4:  # the result keeps the layer's own alpha, exactly
        original = drawable.get_buffer().get(Gegl.Rectangle.new(x, y, w, h), 1.0, fmt, Gegl.AbyssPolicy.CLAMP)

    def finished(raw):
        pixels = fit_result(raw, w, h, fmt)
        return keep_alpha(pixels, original, bit_depth // 8) if original is not None else pixels

    last = [0.0]
    next_preview = [0.0]

    def on_progress(event):
        preview = event.get("preview")
        if (preview is not None and preview_layer is not None and time.monotonic() >= next_preview[0]
                and preview_layer.is_valid()):
            started = time.monotonic()
            shadow = preview_layer.get_shadow_buffer()
            shadow.set(Gegl.Rectangle.new(x, y, w, h), fmt, finished(preview))
            shadow.flush()
            preview_layer.merge_shadow(False)  # no undo: the layer goes when the job ends
            preview_layer.update(x, y, w, h)
            Gimp.displays_flush()
            # GIMP spends at most a quarter of its time on previews of a large area.
            next_preview[0] = time.monotonic() + 3 * (time.monotonic() - started)
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
        result = client.run_job(content, [style], params, priority="interactive",
                                on_progress=on_progress, on_status=on_status,
                                preview=preview_side(params["size"]) if preview_layer is not None else None,
                                preview_interval=PREVIEW_INTERVAL)
    except nst_client.ServiceError as e:
        raise UserError(explain(e.kind, e.message)) from None
    Gimp.progress_set_text("Neural Style: writing the result…")
    Gimp.progress_update(1.0)
    buf = result_layer.get_buffer()
    buf.set(Gegl.Rectangle.new(0, 0, w, h), fmt, finished(result))
    buf.flush()
    return result.info.get("weights_note")


def high_precision(image) -> bool:
    return image.get_precision() not in (Gimp.Precision.U8_LINEAR, Gimp.Precision.U8_NON_LINEAR,
                                         Gimp.Precision.U8_PERCEPTUAL)


def show_preview(image, drawable):
    """A copy of the layer above it, for the previews, added with the image's undo frozen: it never
    enters the undo history, and `end_preview` leaves the image as it was."""
    state = image.is_dirty(), image.get_selected_layers()
    image.undo_freeze()
    layer = drawable.copy()
    layer.set_name(f"{drawable.get_name()} (Neural Style preview)")
    image.insert_layer(layer, drawable.get_parent(), image.get_item_position(drawable))
    Gimp.displays_flush()
    return layer, state


def end_preview(image, layer, state) -> None:
    if not image.is_valid():  # closed during the run
        return
    if layer.is_valid():
        image.remove_layer(layer)
    image.undo_thaw()
    was_dirty, selected = state
    image.set_selected_layers([item for item in selected if item.is_valid()])
    if not was_dirty:  # GIMP counts changes made with undo frozen as edits
        image.clean_all()
    Gimp.displays_flush()


def call_job_procedure(procedure, config, image, drawable, preview_layer, result_layer):
    """Run JOB_PROC_NAME with this run's settings; (status, weights note or error message)."""
    job = Gimp.get_pdb().lookup_procedure(JOB_PROC_NAME)
    cfg = job.create_config()
    cfg.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    cfg.set_property("image", image)
    cfg.set_core_object_array("drawables", [drawable])
    for spec in procedure.get_arguments():
        if spec.name not in ("run-mode", "image", "drawables"):
            cfg.set_property(spec.name, config.get_property(spec.name))
    cfg.set_property("preview-layer", preview_layer)
    cfg.set_property("result-layer", result_layer)
    values = job.run(cfg)
    text = values.index(1) if values.length() > 1 else None
    return values.index(0), text if isinstance(text, str) else ""


def put_result(image, drawable, x, y, w, h, result_layer, output, note) -> None:
    """The result onto a new layer above the active one, or into it, as one undo step; a
    selection (feathered or not) masks it as GIMP's own filters are masked."""
    fmt = fmt_name(4 if drawable.has_alpha() else 3, 16 if high_precision(image) else 8)
    pixels = result_layer.get_buffer().get(Gegl.Rectangle.new(0, 0, w, h), 1.0, fmt, Gegl.AbyssPolicy.CLAMP)
    image.undo_group_start()
    try:
        target = drawable
        if output == "new-layer":
            target = drawable.copy()
            target.set_name(f"{drawable.get_name()} (Neural Style{', random weights' if note else ''})")
            image.insert_layer(target, drawable.get_parent(), image.get_item_position(drawable))
        shadow = target.get_shadow_buffer()
        shadow.set(Gegl.Rectangle.new(x, y, w, h), fmt, pixels)
        shadow.flush()
        target.merge_shadow(True)
        target.update(x, y, w, h)
    finally:
        image.undo_group_end()
    Gimp.displays_flush()


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
    proc.add_choice_argument(
        "quality", "_Quality",
        "Working size (longest side, never more than the area's) and optimiser steps: "
        f"{'; '.join(label(k) for k in QUALITY_PRESETS)}; Custom: Size and Iterations under Advanced. "
        "Full resolution stylises the layer (or selection) at its own size instead of scaling a smaller "
        "result up",
        choice(*[(k, label(k), label(k)) for k in QUALITY_PRESETS],
               ("custom", "Custom", "Size and Iterations under Advanced")),
        "standard", flags)
    proc.add_choice_argument(
        "output", "Out_put", "Where the result goes",
        choice(("new-layer", "New layer", "A new layer above the active one"),
               ("in-place", "Replace pixels", "Replace the active layer's pixels")),
        "new-layer", flags)
    proc.add_int_argument(
        "size", "Si_ze", "Custom quality: longest side of the working image in pixels; 0: the area's own size "
        "(full resolution)", OWN_SIZE, 16384, 512, flags)
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


def failure(procedure, message, status=Gimp.PDBStatusType.EXECUTION_ERROR):
    return procedure.new_return_values(status, GLib.Error.new_literal(Gimp.PlugIn.error_quark(), message, 0))


def run(procedure, run_mode, image, drawables, config, data):
    """Filters → Artistic → Neural Style…: check, ask (INTERACTIVE), run the job, put the result.

    GIMP 3.0 cancels a plug-in by killing its process, which then cannot tidy up. So the job runs
    in a second process of this plug-in (JOB_PROC_NAME, called through the PDB): GIMP's Cancel ends
    that one, and this one takes the preview layer away and leaves the image as it was.
    Interactive runs and Filters → Repeat show previews; scripts (NONINTERACTIVE) do not.
    """
    Gegl.init(None)  # GimpUi.init does it for the dialog; without the dialog nobody else does
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
        ok, x, y, w, h = drawable.mask_intersect()
        if not ok or w < 1 or h < 1:
            raise UserError("The selection does not touch this layer: select an area on it, or Select → None.")
        if max(w, h) < 16:
            raise UserError("The area to stylise is smaller than 16 pixels; select a larger area.")
        scratch = Gimp.Image.new_with_precision(w, h, Gimp.ImageBaseType.RGB, image.get_precision())
        try:
            scratch.undo_disable()
            kind = Gimp.ImageType.RGBA_IMAGE if drawable.has_alpha() else Gimp.ImageType.RGB_IMAGE
            result_layer = Gimp.Layer.new(scratch, "result", w, h, kind, 100.0, Gimp.LayerMode.NORMAL)
            scratch.insert_layer(result_layer, None, 0)
            preview = None
            if run_mode != Gimp.RunMode.NONINTERACTIVE:
                preview, state = show_preview(image, drawable)
            try:
                status, text = call_job_procedure(procedure, config, image, drawable, preview, result_layer)
            finally:
                if preview is not None:
                    end_preview(image, preview, state)
            if status == Gimp.PDBStatusType.CANCEL:
                return procedure.new_return_values(status, None)
            if status != Gimp.PDBStatusType.SUCCESS:
                return failure(procedure, text or "The Neural Style job ended without an answer.", status)
            put_result(image, drawable, x, y, w, h, result_layer, config.get_property("output"), text)
        finally:
            scratch.delete()
    except UserError as e:
        return failure(procedure, str(e))
    except Exception as e:  # a bug: a message for the user, the traceback on stderr
        traceback.print_exc()
        return failure(procedure, f"Neural Style failed unexpectedly: {e}\n\n"
                                  "Please report this with GIMP's error console output.")
    if text:
        Gimp.message(f"Neural Style: {text}")
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, None)


def run_job_procedure(procedure, run_mode, image, drawables, config, data):
    """JOB_PROC_NAME: the job itself, in a process that GIMP's Cancel may kill at any moment."""
    Gegl.init(None)
    try:
        try:
            import nst_client
            del nst_client
        except ImportError:
            raise UserError(f"nst_client.py is missing beside the plug-in in {HERE}. "
                            "Run `nst gimp install` again.") from None
        note = send_to_service(drawables[0], config, config.get_property("preview-layer"),
                       config.get_property("result-layer"))
    except UserError as e:
        return failure(procedure, str(e))
    except Exception as e:
        traceback.print_exc()
        return failure(procedure, f"Neural Style failed unexpectedly: {e}\n\n"
                                  "Please report this with GIMP's error console output.")
    return Gimp.ValueArray.new_from_values([GObject.Value(Gimp.PDBStatusType, Gimp.PDBStatusType.SUCCESS),
                                            GObject.Value(GObject.TYPE_STRING, note or "")])


class NeuralStyle(Gimp.PlugIn):
    __gtype_name__ = "NeuralStylePlugIn"

    def do_query_procedures(self):
        return [PROC_NAME, JOB_PROC_NAME]

    def do_set_i18n(self, name):
        return False

    def do_create_procedure(self, name):
        if name == JOB_PROC_NAME:
            proc = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run_job_procedure, None)
            proc.set_image_types("*")
            proc.set_documentation(
                "The job of Neural Style… (called by it)",
                "Runs one job in the service for Neural Style…, drawing previews on a layer and the result "
                "into another, in a process of its own so that GIMP's Cancel, which ends it, leaves the image "
                "to Neural Style… to restore.",
                name)
        else:
            proc = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run, None)
            proc.set_image_types("*")
            proc.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
            proc.set_menu_label("Neural Style…")
            proc.add_menu_path(MENU_PATH)
            proc.set_documentation(
                "Repaint the layer in the style of an image (neural style transfer)",
                "Stylises the active layer, or the selection in it, with a style image (Gatys et al. 2016), "
                "through the Neural Style service, at a working size or at full resolution. The result goes "
                "to a new layer above (or replaces the layer's pixels) as one undo step; a feathered "
                "selection blends. Interactive runs show the current result every few seconds.",
                name)
        proc.set_attribution("Neural Style", "Neural Style contributors", "2025")
        add_arguments(proc)
        if name == JOB_PROC_NAME:
            flags = GObject.ParamFlags.READWRITE
            proc.add_drawable_argument("preview-layer", "Preview layer", "Where previews go (none: no previews)",
                                       True, flags)
            proc.add_drawable_argument("result-layer", "Result layer", "Where the result goes, at the area's size",
                                       False, flags)
            proc.add_string_return_value("weights-note", "Weights note",
                                         "The service's note on the weights (empty for ImageNet's)", "", flags)
        return proc

Gimp.main(NeuralStyle.__gtype__, sys.argv)
