"""The rule file: every bad config gives its exact error (file, line, key); config.yaml works as is."""

import datetime as dt
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.config import ConfigError, check_template, is_ignored_name, load_config, render_template
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
]


@pytest.mark.parametrize("text,line,key,words", CASES, ids=[c[2] + ":" + c[3][:20] for c in CASES])
def test_each_bad_config_names_file_line_and_key(folder, text, line, key, words):
    errs = errors(folder, text)
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
    assert bad.stderr.strip() == f"{path}:11:13: rules.one.params.size: must be between 16 and 16384, got 5"


def test_repo_config_yaml_is_valid_as_it_is():
    r = run_cli("--config", "config.yaml", "--check-config")
    assert r.returncode == 0, r.stderr
    assert "rule gravel " in r.stdout and "rule gravel-colour " in r.stdout
    assert "nst_core/samples/gravel.png" in r.stdout
