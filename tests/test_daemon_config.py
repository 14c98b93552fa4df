"""The rule file: every bad config gives its exact error (file, line, key); config.yaml works as is."""

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config
from daemon.rules import check_template, is_ignored_name, render_template
from daemon_util import REPO, write_image
from nst_core.params import StyleParams

GOOD = """\
settings:
  settle: 1
defaults:
  weights: random
rules:
  - rule: one
    watch: inbox
    style: style.png
    output: out
    params:
      size: 64
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox2").mkdir()
    write_image(tmp_path / "style.png", 1, (32, 32))
    return tmp_path


def errors(folder: Path, text: str) -> list[str]:
    path = folder / "config.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def one_error(folder, text) -> str:
    errs = errors(folder, text)
    assert len(errs) == 1, errs
    return errs[0]


def test_good_config_loads_with_engine_defaults_from_style_params(folder):
    (folder / "config.yaml").write_text(GOOD)
    cfg = load_config(folder / "config.yaml")
    rule = cfg.rules[0]
    assert rule.params.size == 64 and rule.params.weights == "random"
    # Everything not given comes from StyleParams, the one source of engine defaults.
    for name in ("iterations", "style_weight", "content_layers", "style_layers", "optimizer", "pooling"):
        assert getattr(rule.params, name) == StyleParams.default(name)
    assert rule.watch == (folder / "inbox",) and rule.output == folder / "out"  # relative to the file's folder
    assert rule.on_collision == "number" and not rule.keep_inputs and rule.template == "{stem}_{rule}{ext}"
    assert cfg.settings.settle == 1.0


CASES = [
    # (yaml, line, key, words in the message)
    (GOOD.replace("  settle: 1", "  setle: 1"), 2, "settings.setle", "unknown key"),
    (GOOD + "extra: 1\n", 12, "extra", "unknown key"),
    (GOOD.replace("    output: out", "    outptu: out"), 9, "rules.one.outptu", "unknown key"),
    (GOOD.replace("      size: 64", "      sise: 64"), 11, "rules.one.params.sise", "unknown parameter"),
    (GOOD.replace("      size: 64", "      size: big"), 11, "rules.one.params.size", "must be a whole number"),
    (GOOD.replace("      size: 64", "      size: 5"), 11, "rules.one.params.size", "between 16 and 16384"),
    (GOOD.replace("      size: 64", "      size: 64\n      ratio: 0.001\n      style_weight: 5"), 12,
     "rules.one.params.ratio", "either ratio or style_weight"),
    (GOOD.replace("    watch: inbox", "    watch: nowhere"), 7, "rules.one.watch", "no such folder"),
    (GOOD.replace("    watch: inbox", "    watch: style.png"), 7, "rules.one.watch", "is not a folder"),
    (GOOD.replace("    style: style.png", "    style: missing.jpg"), 8, "rules.one.style", "no such style image"),
    (GOOD.replace("    output: out", "    output: out\n    on_collision: rename"), 10, "rules.one.on_collision",
     "overwrite, number, skip"),
    (GOOD.replace("    output: out", "    output: out\n    name: '{stem}-{colour}{ext}'"), 10, "rules.one.name",
     "unknown placeholder {colour}"),
    (GOOD.replace("    output: out", "    output: out\n    name: '../{stem}{ext}'"), 10, "rules.one.name", "'..'"),
    (GOOD.replace("    output: out", "    output: out\n    name: '{stem}.gif2'"), 10, "rules.one.name",
     "image extension"),
    (GOOD.replace("  settle: 1", "  settle: soon"), 2, "settings.settle", "must be a number"),
    (GOOD.replace("  settle: 1", "  settle: -1"), 2, "settings.settle", "at least 0"),
    (GOOD.replace("  settle: 1", "  log_level: loud"), 2, "settings.log_level", "debug, info"),
    (GOOD.replace("  settle: 1", "  device: gpu"), 2, "settings.device", "must be one of auto"),
    (GOOD.replace("  weights: random", "  weights: random\n  pooling: median"), 5, "defaults.pooling",
     "must be one of avg, max"),
    (GOOD.replace("    output: out", "    output: out\n    recursive: yes please"), 10, "rules.one.recursive",
     "true or false"),
    (GOOD.replace("    output: out", "    output: out\n    output: out2"), 10, "rules.one.output", "duplicate key"),
    (GOOD.replace("    output: out", "    output: inbox"), 9, "rules.one.output", "must not be a watched folder"),
    (GOOD.replace("      size: 64", "      size: 64\n      style_blend: [1, 2]"), 12, "rules.one.params.style_blend",
     "2 weights for 1 style"),
    (GOOD.replace("  settle: 1", "  device: cpu").replace("      size: 64", "      device: cuda:1"), 11,
     "rules.one.params.device", "not one of the daemon's devices"),
    (GOOD.replace("  - rule: one\n", "  - watch: inbox\n").replace("    watch: inbox\n", "", 1), 6, "rules[0].rule",
     "missing"),
    (GOOD.replace("    style: style.png\n", ""), 6, "rules.one.style", "missing"),
    (GOOD.replace("rules:\n", "rules: {}\n").split("  - rule")[0], 5, "rules", "non-empty list"),
    (GOOD.replace("  - rule: one", "  - rule: 'two words'"), 6, "rules[0].rule", "letters, digits"),
    (GOOD.replace("    output: out", "    output: out\n    min_input_side: 0"), 10, "rules.one.min_input_side",
     "between 1 and 16384"),
    (GOOD.replace("    output: out", "    output: out\n    poll: sometimes"), 10, "rules.one.poll", "auto, true or false"),
    # Issue 9.11: folders that loop, endless seconds, a journal that is a folder, unset variables.
    (GOOD.replace("    output: out", "    output: out\n    processed: '.'"), 10, "rules.one.processed",
     "is this rule's watched folder"),
    (GOOD.replace("    output: out", "    output: out\n    failed: ./"), 10, "rules.one.failed",
     "taken again, forever"),
    (GOOD + "  - rule: two\n    watch: inbox2\n    style: style.png\n    output: out2\n    processed: ../inbox\n"
     .replace("../inbox", "{folder}/inbox"), 16, "rules.two.processed", "is rule 'one''s watched folder"),
    (GOOD.replace("  settle: 1", "  settle: .inf"), 2, "settings.settle", "must be a number of seconds, got inf"),
    (GOOD.replace("  settle: 1", "  scan_interval: .inf"), 2, "settings.scan_interval", "got inf"),
    (GOOD.replace("  settle: 1", "  stop_timeout: .nan"), 2, "settings.stop_timeout", "got nan"),
    (GOOD.replace("  settle: 1", "  journal: inbox"), 2, "settings.journal", "is a folder; give the journal's file name"),
    (GOOD.replace("  settle: 1", "  journal: style.png/j.sqlite"), 2, "settings.journal", "style.png is not a folder"),
    (GOOD.replace("    watch: inbox", "    watch: $NST_TEST_UNSET/inbox"), 7, "rules.one.watch",
     "$NST_TEST_UNSET/inbox: the environment variable $NST_TEST_UNSET is not set"),
    (GOOD.replace("    output: out", "    output: ${NST_TEST_UNSET}/out"), 9, "rules.one.output", "is not set"),
    (GOOD.replace("    watch: inbox", "    watch: " + "x" * 300), 7, "rules.one.watch", "File name too long"),
    (GOOD.replace("    style: style.png", "    style: " + "s" * 300 + ".png"), 8, "rules.one.style", "File name too long"),
    # Issue 8.4: only names that can be written (nst_core.images.SAVE_FORMATS, as save_image).
    (GOOD.replace("    output: out", "    output: out\n    name: '{stem}.gif'"), 10, "rules.one.name",
     "an image extension that can be written (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp)"),
    (GOOD.replace("    output: out", "    output: out\n    name: '{stem}.pdf'"), 10, "rules.one.name", "can be written"),
    (GOOD.replace("    output: out", "    output: out\n    include: ['*.png', '*.GIF']\n    name: '{stem}{ext}'"), 10,
     "rules.one.include", "takes *.GIF, but the name '{stem}{ext}' keeps the input's extension"),
    # YAML that Python cannot hold: a parse error for that value, not a traceback.
    (GOOD.replace("      size: 64", "      size: " + "9" * 5000), 11, "rules.one.params.size", "cannot read value"),
    (GOOD.replace("    output: out", "    output: out\n    min_input_side: !!binary 'xyz!'"), 10,
     "rules.one.min_input_side", "cannot read value"),
    (GOOD.replace("    output: out", "    output: out\n    min_input_side: !!timestamp 2001-99"), 10,
     "rules.one.min_input_side", "cannot read value"),
]


@pytest.mark.parametrize("text,line,key,words", CASES, ids=[c[2] + ":" + c[3][:20] for c in CASES])
def test_each_bad_config_names_file_line_and_key(folder, text, line, key, words):
    errs = errors(folder, text.replace("{folder}", str(folder)))
    mine = [e for e in errs if f": {key}: " in e]
    assert len(mine) == 1, errs
    err = mine[0]
    path = folder / "config.yaml"
    assert err.startswith(f"{path}:{line}:"), err
    assert f": {key}: " in err, err
    assert words in err, err


def test_yaml_syntax_error_names_file_and_line(folder):
    err = one_error(folder, GOOD.replace("    output: out", "    output: [out"))
    assert err.startswith(f"{folder / 'config.yaml'}:") and "YAML syntax" in err, err
    assert int(err.split(":")[1]) >= 9


def test_duplicate_rule_names_and_overlapping_folders(folder):
    text = GOOD + (
        "  - rule: one\n    watch: inbox2\n    style: style.png\n    output: out2\n"
        "  - rule: three\n    watch: inbox\n    style: style.png\n    output: out3\n"
        "  - rule: four\n    watch: .\n    recursive: true\n    style: style.png\n    output: out4\n")
    errs = errors(folder, text)
    path = folder / "config.yaml"
    assert any(e.startswith(f"{path}:12:") and "rules[1].rule" in e and "duplicate rule name" in e for e in errs), errs
    assert any(e.startswith(f"{path}:17:") and "rules.three.watch" in e and "also watched by rule 'one'" in e
               for e in errs), errs
    assert any(e.startswith(f"{path}:21:") and "rules.four.watch" in e and "recursively" in e for e in errs), errs


def test_all_problems_are_reported_at_once(folder):
    text = GOOD.replace("  settle: 1", "  settle: x").replace("      size: 64", "      size: 1").replace(
        "    output: out", "    output: out\n    colour: red")
    errs = errors(folder, text)
    keys = sorted(e.split(": ")[1] for e in errs)
    assert keys == ["rules.one.colour", "rules.one.params.size", "settings.settle"], errs


def test_empty_and_missing_files(folder):
    errs = errors(folder, "")
    assert "exactly one YAML document" in errs[0]
    with pytest.raises(ConfigError) as info:
        load_config(folder / "absent.yaml")
    assert str(folder / "absent.yaml") in info.value.message and "no such file" in info.value.message


def test_dashes_and_ratio_are_accepted_as_in_the_cli(folder):
    (folder / "config.yaml").write_text(GOOD.replace("      size: 64", "      content-weight: 2\n      ratio: 0.01"))
    p = load_config(folder / "config.yaml").rules[0].params
    assert p.content_weight == 2 and p.style_weight == pytest.approx(200)


def test_create_true_allows_a_missing_watched_folder(folder):
    (folder / "config.yaml").write_text(GOOD.replace("    watch: inbox", "    watch: new/inbox\n    create: true"))
    assert load_config(folder / "config.yaml").rules[0].watch == (folder / "new" / "inbox",)


def test_rule_version_changes_with_params_and_style_content(folder):
    path = folder / "config.yaml"
    path.write_text(GOOD)
    v1 = load_config(path).rules[0].version
    path.write_text(GOOD.replace("size: 64", "size: 65"))
    v2 = load_config(path).rules[0].version
    path.write_text(GOOD)
    write_image(folder / "style.png", 2, (32, 32))  # same name, other pixels
    v3 = load_config(path).rules[0].version
    path.write_text(GOOD.replace("    output: out", "    output: elsewhere"))
    v4 = load_config(path).rules[0].version
    assert len({v1, v2, v3}) == 3 and v4 == v3  # output place does not change the pixels


def test_templates():
    when = dt.datetime(2024, 5, 31, 14, 25, 1)
    src = Path("/in/photo.jpg")
    styles = [Path("/s/starry.jpg"), Path("/s/scream.png")]
    assert render_template("{stem}_{rule}{ext}", src, "r", styles, when) == "photo_r.jpg"
    assert render_template("{date}/{stem}-{time}-{style}.png", src, "r", styles, when) == \
        "2024-05-31/photo-142501-starry+scream.png"
    assert render_template("{date:%Y%m%d}_{stem}{ext}", src, "r", styles, when) == "20240531_photo.jpg"
    assert check_template("{stem}{ext}") is None
    assert "unknown placeholder" in check_template("{name}{ext}")
    assert check_template("{stem}.png") is None
    assert "hidden" in check_template(".{stem}{ext}")


def test_ignored_names():
    for name in (".hidden.jpg", "a.jpg.part", "b.crdownload", "c.tmp", "~$d.jpg", "E.PART"):
        assert is_ignored_name(name), name
    for name in ("photo.jpg", "part.jpg", "tmp.png"):
        assert not is_ignored_name(name), name


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "daemon.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_check_config_exit_codes_and_output(folder):
    path = folder / "config.yaml"
    path.write_text(GOOD)
    ok = run_cli("--config", str(path), "--check-config")
    assert ok.returncode == 0, ok.stderr
    assert "rule one" in ok.stdout and f"watches {folder / 'inbox'}" in ok.stdout
    assert f"writes {folder / 'out' / 'photo_one.jpg'}" in ok.stdout and "size=64" in ok.stdout
    path.write_text(GOOD.replace("size: 64", "size: 5"))
    bad = run_cli("--config", str(path), "--check-config")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == f"{path}:11:13: rules.one.params.size: must be original (0) or between 16 and 16384, got 5"


def test_repo_config_yaml_is_valid_as_it_is():
    r = run_cli("--config", "config.yaml", "--check-config")
    assert r.returncode == 0, r.stderr
    assert "rule gravel " in r.stdout and "rule gravel-colour " in r.stdout
    assert "nst_core/samples/gravel.png" in r.stdout


# ---- files made to hurt (issue 9.5): refused from the event stream, with the line, in no time -----


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": each anchor is nine aliases of the one before; *i stands for 9^9 strings."""
    lines, prev = ['  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'], "a"
    for name in "bcdefghijklmn"[:levels - 1]:
        lines.append(f"  {name}: &{name} [" + ", ".join(["*" + prev] * 9) + "]")
        prev = name
    return "\n".join(lines) + "\n", prev


def test_an_alias_bomb_is_refused_naming_the_line_without_expanding_it(folder):
    body, last = alias_bomb()
    text = "x-anchors:\n" + body + GOOD.replace("    output: out", "    output: out\n    include: *" + last)
    err = one_error(folder, text)
    # Refused where the expansion passes the bound (a, b, ... e hold 74 732 values; f's first *e passes 100 000).
    bomb_line = next(i for i, x in enumerate(text.splitlines(), 1) if x.startswith("  f: &f"))
    assert err.startswith(f"{folder / 'config.yaml'}:{bomb_line}:"), err
    assert "more than 100,000 values once its aliases are expanded (*e alone stands for 66,430)" in err, err


def test_nesting_900_deep_is_refused_naming_the_line(folder):
    text = GOOD.replace("    output: out", "    output: out\n    include: " + "[" * 900 + "]" * 900)
    err = one_error(folder, text)
    assert err.startswith(f"{folder / 'config.yaml'}:10:"), err
    assert "nested more than 32 levels deep" in err


def test_a_recursive_alias_an_oversized_file_and_bytes_that_are_not_text_are_refused(folder):
    err = one_error(folder, GOOD.replace("    output: out", "    output: out\n    include: &r [*r]"))
    assert err.startswith(f"{folder / 'config.yaml'}:10:") and "recursive" in err, err
    err = one_error(folder, GOOD + "#" * (1 << 20))
    assert err == f"{folder / 'config.yaml'}: larger than 1024 kB; a rule file is a few kB (is this the right file?)"
    (folder / "config.yaml").write_bytes(GOOD.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(folder / "config.yaml")
    assert str(info.value.problems[0]).startswith(f"{folder / 'config.yaml'}:12:") and "not UTF-8" in info.value.message


def test_check_config_exits_2_without_a_traceback_for_each_hostile_file(folder):
    path = folder / "config.yaml"
    body, last = alias_bomb()
    for text in ("x-anchors:\n" + body + GOOD.replace("    output: out", "    output: out\n    include: *" + last),
                 GOOD.replace("    output: out", "    output: out\n    include: " + "[" * 900 + "]" * 900),
                 GOOD.replace("      size: 64", "      size: " + "9" * 5000)):
        path.write_text(text)
        r = run_cli("--config", str(path), "--check-config")
        assert r.returncode == 2 and r.stderr.startswith(f"{path}:") and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_environment_variables_in_paths_expand_when_set(folder, monkeypatch):
    monkeypatch.setenv("NST_TEST_STUDIO", str(folder))
    (folder / "config.yaml").write_text(GOOD.replace("    watch: inbox", "    watch: ${NST_TEST_STUDIO}/inbox")
                                        .replace("    output: out", "    output: $NST_TEST_STUDIO/out"))
    rule = load_config(folder / "config.yaml").rules[0]
    assert rule.watch == (folder / "inbox",) and rule.output == folder / "out"


def test_a_style_too_small_at_the_working_size_is_a_config_error_naming_the_file(folder):
    write_image(folder / "thin.png", 3, (40, 64))  # at size 16: 10×16, smaller than relu5_1 takes
    text = GOOD.replace("style: style.png", "style: thin.png").replace("size: 64", "size: 16")
    err = one_error(folder, text)
    assert err.startswith(f"{folder / 'config.yaml'}:8:") and ": rules.one.style: " in err, err
    assert f"{folder / 'thin.png'} (40×64) becomes 10×16 at size 16, too small for layer relu5_1" in err
    (folder / "config.yaml").write_text(text.replace("size: 16", "size: 32"))  # 20×32: fine
    assert load_config(folder / "config.yaml").rules[0].params.size == 32


# ---- the same, sent to a running daemon ---------------------------------------------------------


def _capped(gib: int = 4) -> list[str]:
    """A prefix that caps the daemon's data memory, so that a broken bound fails the test, not the machine."""
    cap = gib << 30
    return [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_DATA, "
            f"({cap}, {cap})); os.execv(sys.argv[1], sys.argv[1:])"]


def test_sighup_with_an_alias_bomb_keeps_the_running_daemon_serving(tmp_path):
    from daemon_util import Daemon, NotifyListener, files, make_config, wait_until

    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"}], settings={"device": "cpu"})
    good = cfg.read_text()
    listener = NotifyListener()
    try:
        with Daemon(cfg, env={"NOTIFY_SOCKET": listener.name}, prefix=_capped()) as d:
            d.start()
            write_image(tmp_path / "in" / "a.png", 1)
            wait_until(lambda: files(tmp_path / "out"), 60, "the first output")
            body, last = alias_bomb()
            cfg.write_text("x-anchors:\n" + body + good.replace("output: out", "output: out\n  include: *" + last))
            bomb_line = next(i for i, x in enumerate(cfg.read_text().splitlines(), 1) if x.startswith("  f: &f"))
            start, mark = len(d.lines), len(listener.messages)
            d.signal(signal.SIGHUP)
            d.wait_log("keeping the rules in use", start=start, timeout=30)
            assert f"{cfg}:{bomb_line}:" in d.text and "more than 100,000 values" in d.text
            # systemd hears READY=1 again, and the status says the reload failed, until one succeeds.
            ready = listener.wait_for("READY", "1", after=mark, timeout=30)
            assert ready["STATUS"].startswith("reload failed, old rules in use: ") and f":{bomb_line}:" in ready["STATUS"]
            # The same with a 900-deep list; then it still takes files under the old rules.
            cfg.write_text(good.replace("output: out", "output: out\n  include: " + "[" * 900 + "]" * 900))
            start = len(d.lines)
            d.signal(signal.SIGHUP)
            d.wait_log("keeping the rules in use", start=start, timeout=30)
            assert "nested more than 32 levels deep" in d.text
            write_image(tmp_path / "in" / "b.png", 2)
            wait_until(lambda: len(files(tmp_path / "out")) == 2, 60, "an output after the bad reloads")
            assert d.proc.poll() is None and "Traceback" not in d.text
            # A good file again: the status forgets the failure.
            cfg.write_text(good)
            mark = len(listener.messages)
            d.signal(signal.SIGHUP)
            ready = listener.wait_for("READY", "1", after=mark, timeout=30)
            assert "reload failed" not in ready["STATUS"]
            assert d.stop() == 0
    finally:
        listener.close()


def test_a_second_daemon_with_another_journal_on_the_same_inbox_is_refused(tmp_path):
    from daemon_util import Daemon, files, journal_rows, make_config, wait_until

    cfg_a = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"}], name="a.yaml")
    cfg_b = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"}],
                        settings={"journal": "state-b/journal.sqlite"}, name="b.yaml")
    with Daemon(cfg_a) as a:
        a.start()
        with Daemon(cfg_b) as b:
            b.start(wait_ready=False)
            assert b.proc.wait(60) == 2
            line = b.wait_log("cannot start")
            assert f"{tmp_path / 'in'} is already watched by nst-daemon pid {a.proc.pid}" in line
            assert f"with the journal {tmp_path / 'state' / 'journal.sqlite'}" in line
        for i in range(3):
            write_image(tmp_path / "in" / f"p{i}.png", i)
        wait_until(lambda: len(files(tmp_path / "in" / "processed")) == 3, 60, "three inputs done")
        # A reload that would take a folder another journal's daemon watches fails, and keeps the rules.
        cfg_b2 = make_config(tmp_path, [{"rule": "r2", "watch": "in2", "output": "out2"}],
                             settings={"journal": "state-b/journal.sqlite"}, name="b2.yaml")
        with Daemon(cfg_b2) as b2:
            b2.start()
            make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"},
                                   {"rule": "r2", "watch": "in2", "output": "out2"}], name="a.yaml")
            start = len(a.lines)
            a.signal(signal.SIGHUP)
            line = a.wait_log("reload of", start=start, timeout=30)
            assert "failed; keeping the rules in use" in line, line
            assert f"{tmp_path / 'in2'} is already watched by nst-daemon pid {b2.proc.pid}" in a.text
            assert b2.stop() == 0
        make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"}], name="a.yaml")
        # Instances that share the journal share the folder (nst-daemon@N): a second one starts.
        with Daemon(cfg_a, "--instance", "two", "--socket", "none") as a2:
            a2.start()
            a2.kill9()  # and dies, leaving its lock file
        assert a.stop() == 0
    assert [p.name for p in files(tmp_path / "out")] == ["p0_r.png", "p1_r.png", "p2_r.png"]  # once each
    assert len(journal_rows(tmp_path / "state" / "journal.sqlite")) == 3
    assert not (tmp_path / "state-b" / "journal.sqlite").exists() or not journal_rows(tmp_path / "state-b" / "journal.sqlite")
    locks = lambda: sorted(p.name for p in (tmp_path / "in").iterdir() if p.name.startswith(".nst-daemon"))
    assert len(locks()) == 1 and locks()[0].endswith(".two.lock")  # the clean stop removed its own; the killed one's stays
    # Once the daemons are gone (even killed), the second journal's daemon may take the folder.
    with Daemon(cfg_b) as b:
        b.start()
        assert b.stop() == 0
    assert locks() == []


def test_dry_run_and_check_config_by_hand_read_the_running_services_journal(tmp_path):
    from daemon_util import Daemon, files, make_config, wait_until

    # As under systemd: the journal is $STATE_DIRECTORY/journal.sqlite and the socket $RUNTIME_DIRECTORY/nst.sock.
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out", "keep_inputs": True}],
                      settings={"journal": None, "socket": "default"})
    service_env = {"STATE_DIRECTORY": str(tmp_path / "lib"), "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    by_hand = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "user-state"), "PYTHONPATH": str(REPO)}
    for k in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY"):
        by_hand.pop(k, None)
    write_image(tmp_path / "in" / "done.png", 1)
    with Daemon(cfg, env=service_env) as d:
        d.start()
        wait_until(lambda: files(tmp_path / "out"), 60, "the output")
        dry = subprocess.run([sys.executable, "-m", "daemon.main", "--config", str(cfg), "--dry-run"], cwd=REPO,
                             env=by_hand, capture_output=True, text=True, timeout=120)
        check = subprocess.run([sys.executable, "-m", "daemon.main", "--config", str(cfg), "--check-config"],
                               cwd=REPO, env=by_hand, capture_output=True, text=True, timeout=120)
        assert d.stop() == 0
    assert dry.returncode == 0, dry.stderr
    assert f"journal {tmp_path / 'lib' / 'journal.sqlite'} (the journal of the running nst-daemon pid {d.proc.pid}" \
        in dry.stdout
    assert f"rule r: {tmp_path / 'in' / 'done.png'}: done already" in dry.stdout  # was: "would process"
    assert "0 file(s) to process" in dry.stdout
    assert not (tmp_path / "user-state").exists()
    assert check.returncode == 0, check.stderr
    assert f"(as run now, by hand; under systemd: $STATE_DIRECTORY/journal.sqlite)" in check.stdout
    assert (f"running now: nst-daemon pid {d.proc.pid}" in check.stdout
            and f"journal {tmp_path / 'lib' / 'journal.sqlite'}, socket {tmp_path / 'run' / 'nst.sock'}; "
                f"watching {tmp_path / 'in'}" in check.stdout), check.stdout
    # With the service stopped, the dry run says which journal it read.
    dry = subprocess.run([sys.executable, "-m", "daemon.main", "--config", str(cfg), "--dry-run"], cwd=REPO,
                         env=by_hand, capture_output=True, text=True, timeout=120)
    assert f"journal {tmp_path / 'user-state' / 'nst-daemon' / 'journal.sqlite'} (no nst-daemon watches this " \
           "folder now; the journal it would use run as now): none yet" in dry.stdout


def test_a_journal_path_that_is_a_folder_stops_the_start_with_exit_2_not_a_traceback(tmp_path):
    from daemon_util import Daemon, make_config

    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"}], settings={"journal": None})
    (tmp_path / "lib" / "journal.sqlite").mkdir(parents=True)  # the default under systemd is a folder
    with Daemon(cfg, env={"STATE_DIRECTORY": str(tmp_path / "lib")}) as d:
        d.start(wait_ready=False)
        assert d.proc.wait(60) == 2
        line = d.wait_log("cannot start")
    assert f"journal {tmp_path / 'lib' / 'journal.sqlite'}: is a folder" in line and "Traceback" not in d.text


def test_any_mangled_file_is_a_config_or_a_config_error_never_another_exception(folder):
    """Seeded mutations of config.yaml and GOOD (YAML tokens, tags, anchors, deletions): load_config
    either loads or raises ConfigError (before: AttributeError for `!!timestamp 2001-99`, ...)."""
    import random

    base = (REPO / "config.yaml").read_text().replace("nst_core/samples/gravel.png", "style.png")
    tokens = ["[", "]", "{", "}", ":", "- ", "&a ", "*a", "!!binary ", "!!int ", "!!float ", "!!map ", "!!seq ",
              "? ", "|", ">", "'", '"', ".inf", ".nan", "~", "null", "0x1F", "9" * 30, "\t", "\n", "  ", "---\n",
              "%YAML 1.1\n", "!!set ", "!!timestamp 2001-99", "!!timestamp 2001-12-14", "<<: *a", "$HOME", "${X}",
              "9" * 5000, "[" * 400, "!!timestamp 2001-99 ", "!!float 1e999999",
              "..", "\u2028"]
    rng = random.Random(7)
    path = folder / "config.yaml"
    loaded = 0
    for _ in range(400):
        text = rng.choice([base, GOOD])
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(text) + 1)
            if rng.random() < 0.3:
                text = text[:pos] + text[pos + rng.randint(1, 20):]
            else:
                text = text[:pos] + rng.choice(tokens) + text[pos:]
        path.write_text(text)
        try:
            load_config(path, check_styles=False)
            loaded += 1
        except ConfigError as e:
            assert e.problems and all(str(p).startswith(str(path)) for p in e.problems)
    assert 0 < loaded < 400  # both outcomes were exercised


def test_every_rule_key_is_read_by_the_table_and_a_wrong_value_names_its_line_and_key(folder):
    """The rule loader is a table (RULE_FIELDS, with RULE_DEFAULTS) plus the keys read on their own;
    every key of the table refuses a value of the wrong kind with one problem naming it."""
    from daemon.config import REQUIRED_RULE_KEYS, RULE_DEFAULTS, RULE_FIELDS, RULE_KEYS

    own = {"watch", "style", "output", "params", "rule"}  # read by their own methods
    assert set(RULE_KEYS) == set(RULE_FIELDS) | own and set(REQUIRED_RULE_KEYS) <= own
    assert set(RULE_FIELDS) == set(RULE_DEFAULTS) - {"params"}
    wrong = {"strings": 5, str: 7, bool: "maybe", int: "many", object: "sometimes"}
    for key, spec in RULE_FIELDS.items():
        text = GOOD.replace("    output: out\n", f"    output: out\n    {key}: {wrong[spec.kind]}\n")
        (problem,) = errors(folder, text)
        assert "config.yaml:10:" in problem and f"rules.one.{key}: " in problem, problem
    ok = load_config_text(folder, GOOD.replace("    output: out\n", "    output: out\n    poll: false\n"
                                               "    exclude: []\n    processed: done\n    min_input_side: 64\n"))
    rule = ok.rules[0]
    assert (rule.poll, rule.exclude, rule.processed, rule.min_input_side) == ("never", (), "done", 64)


def load_config_text(folder: Path, text: str):
    path = folder / "config.yaml"
    path.write_text(text)
    return load_config(path)
