"""The layout: `prep/`, `shards/`, `kernels/` beside `bumblefast/` are the packages
`bumblefast.prep`, `bumblefast.shards`, `bumblefast.kernels` (pyproject's package-dir) and
nothing else. Imported by their folder names, as a checkout root on sys.path allows, they
would load a second copy of every module (two dispatch tables, two manifest classes); and a
top-level `kernels` would shadow Hugging Face's `kernels` package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
from helpers import ROOT

FOLDERS = ("kernels", "prep", "shards")
SCANNED = ("bumblefast", "prep", "shards", "kernels", "benchmarks", "tests")

PROBE = """
import importlib, json, sys
from pathlib import Path

root = Path.cwd().resolve()
outcome = {}
for name in %(folders)r:
    try:
        importlib.import_module(name)
        outcome[name] = "imported"
    except ImportError as e:
        outcome[name] = "ImportError: " + str(e)
import bumblefast.kernels.dispatch, bumblefast.prep.encode, bumblefast.shards.manifest

def folder_of(module):
    f = getattr(module, "__file__", None)
    for name in %(folders)r:
        if f and Path(f).resolve().is_relative_to(root / name):
            return name
    return None

print(json.dumps({
    "sys_path_has_root": any(Path(p or ".").resolve() == root for p in sys.path),
    "outcome": outcome,
    # every module object loaded from one of the three folders, by its name in sys.modules
    "from_folders": sorted(m for m, mod in list(sys.modules.items()) if folder_of(mod)),
    "dispatch_holders": sorted(m for m, mod in list(sys.modules.items())
                               if getattr(mod, "get_ops", None) is not None and folder_of(mod) == "kernels"
                               and Path(mod.__file__).name == "dispatch.py"),
    "same_objects": {name: sys.modules.get(name) is sys.modules.get("bumblefast." + name) for name in %(folders)r},
}))
"""


def test_top_level_imports_from_the_checkout_root_make_no_second_copy():
    out = subprocess.run(
        [sys.executable, "-c", PROBE % {"folders": FOLDERS}],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["sys_path_has_root"]  # the case under test: the folders are importable by their own names
    for name in FOLDERS:  # refused with a message naming the right import, or the very same module
        assert got["same_objects"][name] or got["outcome"][name].startswith("ImportError:"), (
            name,
            got,
        )
        if got["outcome"][name] != "imported":
            assert "import it by that name" in got["outcome"][name] and f"bumblefast.{name}" in got["outcome"][name]
    assert got["dispatch_holders"] == ["bumblefast.kernels.dispatch"]  # one module holds the dispatch code
    # a name that is the very same module object (kernels -> bumblefast.kernels, for transformers' probe) is no copy
    stray = [m for m in got["from_folders"] if not m.startswith("bumblefast.") and not got["same_objects"].get(m)]
    assert stray == [], f"modules loaded from the folders under a second name: {stray}"


def _top_level_imports(source: str, label: str) -> list[str]:
    """`import prep...` / `from shards... import` / importlib.import_module("kernels...") in a source."""
    found = []
    for node in ast.walk(ast.parse(source, label)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]  # relative imports (level > 0) stay inside their package
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        found += [f"{label}:{node.lineno}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    return found


def test_nothing_imports_the_folders_by_their_own_names():
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50  # the scan saw the tree
    bad = [hit for p in files for hit in _top_level_imports(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert bad == [], "import these as bumblefast.prep / bumblefast.shards / bumblefast.kernels:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, hits",
    [
        ("import kernels.dispatch", 1),
        ("from prep.run import run_prep", 1),
        ("import importlib\nimportlib.import_module('shards.reader')", 1),
        ("from bumblefast.prep.run import run_prep\nfrom . import dispatch\nimport prepare", 0),
    ],
)
def test_the_scan_catches_what_it_must(source, hits):
    assert len(_top_level_imports(source, "probe.py")) == hits
