"""The command line and the catalogue against hostile or careless input (issue 13, item 1).

Catalogue names are plain stems checked against the folder; the picture is named from
that checked name; nothing is overwritten without ``--force``; every failure is one line
on stderr naming the file and field at fault, with a non-zero exit and no traceback; a
bad catalogue file is reported and skipped by ``list``. Also the packaging of the tools
wing: the catalogue is package data, the core never imports the tools, the tools use the
core's public names only.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

import flexna
from flexna.tools import catalogue
from flexna.tools.cli import main

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GOOD = {
    "name": "good", "description": "a small valid entry", "source": "tests",
    "shape": [12, 16], "kernel_size": [3, 5], "stride": [1, 2], "dilation": [2, 1],
    "is_causal": [False, True], "heads": 2, "head_dim": 16,
}
# flags of show/analyze that an error must not name unless they were passed
PATTERN_FLAG = re.compile(r"--(shape|kernel|stride|dilation|causal|q-tile|kv-tile|block-size|query|out)\b")


def write_entry(folder: Path, stem: str, **changes) -> Path:
    """``folder/stem.json``: the valid entry ``GOOD`` named ``stem``, with ``changes``."""
    path = folder / f"{stem}.json"
    path.write_text(json.dumps({**GOOD, "name": stem, **changes}))
    return path


def raw_entry(field: str, text: str) -> str:
    """The JSON text of the entry ``bad`` with ``field``'s value written as ``text`` (e.g. NaN)."""
    entry = {**GOOD, "name": "bad", field: "@@"}
    return json.dumps(entry).replace('"@@"', text)


@pytest.fixture
def cat(tmp_path, monkeypatch):
    """A catalogue folder ``cat/`` with one valid entry ``good``; the current folder is ``work/``."""
    folder = tmp_path / "cat"
    folder.mkdir()
    write_entry(folder, "good")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(catalogue.CATALOGUE_ENV, raising=False)
    return folder


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of an in-process ``flexna`` call (argparse exits included)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flexna {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


# ---------------------------------------------------------------------------------------------
# Names

@pytest.mark.parametrize("name", ["../other/secret", "../cat/good", "sub/good", "good.json", "",
                                  ".", "..", ".hidden", "no-such", "good ", "GOOD", "ABSOLUTE"])
@pytest.mark.parametrize("command", ["show", "analyze"])
def test_names_are_plain_stems_of_the_folder(tmp_path, cat, capsys, command, name):
    other = tmp_path / "other"
    other.mkdir()
    write_entry(other, "secret")  # a valid entry outside the catalogue folder
    write_entry(cat, ".hidden")   # hidden files are not entries
    (cat / "sub").mkdir()
    write_entry(cat / "sub", "good")
    if name == "ABSOLUTE":
        name = str(other / "secret")
    code, out, err = run([command, name, "--catalogue", str(cat)], capsys)
    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"flexna {command}: error: argument NAME: ")
    assert "is not a catalogue name" in last and f"`flexna list --catalogue {cat}`" in last
    assert pngs(tmp_path) == []


def test_unknown_name_in_the_shipped_catalogue_points_at_flexna_list(cat, capsys):
    code, _, err = run(["show", "../masks/nat-7x7"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].endswith("see them with `flexna list`")
    assert "--catalogue" not in err.splitlines()[-1]


def test_output_is_named_from_the_checked_name(tmp_path, cat, capsys):
    code, out, err = run(["show", "good", "--catalogue", str(cat)], capsys)
    assert code == 0 and err == ""
    assert pngs(tmp_path) == [tmp_path / "work" / "good.png"]
    assert (tmp_path / "work" / "good.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "wrote good.png" in out


@pytest.mark.parametrize("bad_name", ["../../x", str(Path("/tmp") / "flexna-hostile-x"), "x", "good"])
def test_json_name_must_equal_the_file_stem(tmp_path, cat, capsys, bad_name):
    write_entry(cat, "evil", name=bad_name)
    code, out, err = run(["show", "evil", "--catalogue", str(cat)], capsys)
    assert code == 1 and out == ""
    line = one_error_line(err, "show")
    assert str(cat / "evil.json") in line and "field 'name'" in line and "evil.json" in line
    assert pngs(tmp_path) == [] and not Path("/tmp/flexna-hostile-x.png").exists()
    code, out, err = run(["list", "--catalogue", str(cat)], capsys)
    assert code == 1 and "  good " in out and "evil" not in out
    assert err.strip().splitlines() == [line.replace("flexna show: error: ", "flexna list: skipped ")]


# ---------------------------------------------------------------------------------------------
# Malformed catalogue files: one line naming the file and the field, exit 1

HUGE = 10**400
MALFORMED = {
    # id: (the file: changes to the valid entry, or its text or bytes; expected in the error)
    "missing-key": (json.dumps({k: v for k, v in {**GOOD, "name": "bad"}.items() if k != "heads"}),
                    "field 'heads': missing"),
    "array": ("[1, 2, 3]", "must hold a JSON object, got a list"),
    "string": ('"good"', "must hold a JSON object, got a str"),
    "deep-nesting": ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    "deep-nesting-in-field": ({"shape": [[[[[[[[12]]]]]]]]}, "field 'shape[0]': must be an integer"),
    "heads-many": ({"heads": "many"}, "field 'heads': must be an integer"),
    "heads-huge": ({"heads": HUGE}, "field 'heads': 1000000000"),
    "shape-huge": ({"shape": [HUGE, 16]}, "field 'shape[0]': 1000000000"),
    "kernel-huge": ({"kernel_size": HUGE}, "field 'kernel_size'"),
    "too-many-digits": (raw_entry("heads", "9" * 5000), "not valid JSON"),
    "exponent": (raw_entry("heads", "1e400"), "field 'heads': must be an integer, got inf"),
    "heads-float": ({"heads": 2.0}, "field 'heads': must be an integer"),
    "heads-bool": ({"heads": True}, "field 'heads': must be an integer"),
    "heads-zero": ({"heads": 0}, "field 'heads': 0 is out of range"),
    "head_dim-negative": ({"head_dim": -3}, "field 'head_dim': -3 is out of range"),
    "heads-nan": (raw_entry("heads", "NaN"), "field 'heads': must be an integer, got nan"),
    "heads-infinity": (raw_entry("heads", "-Infinity"), "field 'heads': must be an integer"),
    "kernel-str-item": ({"kernel_size": [3, "5"]}, "field 'kernel_size[1]'"),
    "stride-null": ({"stride": None}, "field 'stride'"),
    "causal-str": ({"is_causal": "yes"}, "field 'is_causal'"),
    "causal-wrong-length": ({"is_causal": [True, False, True]}, "field 'is_causal'"),
    "shape-empty": ({"shape": []}, "field 'shape'"),
    "shape-4d": ({"shape": [2, 2, 2, 2]}, "field 'shape'"),
    "kernel-too-big": ({"kernel_size": [30, 5]}, "field 'kernel_size'"),
    "stride-above-kernel": ({"stride": [1, 9]}, "field 'stride'"),
    "description-int": ({"description": 5}, "field 'description': must be a string"),
    "description-escape": ({"description": "red \x1b[31m text"}, "field 'description'"),
    "name-null": ({"name": None}, "field 'name'"),
    "syntax": (raw_entry("heads", "2,,"), "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "not-utf8": (b"\xff\xfe{}", "not UTF-8"),
    "too-large": (raw_entry("source", '"' + "x" * (1 << 20) + '"'), "larger than a catalogue entry"),
    "long-text": ({"source": "x" * 5000}, "field 'source': must be one printable line"),
    "directory": (None, "cannot read"),
    # the optional adaptive object (adaptive blocks drawn by `flexna show`)
    "adaptive-not-object": ({"adaptive": 0.9}, "field 'adaptive': must be an object with threshold or "
                            "top_k, and seed, got 0.9 (float)"),
    "adaptive-both": ({"adaptive": {"threshold": 0.9, "top_k": 2, "seed": 0}},
                      "field 'adaptive': give exactly one of threshold (0 < threshold <= 1) and top_k "
                      "(an integer in 1..2147483647)"),
    "adaptive-neither": ({"adaptive": {"seed": 0}}, "field 'adaptive': give exactly one of threshold"),
    "adaptive-unknown": ({"adaptive": {"topk": 3, "seed": 0}}, "field 'adaptive.topk': 'topk' is not a "
                         "field of adaptive (allowed: threshold, top_k, seed)"),
    "adaptive-unknown-odd-key": ({"adaptive": {"a\u001b[31m": 3, "seed": 0}},
                                 "field 'adaptive': 'a\\x1b[31m' is not a field of adaptive"),
    "adaptive-threshold-zero": ({"adaptive": {"threshold": 0, "seed": 0}},
                                "field 'adaptive.threshold': 0 is out of range: need 0 < threshold <= 1"),
    "adaptive-threshold-above-one": ({"adaptive": {"threshold": 1.5, "seed": 0}}, "field "
                                     "'adaptive.threshold': 1.5 is out of range: need 0 < threshold <= 1"),
    "adaptive-threshold-nan": (raw_entry("adaptive", '{"threshold": NaN, "seed": 0}'),
                               "field 'adaptive.threshold': nan is out of range: need 0 < threshold <= 1"),
    "adaptive-threshold-str": ({"adaptive": {"threshold": "0.9", "seed": 0}},
                               "field 'adaptive.threshold': must be a number, got '0.9' (str)"),
    "adaptive-threshold-bool": ({"adaptive": {"threshold": True, "seed": 0}},
                                "field 'adaptive.threshold': must be a number, got True (bool)"),
    "adaptive-top_k-zero": ({"adaptive": {"top_k": 0, "seed": 0}},
                            "field 'adaptive.top_k': 0 is out of range: need 1 <= top_k <= 2147483647"),
    "adaptive-top_k-float": ({"adaptive": {"top_k": 2.0, "seed": 0}},
                             "field 'adaptive.top_k': must be an integer, got 2.0 (float)"),
    "adaptive-top_k-huge": ({"adaptive": {"top_k": HUGE, "seed": 0}}, "field 'adaptive.top_k': 1000000000"),
    "adaptive-seed-missing": ({"adaptive": {"top_k": 2}}, "field 'adaptive.seed': missing (an integer in "
                              "0..2147483647"),
    "adaptive-seed-negative": ({"adaptive": {"top_k": 2, "seed": -1}},
                               "field 'adaptive.seed': -1 is out of range: need 0 <= seed <= 2147483647"),
    "adaptive-seed-float": ({"adaptive": {"top_k": 2, "seed": 0.5}},
                            "field 'adaptive.seed': must be an integer, got 0.5 (float)"),
    "adaptive-too-big": ({"shape": [4096, 4096], "adaptive": {"top_k": 2, "seed": 0}},
                         "field 'adaptive': the synthetic q/k of its picture would hold 268435456 values"),
}


def make_bad(folder: Path, content) -> Path:
    path = folder / "bad.json"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:  # changes to the valid entry
        path.write_text(json.dumps({**GOOD, "name": "bad", **content}))
    return path


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_entry_is_one_line(tmp_path, cat, capsys, case):
    content, expected = MALFORMED[case]
    path = make_bad(cat, content)
    for command in ("show", "analyze"):
        code, out, err = run([command, "bad", "--catalogue", str(cat)], capsys)
        assert code == 1 and out == "", (command, err)
        line = one_error_line(err, command)
        assert f"{path}: " in line and expected in line, line
        assert not PATTERN_FLAG.search(line), line  # the user passed NAME, not these
        assert len(line) < 600, line
    assert pngs(tmp_path) == []
    code, out, err = run(["list", "--catalogue", str(cat)], capsys)
    assert code == 1
    assert "  good " in out and "1 bad files skipped" in out and "  bad " not in out
    skipped = err.strip().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f"flexna list: skipped {path}: ")
    assert expected in skipped[0]
    with pytest.raises(catalogue.CatalogueError) as exc:  # the library raises a ValueError too
        catalogue.load_entry("bad", cat)
    assert isinstance(exc.value, ValueError) and exc.value.where == str(path)


def test_bad_file_names_are_reported_by_list(cat, capsys):
    (cat / "-x.json").write_text(json.dumps(dict(GOOD, name="-x")))
    (cat / "a b.json").write_text(json.dumps(dict(GOOD, name="a b")))
    code, out, err = run(["list", "--catalogue", str(cat)], capsys)
    assert code == 1 and "  good " in out
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all("is not a plain catalogue name" in line for line in lines)
    code, _, err = run(["show", "a b", "--catalogue", str(cat)], capsys)
    assert code == 2 and "is not a catalogue name" in err


def test_malformed_entries_without_traceback_in_a_subprocess(tmp_path, cat):
    make_bad(cat, {"heads": "many"})
    (cat / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    # the flexna this test imported, whatever the install
    here = str(Path(flexna.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    for argv, status in ((["show", "bad"], 1), (["analyze", "deep"], 1), (["list"], 1),
                         (["show", "../cat/bad"], 2)):
        proc = subprocess.run([sys.executable, "-m", "flexna", *argv, "--catalogue", str(cat)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == status, proc.stderr
        assert "Traceback" not in proc.stderr
        if argv[0] == "list":
            assert "good" in proc.stdout and len(proc.stderr.strip().splitlines()) == 2
        elif status == 1:
            assert len(proc.stderr.strip().splitlines()) == 1


def test_closed_pipe_is_no_traceback(cat):
    for i in range(1500):  # more output than a pipe holds
        write_entry(cat, f"entry-{i:04d}")
    here = str(Path(flexna.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "flexna", "list", "--catalogue", str(cat)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline().startswith(b"catalogue ")
    proc.stdout.close()  # like `flexna list | head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1 and "Traceback" not in err and err == ""


# ---------------------------------------------------------------------------------------------
# The catalogue folder

def test_catalogue_folder_errors(tmp_path, cat, capsys, monkeypatch):
    for folder, problem in ((tmp_path / "nope", "no such folder"), (cat / "good.json", "not a folder")):
        for argv in (["list"], ["show", "good"], ["analyze", "good"]):
            code, out, err = run([*argv, "--catalogue", str(folder)], capsys)
            assert code == 1 and out == ""
            line = one_error_line(err, argv[0])
            assert str(folder) in line and problem in line
    monkeypatch.setenv(catalogue.CATALOGUE_ENV, str(tmp_path / "nope"))
    code, _, err = run(["list"], capsys)
    line = one_error_line(err, "list")
    assert code == 1 and "$FLEXNA_MASKS" in line and "--catalogue" not in line


def test_environment_variable_selects_the_catalogue(cat, capsys, monkeypatch):
    monkeypatch.setenv(catalogue.CATALOGUE_ENV, str(cat))
    code, out, _ = run(["list"], capsys)
    assert code == 0 and f"catalogue {cat}: 1 configurations" in out
    other = cat.parent / "other"
    other.mkdir()
    write_entry(other, "second")
    code, out, _ = run(["list", "--catalogue", str(other)], capsys)  # the option wins
    assert code == 0 and "second" in out and "good" not in out


def test_catalogue_ships_as_package_data(monkeypatch):
    monkeypatch.delenv(catalogue.CATALOGUE_ENV, raising=False)
    root = catalogue.catalogue_dir()
    assert str(root) == str(resources.files("flexna.tools.masks"))
    names = catalogue.list_entries()
    if (REPO / "masks").is_dir():  # a source checkout: the package data is the top-level masks/
        assert names == sorted(p.stem for p in (REPO / "masks").glob("*.json"))
    entries, bad = catalogue.load_all()
    assert bad == [] and [e.name for e in entries] == names and "nat-7x7" in names
    assert all((root / f"{name}.png").is_file() for name in names)


# ---------------------------------------------------------------------------------------------
# Output paths

def test_out_refuses_to_overwrite_without_force(tmp_path, cat, capsys):
    target = tmp_path / "work" / "pic.png"
    target.write_bytes(b"precious")
    code, out, err = run(["show", "good", "--catalogue", str(cat), "--out", str(target)], capsys)
    assert code == 1 and out == ""
    line = one_error_line(err, "show")
    assert f"{target} already exists" in line and "--force" in line
    assert target.read_bytes() == b"precious"
    code, out, err = run(["show", "good", "--catalogue", str(cat), "--out", str(target), "--force"],
                         capsys)
    assert code == 0 and err == "" and target.read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(p.name for p in target.parent.iterdir()) == ["pic.png"]  # no temporary left


def test_default_output_is_not_overwritten_either(tmp_path, cat, capsys):
    (tmp_path / "work" / "good.png").write_bytes(b"precious")
    code, _, err = run(["show", "good", "--catalogue", str(cat)], capsys)
    assert code == 1 and "good.png already exists" in one_error_line(err, "show")
    assert (tmp_path / "work" / "good.png").read_bytes() == b"precious"
    code, _, _ = run(["show", "good", "--catalogue", str(cat), "--force"], capsys)
    assert code == 0 and (tmp_path / "work" / "good.png").read_bytes().startswith(PNG_SIGNATURE)


def test_symlinks_are_replaced_not_followed(tmp_path, cat, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    link = tmp_path / "work" / "link.png"
    link.symlink_to(victim)
    dangling = tmp_path / "work" / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    for out in (link, dangling):
        code, _, err = run(["show", "good", "--catalogue", str(cat), "--out", str(out)], capsys)
        assert code == 1 and "already exists" in one_error_line(err, "show")
    assert not (tmp_path / "nowhere.png").exists()
    code, _, _ = run(["show", "good", "--catalogue", str(cat), "--out", str(link), "--force"], capsys)
    assert code == 0 and not link.is_symlink() and link.read_bytes().startswith(PNG_SIGNATURE)
    assert victim.read_bytes() == b"precious"


def test_out_folder(tmp_path, cat, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    code, _, _ = run(["show", "good", "--catalogue", str(cat), "--out", str(folder)], capsys)
    assert code == 0 and (folder / "good.png").read_bytes().startswith(PNG_SIGNATURE)
    code, _, err = run(["show", "good", "--catalogue", str(cat), "--out", str(folder)], capsys)
    assert code == 1 and f"{folder / 'good.png'} already exists" in one_error_line(err, "show")


@pytest.mark.parametrize("case", ["missing-folder", "missing-folder-slash", "parent-is-file",
                                  "target-is-folder", "unwritable"])
def test_bad_output_paths_are_one_line(tmp_path, cat, capsys, case):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "pics" / "good.png").mkdir(parents=True)
    out, expected = {
        "missing-folder": (tmp_path / "nope" / "x.png", "no such folder"),
        "missing-folder-slash": (f"{tmp_path / 'nope'}{os.sep}", "no such folder"),
        "parent-is-file": (tmp_path / "file.txt" / "x.png", "is not a folder"),
        "target-is-folder": (tmp_path / "pics", "is a folder"),
        "unwritable": (None, "cannot write"),
    }[case]
    if case == "unwritable":
        if os.geteuid() != 0:
            locked = tmp_path / "locked"
            locked.mkdir()
            locked.chmod(0o500)
            out = locked / "x.png"
        elif Path("/sys").is_dir():  # root may write anywhere but sysfs
            out = Path("/sys") / "flexna-hostile-test.png"
        else:
            pytest.skip("no unwritable folder for root here")
    for force in ([], ["--force"]):
        code, stdout, err = run(["show", "good", "--catalogue", str(cat), "--out", str(out), *force],
                                capsys)
        assert code == 1 and stdout == ""
        line = one_error_line(err, "show")
        assert expected in line and str(out).rstrip(os.sep) in line
        assert "--" not in line
    assert (tmp_path / "file.txt").read_text() == "x"
    assert [p for p in pngs(tmp_path) if not p.is_dir()] == []
    assert (tmp_path / "pics" / "good.png").is_dir() and not list((tmp_path / "pics" / "good.png").iterdir())


def test_write_failure_after_rendering_is_one_line(tmp_path, cat, capsys, monkeypatch):
    """An error while writing (a full disk, a folder made read-only meanwhile) is one line too."""
    import flexna.tools.cli as cli

    real_open = os.open

    def failing_open(path, flags, mode=0o777, **kwargs):
        if str(path).endswith(".png") or str(path).endswith(".png.tmp"):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(cli.os, "open", failing_open)
    for force in ([], ["--force"]):
        code, out, err = run(["show", "good", "--catalogue", str(cat), "--out", "x.png", *force],
                             capsys)
        assert code == 1 and out == ""
        assert "cannot write x.png: No space left on device" in one_error_line(err, "show")
    assert list((tmp_path / "work").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Flags in errors, and huge numbers on the command line

def test_errors_do_not_name_flags_that_were_not_passed(cat, capsys):
    write_entry(cat, "wide", kernel_size=[13, 5])  # the kernel does not fit the layout
    code, _, err = run(["analyze", "wide", "--catalogue", str(cat)], capsys)
    line = one_error_line(err, "analyze")
    assert code == 1 and "field 'kernel_size'" in line and "--kernel" not in line
    # the same mistake on the command line names the flag, which was passed
    code, _, err = run(["analyze", "--shape", "12", "16", "--kernel", "13", "5"], capsys)
    assert code == 2 and "argument --kernel: kernel_size" in err.splitlines()[-1]


def test_huge_block_size_is_an_argparse_error(capsys):
    code, _, err = run(["analyze", "--shape", "10", "--kernel", "3", "--block-size", str(10**40)],
                       capsys)
    assert code == 2 and "argument --block-size" in err.splitlines()[-1] and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# bench: needs a checkout

def test_bench_needs_a_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["bench", "--workloads", "flux-na"], capsys)
    line = one_error_line(err, "bench")
    assert code == 1 and out == ""
    assert "needs a flexna source checkout" in line and "current folder" in line
    assert "--checkout PATH" in line and "--workloads" not in line
    code, _, err = run(["bench", "--checkout", str(tmp_path / "nope")], capsys)
    line = one_error_line(err, "bench")
    assert code == 1 and f"{tmp_path / 'nope'} is not one" in line
    code, _, err = run(["bench", "--checkout"], capsys)
    assert code == 1 and "argument --checkout: expected a PATH" in one_error_line(err, "bench")


def test_bench_runs_the_checkouts_script(tmp_path, monkeypatch, capsys):
    script = tmp_path / "src" / "benchmarks" / "bench_attention.py"
    script.parent.mkdir(parents=True)
    record = tmp_path / "argv.json"
    script.write_text(f"import json, sys\nopen({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["bench", "--workloads", "flux-na", f"--checkout={tmp_path / 'src'}", "--backward"]) == 0
    assert json.loads(record.read_text()) == ["--workloads", "flux-na", "--backward"]
    monkeypatch.chdir(tmp_path / "src")  # the default checkout is the current folder
    assert main(["bench", "--dtype", "bf16"]) == 0
    assert json.loads(record.read_text()) == ["--dtype", "bf16"]


# ---------------------------------------------------------------------------------------------
# The tools wing: imports and packaging

CORE_NAMES = {  # what flexna.tools may import from the core (kept through refactors)
    "flexna.pattern": {"NAPattern", "as_int_tuple", "as_bool_tuple", "as_shape"},
    "flexna.geometry": {"axis_window_bounds", "tile_grid", "padded_shape"},
    "flexna.layout": {"as_tile", "TokenLayout"},
    "flexna.reference": {"reference_mask", "reference_attention", "reference_sliding_tile_mask",
                         "reference_radial_mask", "reference_radial_window_mask"},
    "flexna.blockmask": {"resolve_block_sizes"},
    "flexna.backends": {"block_sizes"},  # the FLASH differential builds masks in its block sizes
    "flexna.integrations.config": {"SparsityConfig"},  # catalogue entries' model_config
    "flexna.adaptive": {"local_qk"},  # the seeded synthetic q/k that adaptive entries are drawn from
}


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.py"))


def test_core_never_imports_the_tools():
    package = Path(flexna.__file__).parent
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] in ("tools", "__main__.py"):  # the wing; its entry point
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: from .tools import ...
                names = [f"flexna.{node.module or ''}".rstrip(".")]
            if isinstance(node, ast.ImportFrom) and names == ["flexna"]:
                names += [f"flexna.{a.name}" for a in node.names]
            for name in names:
                assert not name.startswith("flexna.tools"), f"{path.name} imports {name}"


def test_tools_use_only_public_core_names():
    tools = Path(flexna.__file__).parent / "tools"
    public = set(flexna.__all__)
    for path in _modules(tools):
        text = path.read_text()
        assert "__file__" not in text, f"{path.name} reads files relative to the source tree"
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flexna"):
                mod = node.module
                if mod.startswith("flexna.tools"):
                    continue
                names = {a.name for a in node.names}
                allowed = public if mod == "flexna" else CORE_NAMES.get(mod, set())
                assert names <= allowed, f"{path.name}: from {mod} import {names - allowed}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("flexna"):
                        assert alias.name == "flexna" or alias.name.startswith("flexna.tools"), (
                            f"{path.name}: import {alias.name}")
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "flexna"):
                assert node.attr in public, f"{path.name}: flexna.{node.attr} is not exported"


def test_pyproject_ships_every_subpackage_and_the_catalogue():
    tomllib = pytest.importorskip("tomllib")
    pyproject = REPO / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    config = tomllib.loads(pyproject.read_text())
    setup = config["tool"]["setuptools"]
    packages = set(setup["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts)
             for p in (REPO / "flexna").rglob("__init__.py")}
    assert found <= packages
    assert setup["package-dir"] == {"flexna.tools.masks": "masks"} and "flexna.tools.masks" in packages
    assert set(setup["package-data"]["flexna.tools.masks"]) >= {"*.json", "*.png"}
    assert config["project"]["scripts"]["flexna"] == "flexna.tools.cli:main"
