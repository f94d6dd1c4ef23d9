"""The extension zip built without Blender: plain Python builds it, Blender 4.2's and 5.0's validators accept it and
pack the same files; our rules refuse what Blender refuses (naming the field, the value and the rule), plus bad
licences, forbidden files and versions that disagree; the bundled server wheel installs offline with pip and holds
everything the server imports."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from one2345_addon import build, build_rules

REPO_ROOT = Path(__file__).resolve().parents[2]
BPY_ENVS = {"4.2": REPO_ROOT / ".venv-bpy42", "5.0": REPO_ROOT / ".venv-bpy50"}


def bpy_python(version: str) -> Path:
    python = BPY_ENVS[version] / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.is_file():
        pytest.fail(f"bpy {version} environment missing ({python}); run .ci/blender-envs")
    return python


def plain_env() -> dict[str, str]:
    """The environment of a fresh clone's shell: no Blender on PATH, no $ONE2345_BLENDER_PYTHON, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONE2345_BLENDER_PYTHON", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not (Path(p) / "blender").exists())
    return env


def run_plain_build(out: Path, *extra: str, hide_tomllib: bool = False) -> subprocess.CompletedProcess:
    """``python -S -m one2345_addon.build --out OUT --no-blender``: -S leaves site-packages out, so only the
    standard library is importable (no bpy, no server dependencies); optionally without tomllib (Python 3.10)."""
    if hide_tomllib:
        code = ("import runpy, sys; sys.modules['tomllib'] = None; sys.argv = ['build', *sys.argv[1:]]; "
                "runpy.run_module('one2345_addon.build', run_name='__main__')")
        cmd = [sys.executable, "-S", "-c", code]
    else:
        cmd = [sys.executable, "-S", "-m", "one2345_addon.build"]
    return subprocess.run([*cmd, "--out", str(out), "--no-blender", *extra], cwd=REPO_ROOT, env=plain_env(),
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def plain_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = run_plain_build(out)
    assert done.returncode == 0, done.stderr
    assert "Blender's validator: skipped (--no-blender)" in done.stderr and "checked the manifest" in done.stderr
    zip_path = Path(done.stdout.strip().splitlines()[-1])
    assert zip_path == out / f"one2345-{build.server_version()}.zip" and zip_path.is_file()
    return zip_path


def test_plain_python_zip_has_blenders_layout_and_the_server_wheel(plain_zip):
    with zipfile.ZipFile(plain_zip) as archive:
        names = archive.namelist()
        infos = {i.filename: i for i in archive.infolist()}
        manifest = build_rules.parse_toml_subset(archive.read("blender_manifest.toml").decode())
    version = build.server_version()
    wheel = f"server_wheel/one2345_blender-{version}-py3-none-any.whl"
    assert names[0] == "blender_manifest.toml" and "__init__.py" in names and wheel in names
    assert manifest["version"] == version
    assert not [n for n in names if n.endswith("/")]  # files only, at the root (no one2345/ prefix)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/." in "/" + n]
    assert "build.py" not in names and "build_rules.py" not in names and not [n for n in names if "docs/" in n]
    assert infos[wheel].compress_type == zipfile.ZIP_STORED
    assert infos["__init__.py"].compress_type == zipfile.ZIP_DEFLATED
    size = plain_zip.stat().st_size
    print(f"zip {plain_zip.name}: {size / 1024:.0f} KiB, {len(names)} files; wheel {infos[wheel].file_size / 1024:.0f} "
          f"KiB")
    assert size < 1024 * 1024, size  # small: the server's code only, no weights


@pytest.mark.parametrize("version", list(BPY_ENVS))
def test_blenders_validator_accepts_the_plain_zip_and_its_build_packs_the_same_files(plain_zip, version):
    validator = build.validator_from_python(bpy_python(version))
    assert f"Blender {version} validator" in validator.label and validator.tags
    assert "Success parsing TOML" in build.run_validator(validator, ["validate", str(plain_zip)])
    with zipfile.ZipFile(plain_zip) as archive:
        ours = archive.namelist()
    build.cross_check(validator, plain_zip.parent / "stage" / "one2345", plain_zip, ours)


def test_the_build_runs_blenders_validators_when_they_are_at_hand(tmp_path, monkeypatch):
    for version in BPY_ENVS:
        bpy_python(version)
    monkeypatch.delenv("ONE2345_BLENDER_PYTHON", raising=False)
    report: list[str] = []
    zip_path = build.build(tmp_path / "out", report=report)
    assert zip_path.is_file()
    passed = [line for line in report if "validator" in line and "passed" in line]
    assert len(passed) == 2 and "Blender 4.2" in passed[0] and "Blender 5.0" in passed[1], report
    report = []
    build.build(tmp_path / "explicit", blender_python=str(bpy_python("4.2")), report=report)
    assert next(line for line in report if "validator" in line).startswith("Blender 4.2 validator")


def test_without_tomllib_the_same_wheel_and_files_come_out(plain_zip, tmp_path):
    done = run_plain_build(tmp_path / "py310", hide_tomllib=True)
    assert done.returncode == 0, done.stderr
    other = Path(done.stdout.strip().splitlines()[-1])
    with zipfile.ZipFile(plain_zip) as a, zipfile.ZipFile(other) as b:
        assert a.namelist() == b.namelist()
        wheel = next(n for n in a.namelist() if n.endswith(".whl"))
        assert a.read(wheel) == b.read(wheel)  # reproducible: same sources, same wheel bytes
        assert a.read("blender_manifest.toml") == b.read("blender_manifest.toml")


@pytest.mark.parametrize("path", [build.MANIFEST, build.PYPROJECT])
def test_the_toml_subset_reader_equals_tomllib(path):
    import tomllib

    assert build_rules.parse_toml_subset(path.read_text(encoding="utf-8")) == tomllib.loads(path.read_text())
    tricky = ('a = "x # not a comment"  # comment\n"q.k" = \'lit\\\\\'\n[t.u]\nv = [\n  1, 2.5, # c\n  true,\n]\n'
              'w = { x = "\\u00e9\\t", y = [] }\nz = -3\n')
    assert build_rules.parse_toml_subset(tricky) == tomllib.loads(tricky)
    with pytest.raises(build_rules.ManifestError, match="line 2: multi-line strings"):
        build_rules.parse_toml_subset('a = 1\nb = """x\n"""\n')


NETWORK = "Install server packages, download weights, talk to the server"
LONG = NETWORK + " over HTTP"
ALL = tuple(BPY_ENVS)
BAD = [  # (what to change, the field named in the message, its value, words of the rule, Blenders that refuse it too)
    (('to the server"', 'to the server."'), "permissions.network", NETWORK + ".", "must not end with punctuation",
     ALL),
    ((NETWORK, LONG), "permissions.network", LONG, f"no longer than 64 characters expected, found {len(LONG)}", ALL),
    (('id = "one2345"', 'id = "one-2345"'), "id", "one-2345", "not a valid Python identifier", ALL),
    (('id = "one2345"', 'id = "one__2345"'), "id", "one__2345", "only single separators", ALL),
    (('tagline = "Turn one image into a coloured 3D mesh with One-2-3-45"', 'tagline = "Image to mesh!"'),
     "tagline", "Image to mesh!", "must not end with punctuation", ALL),
    (('blender_version_min = "4.2.0"', 'blender_version_min = "4.2"'), "blender_version_min", "4.2",
     "expected 3 numbers", ("5.0",)),  # Blender 4.2 still accepted "4.2"
    (('schema_version = "1.0.0"', 'schema_version = "1.0"'), "schema_version", "1.0", "semantic-version", ALL),
    (('files = "Read', 'webcam = "Look at you"\nfiles = "Read'), "permissions.webcam", "Look at you",
     "unknown permission", ALL),
    (('tags = ["Mesh", "Import-Export", "Object"]', 'tags = ["Mesh", "AI"]'), "tags[1]", "AI", "add-on tags", ALL),
    (('license = ["SPDX:GPL-3.0-or-later"]', 'license = ["GPL-3.0-or-later"]'), "license[0]", "GPL-3.0-or-later",
     "SPDX identifier", ()),
    (('license = ["SPDX:GPL-3.0-or-later"]', 'license = ["SPDX:Proprietary"]'), "license[0]", "SPDX:Proprietary",
     "GPL-incompatible", ()),
]


@pytest.mark.parametrize(("change", "field", "value", "rule", "blenders"), BAD,
                         ids=[f"{b[1]}={b[2][:12]}" for b in BAD])
def test_bad_manifests_fail_naming_the_field_the_value_and_the_rule(tmp_path, monkeypatch, change, field, value,
                                                                     rule, blenders):
    text = build.MANIFEST.read_text(encoding="utf-8")
    assert change[0] in text
    bad = tmp_path / "blender_manifest.toml"
    bad.write_text(text.replace(change[0], change[1], 1), encoding="utf-8")
    monkeypatch.setattr(build, "MANIFEST", bad)
    with pytest.raises(build.BuildError) as caught:
        build.build(tmp_path / "out", no_blender=True)
    message = str(caught.value)
    line = next((m for m in message.splitlines() if f'"{field}" = {value!r}' in m), None)
    assert line is not None and rule in line, message
    if blenders:  # Blender's own validator refuses the same manifest
        folder = build.stage(tmp_path / "blender", bad, build.PACKAGE_DIR, None)
        for version in blenders:
            with pytest.raises(build.BuildError, match="refused"):
                build.run_validator(build.validator_from_python(bpy_python(version)), ["validate", str(folder)])


def copy_package(tmp_path: Path) -> Path:
    package = tmp_path / "pkg"
    shutil.copytree(build.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    return package


@pytest.mark.parametrize(("name", "rule"), [
    (".secret", "hidden files"),
    ("stray.pyc", "Python cache"),
    ("scene.blend1", ".blend backup"),
    ("old-build.zip", "a zip inside the extension"),
    ("what?.txt", "cannot exist on Windows"),
    ("core/Client.py", "differ only in case"),
])
def test_forbidden_files_fail_naming_the_file_and_the_rule(tmp_path, monkeypatch, name, rule):
    package = copy_package(tmp_path)
    (package / name).write_bytes(b"x")
    manifest = tmp_path / "blender_manifest.toml"
    text = build.MANIFEST.read_text(encoding="utf-8")
    # exclusions that forget the file (only __pycache__/ and the developer tools stay excluded)
    manifest.write_text(re.sub(r"paths_exclude_pattern = \[.*?\]", 'paths_exclude_pattern = ["__pycache__/", '
                               '"/build.py", "/build_rules.py", "/docs/"]', text, flags=re.S), encoding="utf-8")
    monkeypatch.setattr(build, "MANIFEST", manifest)
    monkeypatch.setattr(build, "PACKAGE_DIR", package)
    with pytest.raises(build.BuildError) as caught:
        build.build(tmp_path / "out", no_blender=True)
    line = next(m for m in str(caught.value).splitlines() if name in m)
    assert rule in line, str(caught.value)


def test_an_excluded_hidden_file_is_fine_and_a_link_is_refused(tmp_path, monkeypatch):
    package = copy_package(tmp_path)
    (package / ".editorconfig").write_text("root = true\n")  # excluded by the manifest's "/.*"
    monkeypatch.setattr(build, "PACKAGE_DIR", package)
    assert ".editorconfig" not in zipfile.ZipFile(build.build(tmp_path / "out", no_blender=True)).namelist()
    manifest = tmp_path / "blender_manifest.toml"
    manifest.write_text(re.sub(r"paths_exclude_pattern = \[.*?\]", 'paths = ["__init__.py", "link.py"]',
                               build.MANIFEST.read_text(encoding="utf-8"), flags=re.S), encoding="utf-8")
    (package / "link.py").symlink_to(package / "core" / "client.py")
    monkeypatch.setattr(build, "MANIFEST", manifest)
    with pytest.raises(build.BuildError, match=r"'link\.py': listed for the zip but not a regular file"):
        build.build(tmp_path / "out2", no_blender=True)


def test_versions_must_agree_naming_all_three(tmp_path, monkeypatch):
    manifest = tmp_path / "blender_manifest.toml"
    manifest.write_text(re.sub(r'^version = "[^"]*"', 'version = "9.9.9"', build.MANIFEST.read_text(encoding="utf-8"),
                               count=1, flags=re.M))
    monkeypatch.setattr(build, "MANIFEST", manifest)
    with pytest.raises(build.BuildError) as caught:
        build.build(tmp_path / "out", no_blender=True)
    version = build.server_version()
    message = str(caught.value)
    assert f"pyproject.toml [project] version = '{version}'" in message
    assert f"server.__version__ = '{version}'" in message
    assert "blender_manifest.toml version = '9.9.9'" in message


def load_blender_ext(version: str = "5.0"):
    """Blender's own extension tool as a module (it is standard-library Python)."""
    tool = next(BPY_ENVS[version].glob("lib/python3*/site-packages/bpy/*/scripts/addons_core/bl_pkg/cli/"
                                       "blender_ext.py"), None)
    if tool is None:
        pytest.fail(f"bpy {version} environment missing; run .ci/blender-envs")
    spec = importlib.util.spec_from_file_location(f"blender_ext_{version.replace('.', '')}", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PATTERNS = ["__pycache__/", "/.*", "*.pyc", "/build.py", "/docs/", "docs", "a/b", "/a/**/c", "**/x.txt", "*.blend[1-9]",
            "!keep.pyc", "sub/", "/*.zip", "d?.py", "[ab].py"]
PATHS = [("__pycache__", True), ("x/__pycache__", True), (".hidden", False), ("x/.hidden", False), ("m.pyc", False),
         ("x/m.pyc", False), ("keep.pyc", False), ("build.py", False), ("x/build.py", False), ("docs", True),
         ("x/docs", True), ("docs", False), ("a/b", False), ("z/a/b", False), ("a/c", False), ("a/q/r/c", False),
         ("z/a/q/c", False), ("x.txt", False), ("y/x.txt", False), ("s.blend1", False), ("s.blend", False),
         ("sub", True), ("sub", False), ("q/sub", True), ("p.zip", False), ("y/p.zip", False), ("d1.py", False),
         ("a.py", False), ("c.py", False), ("ok.py", False)]


@pytest.mark.parametrize("version", list(BPY_ENVS))
def test_exclusion_patterns_match_blenders(version):
    blender_ext = load_blender_ext(version)
    for patterns in ([p] for p in PATTERNS):
        ours, theirs = build_rules.PathPatterns(patterns), blender_ext.PathPatternMatch(patterns)
        for path, is_dir in PATHS:
            expected = theirs.test_path(path + "/" if is_dir else path)
            assert ours.excluded(path, is_dir) == expected, (patterns, path, is_dir, expected)
    everything = build_rules.PathPatterns(PATTERNS), blender_ext.PathPatternMatch(PATTERNS)
    for path, is_dir in PATHS:
        assert everything[0].excluded(path, is_dir) == everything[1].test_path(path + "/" if is_dir else path), path


def test_the_bundled_wheel_installs_offline_and_reports_the_version(plain_zip, tmp_path):
    with zipfile.ZipFile(plain_zip) as archive:
        name = next(n for n in archive.namelist() if n.startswith("server_wheel/"))
        wheel = tmp_path / Path(name).name
        wheel.write_bytes(archive.read(name))
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-deps",
                    "--quiet", str(wheel)], check=True, timeout=120)
    done = subprocess.run([str(python), "-c", "import server; print(server.__version__); print(server.__file__)"],
                          capture_output=True, text=True, cwd=tmp_path, check=True)  # outside the checkout
    version, location = done.stdout.split()
    assert version == build.server_version() and Path(location).is_relative_to(venv)
    assert (venv / "bin" / "one2345").is_file()
    listed = subprocess.run([str(python), "-c", "import importlib.metadata as m; d = m.distribution('one2345-blender');"
                             " print(d.version); print('\\n'.join(d.requires))"], capture_output=True, text=True,
                            cwd=tmp_path, check=True).stdout.splitlines()
    server_extra = build_rules.load_toml(build.PYPROJECT)["project"]["optional-dependencies"]["server"]
    assert listed[0] == version and listed[1:] == server_extra


def test_the_wheel_holds_everything_the_server_imports():
    first_party = {p.name for p in REPO_ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert {"server", "training", "one2345_addon"} <= first_party
    imported = set()
    for path in (REPO_ROOT / "server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    assert imported & first_party == {"server"}  # no training, no add-on, no tests
    files = build.server_files()
    assert set(files) == {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "server").rglob("*.py")
                          if "__pycache__" not in p.parts}


INSTALL_FROM_TEXT_EDITOR = """
import bpy
text = bpy.data.texts.load({script!r})
with bpy.context.temp_override(edit_text=text):
    bpy.ops.text.run_script()  # what Text Editor > Run Script does
print("ENABLED", "bl_ext.user_default.one2345" in bpy.context.preferences.addons)
"""


@pytest.mark.parametrize("version", list(BPY_ENVS))
def test_the_in_blender_installer_builds_installs_and_enables_without_a_terminal(version, tmp_path):
    """The README's artist path: open one2345_addon/install.py in Blender's Text Editor and press Run Script."""
    script = REPO_ROOT / "one2345_addon" / "install.py"
    env = {**plain_env(), "BLENDER_USER_RESOURCES": str(tmp_path / "user")}
    done = subprocess.run([str(bpy_python(version)), "-c", INSTALL_FROM_TEXT_EDITOR.format(script=str(script))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "ENABLED True" in output, output[-3000:]
    assert "[one2345 install] installed and enabled bl_ext.user_default.one2345" in output
    installed = tmp_path / "user" / "extensions" / "user_default" / "one2345"
    assert (installed / "__init__.py").is_file() and (installed / "server_wheel").is_dir()
    assert not (installed / "install.py").exists() and not (installed / "build.py").exists()
