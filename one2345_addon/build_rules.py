"""The rules of Blender's extension validator that apply to this add-on, checked without Blender (build tool only).

Blender 4.2+ validates an extension with ``bl_pkg/cli/blender_ext.py`` (``blender --command extension validate``).
This module re-states, in its own code, the checks of that validator for a manifest like ours, with the same limits
and the same wording of each rule, plus the exclusion patterns of ``[build]`` (``gitignore``-style, as Blender
applies them while zipping) and checks on the files that end up in the zip. Where our rules are stricter than
Blender's (the licence must be an SPDX identifier of a GPL-compatible licence; tags must be Blender's; file names must
be valid on Windows), the message says so.

Also: a reader for the TOML subset manifests and ``pyproject.toml`` use, for Python 3.10 (no ``tomllib``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST_NAME = "blender_manifest.toml"
TERSE_MAX = 64
"""Characters allowed in the tagline and in each permission's reason (Blender's ``TERSE_DESCRIPTION_MAX_LENGTH``)."""
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$")
"""Semantic Versioning 2.0.0 (what Blender requires of ``schema_version`` and ``version``)."""
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PERMISSIONS = ("files", "network", "clipboard", "camera", "microphone")
TYPES = ("add-on", "theme")
PLATFORMS = ("windows-x64", "windows-arm64", "macos-x64", "macos-arm64", "linux-x64")
ADDON_TAGS = frozenset({
    "3D View", "Add Curve", "Add Mesh", "Animation", "Bake", "Camera", "Compositing", "Development", "Game Engine",
    "Geometry Nodes", "Grease Pencil", "Import-Export", "Lighting", "Material", "Mesh", "Modeling", "Node", "Object",
    "Paint", "Physics", "Pipeline", "Render", "Rigging", "Scene", "Sculpt", "Sequencer", "System", "Text Editor",
    "Tracking", "User Interface", "UV"})
"""The add-on tags Blender 4.2 and 5.0 accept (``_bpy_internal/extensions/tags.py``; ``All`` is for legacy add-ons)."""
GPL_COMPATIBLE_SPDX = frozenset({
    "GPL-2.0-or-later", "GPL-2.0-only", "GPL-3.0-or-later", "GPL-3.0-only", "LGPL-2.1-or-later", "LGPL-3.0-or-later",
    "MIT", "MIT-0", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0", "MPL-2.0", "Zlib", "BSL-1.0", "ISC", "CC0-1.0"})
"""SPDX identifiers of licences compatible with Blender's GPL (an add-on runs inside Blender)."""
DEFAULT_EXCLUDES = ("__pycache__/", ".*", "/*.zip", "*.blend[1-9]")
"""What Blender's build leaves out when the manifest has no ``[build]`` table."""
MIN_BLENDER = (4, 2, 0)
"""Extensions (a manifest instead of ``bl_info``) exist since Blender 4.2."""
WINDOWS_BAD_CHARS = set('<>:"|?*\\')


class ManifestError(ValueError):
    """One or more rules failed; ``problems`` lists each as a sentence naming the field, the value and the rule."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source} does not pass the extension rules:\n" + "\n".join(f"- {p}" for p in problems))


# -- 1. reading TOML (the subset manifests and pyproject.toml use) ---------------------------------------------------

def load_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file with ``tomllib`` (Python 3.11+), else with :func:`parse_toml_subset`.

    Raises:
        ManifestError: not valid TOML (the message names the file and line).
    """
    text = path.read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:
        return parse_toml_subset(text, str(path))
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(str(path), [f"not valid TOML: {exc}"]) from exc


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def parse_toml_subset(text: str, source: str = "TOML") -> dict[str, Any]:
    """A TOML reader for Python 3.10: tables (``[a.b]``), bare/quoted/dotted keys, basic and literal strings,
    integers, floats, booleans, arrays (over several lines, with comments) and inline tables. Multi-line strings,
    dates and arrays of tables are refused with the line number.

    Raises:
        ManifestError: a construct outside the subset, or malformed TOML.
    """
    root: dict[str, Any] = {}
    table = root
    lines = text.splitlines()
    i = 0

    def fail(message: str) -> ManifestError:
        return ManifestError(source, [f"line {i + 1}: {message}"])

    while i < len(lines):
        line = _strip_comment(lines[i]).strip()
        if not line:
            i += 1
            continue
        if line.startswith("[["):
            raise fail("arrays of tables ([[...]]) are not supported by this reader")
        if line.startswith("["):
            if not line.endswith("]"):
                raise fail(f"table header {line!r} is not closed")
            table = root
            for key in _split_key(line[1:-1].strip(), fail):
                table = table.setdefault(key, {})
                if not isinstance(table, dict):
                    raise fail(f"{line!r} redefines a value as a table")
            i += 1
            continue
        key_text, eq, rest = line.partition("=")
        if not eq:
            raise fail(f"expected 'key = value', found {line!r}")
        keys = _split_key(key_text.strip(), fail)
        # a value may continue over the next lines (arrays): join until it parses
        value_text, start = rest.strip(), i
        while True:
            try:
                value, end = _parse_value(value_text, 0, fail)
                if _strip_comment(value_text[end:]).strip():
                    raise fail(f"unexpected text after the value: {value_text[end:].strip()!r}")
                break
            except _Incomplete:
                i += 1
                if i >= len(lines):
                    i = start
                    raise fail("value is not closed before the end of the file") from None
                value_text += "\n" + lines[i]
        target = table
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        if keys[-1] in target:
            raise fail(f"key {'.'.join(keys)!r} is defined twice")
        target[keys[-1]] = value
        i += 1
    return root


class _Incomplete(Exception):
    """The value continues on the next line."""


def _strip_comment(line: str) -> str:
    quote = None
    for j, c in enumerate(line):
        if quote:
            if c == "\\" and quote == '"':
                continue
            if c == quote and (quote == "'" or line[j - 1] != "\\" or line[j - 2:j] == "\\\\"):
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#":
            return line[:j]
    return line


def _split_key(text: str, fail) -> list[str]:
    keys, j = [], 0
    while True:
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] in "\"'":
            value, j = _parse_string(text, j, fail)
            keys.append(value)
        else:
            m = _BARE_KEY.match(text, j)
            if not m:
                raise fail(f"bad key {text!r}")
            keys.append(m.group())
            j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j == len(text):
            return keys
        if text[j] != ".":
            raise fail(f"bad key {text!r}")
        j += 1


def _skip_space(text: str, j: int) -> int:
    while True:
        while j < len(text) and text[j] in " \t\r\n":
            j += 1
        if j < len(text) and text[j] == "#":
            while j < len(text) and text[j] != "\n":
                j += 1
            continue
        return j


def _parse_string(text: str, j: int, fail) -> tuple[str, int]:
    quote = text[j]
    if text.startswith(quote * 3, j):
        raise fail("multi-line strings are not supported by this reader")
    out, j = [], j + 1
    while j < len(text):
        c = text[j]
        if c == "\n":
            raise fail("a string is not closed on its line")
        if c == quote:
            return "".join(out), j + 1
        if c == "\\" and quote == '"':
            nxt = text[j + 1:j + 2]
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                j += 2
                continue
            if nxt in ("u", "U"):
                width = 4 if nxt == "u" else 8
                digits = text[j + 2:j + 2 + width]
                if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise fail(f"bad escape \\{nxt}{digits}")
                out.append(chr(int(digits, 16)))
                j += 2 + width
                continue
            raise fail(f"bad escape \\{nxt}")
        out.append(c)
        j += 1
    raise _Incomplete


def _parse_value(text: str, j: int, fail) -> tuple[Any, int]:
    j = _skip_space(text, j)
    if j >= len(text):
        raise _Incomplete
    c = text[j]
    if c in "\"'":
        return _parse_string(text, j, fail)
    if c == "[":
        items, j = [], j + 1
        while True:
            j = _skip_space(text, j)
            if j >= len(text):
                raise _Incomplete
            if text[j] == "]":
                return items, j + 1
            value, j = _parse_value(text, j, fail)
            items.append(value)
            j = _skip_space(text, j)
            if j >= len(text):
                raise _Incomplete
            if text[j] == ",":
                j += 1
            elif text[j] != "]":
                raise fail(f"expected ',' or ']' in an array, found {text[j]!r}")
    if c == "{":
        table: dict[str, Any] = {}
        j += 1
        while True:
            j = _skip_space(text, j)
            if j < len(text) and text[j] == "}":
                return table, j + 1
            end = text.find("=", j)
            if end < 0:
                raise fail("bad inline table")
            keys = _split_key(text[j:end].strip(), fail)
            value, j = _parse_value(text, end + 1, fail)
            target = table
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = value
            j = _skip_space(text, j)
            if j < len(text) and text[j] == ",":
                j += 1
    m = re.compile(r"true|false|[+-]?(?:inf|nan)|[+-]?[0-9_]+(?:\.[0-9_]+)?(?:[eE][+-]?[0-9_]+)?").match(text, j)
    if not m:
        raise fail(f"unsupported value {text[j:j + 30]!r}")
    word = m.group()
    if word in ("true", "false"):
        return word == "true", m.end()
    if re.fullmatch(r"[+-]?[0-9_]+", word):
        return int(word.replace("_", "")), m.end()
    return float(word.replace("_", "")), m.end()


# -- 2. the manifest ----------------------------------------------------------------------------------------------

def _terse(value: str) -> str | None:
    """Blender's rule for the tagline and permission reasons, or None when it passes."""
    if len(value) > TERSE_MAX:
        return f"a value no longer than {TERSE_MAX} characters expected, found {len(value)}"
    if (problem := _clean_text(value)) is not None:
        return problem
    if not (value[-1].isalnum() or value[-1] in ")]}"):
        return "alphanumeric suffix expected, the string must not end with punctuation"
    return None


def _clean_text(value: str) -> str | None:
    if not value.strip():
        return "a non-empty string expected"
    if value != value.strip():
        return "text without leading/trailing white space expected"
    if CONTROL.search(value):
        return "text without any control characters expected"
    return None


def _identifier(value: str) -> str | None:
    if not value.isidentifier():
        return "not a valid Python identifier (letters, digits and '_', not starting with a digit)"
    if "__" in value:
        return "only single separators are supported ('__' is not allowed)"
    if value.startswith("_") or value.endswith("_"):
        return "names must not start or end with '_'"
    return None


def _blender_version(value: str) -> str | None:
    parts = value.split(".")
    if not all(p.isdigit() for p in parts):
        return f"must be numbers separated by single '.' characters, found {value!r}"
    if len(parts) != 3:
        return f"expected 3 numbers separated by '.', found {value!r}"
    return None


def check_manifest(data: dict[str, Any], source: str = MANIFEST_NAME) -> list[str]:
    """Every rule a manifest fails, each as ``"<field>" = <value>: <rule>``; an empty list when it passes."""
    problems: list[str] = []

    def bad(key: str, value: Any, rule: str) -> None:
        problems.append(f'"{key}" = {value!r}: {rule}')

    def typed(key: str, kind: type, required: bool) -> Any:
        if key not in data:
            if required:
                problems.append(f'missing "{key}" (required by Blender)')
            return None
        value = data[key]
        if not isinstance(value, kind):
            bad(key, value, f"must be a {kind.__name__}, not a {type(value).__name__}")
            return None
        return value

    for key in ("schema_version", "version"):
        if (value := typed(key, str, True)) is not None and not SEMVER.match(value):
            bad(key, value, "to be a semantic-version (MAJOR.MINOR.PATCH, e.g. 1.0.0)")
    if (value := typed("id", str, True)) is not None and (rule := _identifier(value)):
        bad("id", value, rule)
    for key, required in (("name", True), ("maintainer", True), ("website", False)):
        if (value := typed(key, str, required)) is not None and (rule := _clean_text(value)):
            bad(key, value, rule)
    if (value := typed("tagline", str, True)) is not None and (rule := _terse(value)):
        bad("tagline", value, rule)
    kind = typed("type", str, True)
    if kind is not None and kind not in TYPES:
        bad("type", kind, f"expected to be one of {list(TYPES)}")
    minimum = typed("blender_version_min", str, True)
    if minimum is not None:
        if rule := _blender_version(minimum):
            bad("blender_version_min", minimum, rule)
        elif tuple(int(p) for p in minimum.split(".")) < MIN_BLENDER:
            bad("blender_version_min", minimum, "extensions need Blender 4.2.0 or newer (own rule: older Blenders "
                "cannot install them)")
    maximum = typed("blender_version_max", str, False)
    if maximum and (rule := _blender_version(maximum)):
        bad("blender_version_max", maximum, rule)
    licences = typed("license", list, True)
    if licences is not None:
        if not licences:
            bad("license", licences, "list may not be empty")
        for i, item in enumerate(licences):
            if not isinstance(item, str) or not item.strip():
                bad(f"license[{i}]", item, "must be a non-empty string")
            elif not item.startswith("SPDX:"):
                bad(f"license[{i}]", item, "must be an SPDX identifier written 'SPDX:<id>', e.g. "
                    "'SPDX:GPL-3.0-or-later' (own rule, as Blender's extension site requires)")
            elif item[5:] not in GPL_COMPATIBLE_SPDX:
                bad(f"license[{i}]", item, f"unknown or GPL-incompatible SPDX licence; expected one of "
                    f"{sorted(GPL_COMPATIBLE_SPDX)} (own rule: an add-on runs inside GPL Blender)")
    copyright_ = typed("copyright", list, False)
    for i, item in enumerate(copyright_ or []):
        year, _, holder = str(item).partition(" ")
        if not isinstance(item, str) or not re.fullmatch(r"\d+(-\d+)?", year) or not holder.strip():
            bad(f"copyright[{i}]", item, "must be 'YEAR name' or 'YEAR-YEAR name'")
    permissions = data.get("permissions")
    if permissions is not None:
        if not isinstance(permissions, dict):
            bad("permissions", permissions, "permissions must be a table of strings (e.g. files = \"reason\")")
        else:
            for key, reason in permissions.items():
                if key not in PERMISSIONS:
                    bad(f"permissions.{key}", reason, f"unknown permission; allowed keys are {list(PERMISSIONS)}")
                elif not isinstance(reason, str):
                    bad(f"permissions.{key}", reason, "must be a string (the reason shown to the user)")
                elif rule := _terse(reason):
                    bad(f"permissions.{key}", reason, rule)
    tags = typed("tags", list, False)
    if tags is not None:
        if not tags:
            bad("tags", tags, "list may not be empty")
        for i, tag in enumerate(tags):
            if not isinstance(tag, str) or not tag.strip():
                bad(f"tags[{i}]", tag, "must be a non-empty string")
            elif kind == "add-on" and tag not in ADDON_TAGS:
                bad(f"tags[{i}]", tag, f"not one of Blender's add-on tags {sorted(ADDON_TAGS)}")
    platforms = typed("platforms", list, False)
    for i, item in enumerate(platforms or []):
        if item not in PLATFORMS:
            bad(f"platforms[{i}]", item, f"expected one of {list(PLATFORMS)}")
    for i, wheel in enumerate(typed("wheels", list, False) or []):
        if not isinstance(wheel, str) or '"' in wheel or "\\" in wheel or not wheel.endswith(".whl") or \
                not 5 <= len(PurePosixPath(wheel).name.split("-")) <= 6:
            bad(f"wheels[{i}]", wheel, "wheel paths use '/' and name a file "
                "'{distribution}-{version}(-{build tag})?-{python tag}-{abi tag}-{platform tag}.whl'")
    build = data.get("build")
    if build is not None:
        problems.extend(_check_build_table(build))
    return problems


def _check_build_table(build: Any) -> list[str]:
    if not isinstance(build, dict):
        return [f'"build" = {build!r}: must be a table']
    problems = []
    if "generated" in build:
        problems.append('"build.generated": reserved for Blender (written into split-platform packages)')
    for key in ("paths", "paths_exclude_pattern"):
        value = build.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            problems.append(f'"build.{key}" = {value!r}: must be a list of non-empty strings')
    if build.get("paths") is not None and build.get("paths_exclude_pattern") is not None:
        problems.append('"build": declaring both "paths" and "paths_exclude_pattern" is not supported')
    seen: set[str] = set()
    for item in build.get("paths") or []:
        if not isinstance(item, str):
            continue
        if "\\" in item or item.startswith("/") or os.path.normpath(item).startswith(".."):
            problems.append(f'"build.paths" item {item!r}: must be a relative path inside the folder, with "/"')
        if item.lower() in seen:
            problems.append(f'"build.paths" item {item!r}: duplicate (names must differ in more than case)')
        seen.add(item.lower())
        if item == MANIFEST_NAME:
            problems.append(f'"build.paths" item {item!r}: the manifest is always included, do not list it')
    return problems


def validate_manifest(data: dict[str, Any], source: str = MANIFEST_NAME) -> None:
    """Raise :class:`ManifestError` listing every failed rule."""
    if problems := check_manifest(data, source):
        raise ManifestError(source, problems)


# -- 3. which files go into the zip ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Pattern:
    negate: bool
    anchored: bool
    directory_only: bool
    parts: tuple[str, ...]


class PathPatterns:
    """``[build] paths_exclude_pattern`` semantics, as Blender applies them while zipping.

    * ``*``, ``?`` and ``[...]`` match within one path component; ``**`` matches any number of components.
    * A leading ``/`` anchors a pattern at the extension's root; otherwise it matches at any depth (even when it
      contains ``/``: Blender's rule, unlike git's).
    * A trailing ``/`` matches directories only (and so everything inside them).
    * ``!`` negates: a path matched by any negated pattern is kept. ``\\!`` is a literal ``!``.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = [p for p in (self._parse(raw) for raw in patterns) if p is not None]

    @staticmethod
    def _parse(raw: str) -> _Pattern | None:
        negate = raw.startswith("!")
        text = raw.lstrip("!") if negate else (raw[1:] if raw.startswith("\\!") else raw)
        while "//" in text:
            text = text.replace("//", "/")
        if not text:
            return None
        anchored = text.startswith("/")
        directory_only = text.endswith("/")
        parts = tuple(p for p in text.strip("/").split("/") if p)
        while parts and parts[0] == "**":
            parts, anchored = parts[1:], False
        while parts and parts[-1] == "**":
            parts = parts[:-1]
        return _Pattern(negate, anchored, directory_only, parts) if parts else None

    def excluded(self, path: str, is_dir: bool) -> bool:
        """Whether a path (relative, ``/``-separated, no trailing slash) is left out."""
        parts = tuple(path.split("/"))
        hit = False
        for pattern in self.patterns:
            if self._matches(pattern, parts, is_dir):
                if pattern.negate:
                    return False
                hit = True
        return hit

    @classmethod
    def _matches(cls, pattern: _Pattern, parts: tuple[str, ...], is_dir: bool) -> bool:
        starts = [0] if pattern.anchored else range(len(parts))
        return any(cls._match_from(pattern, pattern.parts, parts[s:], is_dir) for s in starts)

    @classmethod
    def _match_from(cls, pattern: _Pattern, want: tuple[str, ...], have: tuple[str, ...], is_dir: bool) -> bool:
        if not want:
            # the whole pattern matched: it must end at the path's end (a directory pattern may stop at any
            # directory above it, which excludes everything inside)
            if not have:
                return is_dir or not pattern.directory_only
            return pattern.directory_only
        if want[0] == "**":
            return any(cls._match_from(pattern, want[1:], have[k:], is_dir) for k in range(len(have) + 1))
        return bool(have) and fnmatch.fnmatchcase(have[0], want[0]) and cls._match_from(pattern, want[1:], have[1:],
                                                                                          is_dir)


def select_files(folder: Path, build: dict[str, Any] | None) -> list[str]:
    """The files the zip holds, relative to ``folder`` with ``/``: the manifest, then what ``[build]`` keeps.

    Like Blender's build: symbolic links are skipped while walking, directories matched by an exclusion are not
    entered; with ``paths`` only those files (and the manifest) are packed.
    """
    build = build or {}
    if build.get("paths") is not None:
        listed = [MANIFEST_NAME, *(p.strip("/") for p in build["paths"] if p.strip("/") != MANIFEST_NAME)]
        return listed
    patterns = PathPatterns(build.get("paths_exclude_pattern") or DEFAULT_EXCLUDES)
    found: list[str] = []

    def walk(directory: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            rel = f"{prefix}{entry.name}"
            if entry.is_symlink():
                continue
            is_dir = entry.is_dir()
            if patterns.excluded(rel, is_dir):
                continue
            if is_dir:
                walk(Path(entry.path), rel + "/")
            elif entry.is_file() and rel != MANIFEST_NAME:
                found.append(rel)

    walk(folder, "")
    return [MANIFEST_NAME, *found]


def check_files(folder: Path, files: list[str], kind: str = "add-on") -> list[str]:
    """What must not be in the zip, each problem naming the file and the rule; empty when all is well."""
    problems = []
    if kind == "add-on" and "__init__.py" not in files:
        problems.append('missing "__init__.py": an add-on is a Python package (Blender refuses it otherwise)')
    seen: dict[str, str] = {}
    for rel in files:
        parts = rel.split("/")
        path = folder / rel
        if not path.is_file() or path.is_symlink():
            problems.append(f"{rel!r}: listed for the zip but not a regular file (Blender skips links)")
            continue
        if any(p == "__pycache__" for p in parts) or rel.endswith((".pyc", ".pyo")):
            problems.append(f"{rel!r}: Python cache files must not be packed (exclude \"__pycache__/\" and "
                            "\"*.pyc\" in [build])")
        elif any(p.startswith(".") for p in parts):
            problems.append(f"{rel!r}: hidden files (names starting with '.') must not be packed (Blender's default "
                            "excludes them; add \"/.*\" or \".*\" to [build] paths_exclude_pattern)")
        elif re.search(r"\.blend[1-9]$", rel):
            problems.append(f"{rel!r}: .blend backup files must not be packed")
        elif rel.endswith(".zip"):
            problems.append(f"{rel!r}: a zip inside the extension (a stale build?) must not be packed")
        for part in parts:
            if set(part) & WINDOWS_BAD_CHARS or CONTROL.search(part) or part.endswith((" ", ".")):
                problems.append(f"{rel!r}: the name {part!r} cannot exist on Windows (no <>:\"|?*\\, control "
                                "characters or a trailing dot/space; own rule)")
                break
        if (low := rel.lower()) in seen:
            problems.append(f"{rel!r} and {seen[low]!r} differ only in case (they collide on Windows and macOS)")
        seen[low] = rel
    return problems


def describe(problems: list[str]) -> str:
    """A compact JSON-free rendering for error messages."""
    return "\n".join(f"- {p}" for p in problems) if problems else json.dumps([])
