"""`nst gimp install|uninstall`: put the GIMP 3 plug-in into GIMP's plug-ins folder, or take it out.

An installed plug-in is the folder ``plug-ins/neural-style/`` holding ``neural-style.py`` (the
plug-in, executable), ``nst_plugin_helpers.py`` (its GIMP-free part), ``nst_client.py`` (a copy of
nst_core/service/client.py) and ``nst-plugin.json`` (the Python interpreter that has nst_core, so the
plug-in can start a private service; optionally a socket path). Installing again upgrades in place.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

PLUGIN_NAME = "neural-style"
PLUGIN_FILE = "neural-style.py"
HELPERS_FILE = "nst_plugin_helpers.py"
CLIENT_FILE = "nst_client.py"
SETTINGS_FILE = "nst-plugin.json"
OWNED = (PLUGIN_FILE, HELPERS_FILE, CLIENT_FILE, SETTINGS_FILE)

PLUGIN_SOURCE = Path(__file__).resolve().parent / PLUGIN_NAME / PLUGIN_FILE
HELPERS_SOURCE = PLUGIN_SOURCE.with_name(HELPERS_FILE)


def _client_source() -> Path:
    """nst_core/service/client.py of the installed nst_core (stdlib only, so finding it is cheap)."""
    spec = importlib.util.find_spec("nst_core.service.client")
    if spec is None or not spec.origin:
        raise InstallError("nst_core.service.client is missing: this Neural Style installation is incomplete; "
                           "reinstall it.")
    return Path(spec.origin)


class InstallError(Exception):
    """The plug-in cannot be installed or removed; the message says why."""


def plugin_dirs(environ=None, platform: str | None = None, home: str | Path | None = None) -> list[Path]:
    """GIMP 3 plug-ins folders to use when no --dest is given.

    $GIMP3_DIRECTORY wins (GIMP's own override of its profile). Otherwise: Linux and other Unix
    ~/.config/GIMP/3.0 (or $XDG_CONFIG_HOME), plus the Flatpak profile when Flatpak GIMP has been
    run; Windows %APPDATA%\\GIMP\\3.0; macOS ~/Library/Application Support/GIMP/3.0.
    """
    env = os.environ if environ is None else environ
    platform = platform or sys.platform
    home = Path(home) if home is not None else Path(env.get("HOME") or Path.home())
    if env.get("GIMP3_DIRECTORY"):
        return [Path(env["GIMP3_DIRECTORY"]) / "plug-ins"]
    if platform.startswith("win"):
        appdata = env.get("APPDATA") or str(home / "AppData" / "Roaming")
        return [Path(appdata) / "GIMP" / "3.0" / "plug-ins"]
    if platform == "darwin":
        return [home / "Library" / "Application Support" / "GIMP" / "3.0" / "plug-ins"]
    config = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    dirs = [config / "GIMP" / "3.0" / "plug-ins"]
    flatpak = home / ".var" / "app" / "org.gimp.GIMP"
    if flatpak.is_dir():
        dirs.append(flatpak / "config" / "GIMP" / "3.0" / "plug-ins")
    return dirs


def _targets(dest) -> list[Path]:
    return [Path(dest).expanduser()] if dest else plugin_dirs()


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (outputs.atomic_write), so an upgrade never leaves half a file."""
    from nst_core.outputs import atomic_write

    atomic_write(path, lambda f: f.write(data), mode=mode)


def install(dest=None, python: str | None = None, socket: str | None = None, out=None) -> list[Path]:
    """Install (or upgrade) the plug-in into each plug-ins folder; returns the plug-in folders.

    dest: a plug-ins folder (default: GIMP 3's, see `plugin_dirs`). python: the interpreter the
    plug-in starts a private service with (default: this one, which has nst_core). socket: a
    socket path for the plug-in to use (default: none recorded; the plug-in uses $NST_SOCKET or the
    client's default path).
    """
    out = out or sys.stdout
    client_source = _client_source()
    for src in (PLUGIN_SOURCE, HELPERS_SOURCE, client_source):
        if not src.is_file():
            raise InstallError(f"{src} is missing: this Neural Style installation is incomplete; reinstall it.")
    settings = {"python": python or sys.executable, "socket": socket or None}
    plugin = PLUGIN_SOURCE.read_bytes()
    helpers = HELPERS_SOURCE.read_bytes()
    client = client_source.read_bytes()
    done = []
    for plugins_dir in _targets(dest):
        folder = plugins_dir / PLUGIN_NAME
        upgrade = (folder / PLUGIN_FILE).exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write(folder / PLUGIN_FILE, plugin, 0o755)
            _write(folder / HELPERS_FILE, helpers, 0o644)
            _write(folder / CLIENT_FILE, client, 0o644)
            _write(folder / SETTINGS_FILE, (json.dumps(settings, indent=2) + "\n").encode(), 0o644)
            shutil.rmtree(folder / "__pycache__", ignore_errors=True)
        except OSError as e:
            raise InstallError(f"cannot install the plug-in into {folder}: {e}") from None
        print(f"{'Upgraded' if upgrade else 'Installed'} the Neural Style plug-in in {folder}", file=out)
        socket_note = f", socket: {settings['socket']}" if settings["socket"] else ""
        print(f"  {PLUGIN_FILE} (executable), {HELPERS_FILE}, {CLIENT_FILE}, {SETTINGS_FILE} "
              f"(python: {settings['python']}{socket_note})", file=out)
        if ".var/app/org.gimp.GIMP" in folder.as_posix():
            print("  Flatpak GIMP cannot start a service from outside its sandbox: keep `nst serve` running and "
                  "let GIMP reach its socket (flatpak override --user --filesystem=xdg-run/nst org.gimp.GIMP).",
                  file=out)
        done.append(folder)
    print("Restart GIMP; the plug-in is Filters → Artistic → Neural Style…", file=out)
    return done


def uninstall(dest=None, out=None) -> list[Path]:
    """Remove the plug-in from each plug-ins folder; returns the folders it was removed from."""
    out = out or sys.stdout
    removed = []
    for plugins_dir in _targets(dest):
        folder = plugins_dir / PLUGIN_NAME
        if not folder.is_dir():
            continue
        try:
            for name in OWNED:
                (folder / name).unlink(missing_ok=True)
            shutil.rmtree(folder / "__pycache__", ignore_errors=True)
            left = sorted(p.name for p in folder.iterdir())
            if left:
                print(f"Removed the Neural Style plug-in from {folder}; left the folder in place because it also "
                      f"holds {', '.join(left)}", file=out)
            else:
                folder.rmdir()
                print(f"Removed the Neural Style plug-in from {folder}", file=out)
        except OSError as e:
            raise InstallError(f"cannot remove the plug-in from {folder}: {e}") from None
        removed.append(folder)
    if not removed:
        where = ", ".join(str(p) for p in _targets(dest))
        print(f"The Neural Style plug-in is not installed in {where}; nothing to remove", file=out)
    return removed


def _cmd_install(args) -> int:
    try:
        install(args.dest, python=args.python, socket=args.socket)
    except InstallError as e:
        print(f"nst gimp install: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_uninstall(args) -> int:
    try:
        uninstall(args.dest)
    except InstallError as e:
        print(f"nst gimp uninstall: {e}", file=sys.stderr)
        return 2
    return 0


def add_parsers(subparsers) -> None:
    """Add `gimp install [--dest DIR]` and `gimp uninstall [--dest DIR]` to the `nst` command."""
    gimp = subparsers.add_parser("gimp", help="install or remove the GIMP 3 plug-in (Filters → Artistic → Neural Style…)",
                                 description="Install or remove the GIMP 3 plug-in.")
    sub = gimp.add_subparsers(dest="gimp_command", metavar="ACTION", required=True)
    dest_help = ("GIMP's plug-ins folder (default: $GIMP3_DIRECTORY/plug-ins, else GIMP 3's folder in your profile, "
                 "and Flatpak GIMP's when present)")
    ins = sub.add_parser("install", help="copy the plug-in into GIMP's plug-ins folder (again: upgrade)",
                         description="Copy the plug-in into GIMP 3's plug-ins folder and record this Python "
                                     f"({sys.executable}) for it to start a private service with.")
    ins.add_argument("--dest", metavar="DIR", help=dest_help)
    ins.add_argument("--python", metavar="PATH", help="the interpreter that has nst_core (default: this one)")
    ins.add_argument("--socket", metavar="PATH", help="the service socket the plug-in uses (default: $NST_SOCKET "
                                                      "or the service's default path)")
    ins.set_defaults(func=_cmd_install)
    rm = sub.add_parser("uninstall", help="remove the plug-in from GIMP's plug-ins folder")
    rm.add_argument("--dest", metavar="DIR", help=dest_help)
    rm.set_defaults(func=_cmd_uninstall)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gimp_plugin.installer")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["gimp", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
