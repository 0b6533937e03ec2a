"""mosaicml-streaming is installed --no-deps (docs/dependencies.md): pyproject must list every
package streaming imports, the pin must be the same in every place that names it, and a
missing streaming must fail with the command that installs it."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

import tomllib
from helpers import ROOT, subprocess_env
from packaging.requirements import Requirement

from bumblefast.shards.streaming_install import INSTALL_COMMAND, STREAMING, missing_streaming

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(reqs: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in reqs}


# What the project loads of streaming, in a fresh interpreter: this test process has imported what
# earlier tests needed (protobuf's `google`, say), which would pass for a module-level import of streaming's.
PROBE = """
import json, sys
import streaming
from streaming import MDSWriter, StreamingDataLoader, StreamingDataset
from streaming.base.storage import CloudDownloader, CloudUploader
from streaming.base.util import merge_index
print(json.dumps({n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}))
"""


def test_streaming_is_not_a_dependency_but_its_runtime_imports_are():
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = json.loads(res.stdout.strip().splitlines()[-1])

    deps = _names(PYPROJECT["project"]["dependencies"])
    assert "mosaicml-streaming" not in deps  # pip would enforce its transformers<5 / numpy<2.2
    imported = set()
    for name, file in loaded.items():
        if name.startswith("streaming") and file:
            for node in ast.walk(ast.parse(Path(file).read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
            # only module-level imports count: the cloud SDKs are imported inside functions, per remote
    dists = md.packages_distributions()
    via_torch = _names(md.requires("torch") or [])
    missing = {}
    for top in imported - set(sys.stdlib_module_names) - {"streaming", "__future__"}:
        if top not in loaded:  # imported inside a function that has not run: a remote's SDK
            continue
        for dist in dists.get(top, []):
            norm = re.sub(r"[-_.]+", "-", dist).lower()
            if norm not in deps and norm not in via_torch:
                missing[top] = norm
    assert missing == {}, f"streaming imports these, pyproject does not list them: {missing}"


def test_the_streaming_pin_is_the_same_everywhere():
    makefile = (ROOT / "Makefile").read_text()
    assert f"STREAMING := {STREAMING}\n" in makefile
    assert PYPROJECT["project"]["optional-dependencies"]["old-pins"] == [STREAMING]
    assert INSTALL_COMMAND in (ROOT / "README.md").read_text()
    assert INSTALL_COMMAND in (ROOT / "docs" / "dependencies.md").read_text()
    assert md.version("mosaicml-streaming") == STREAMING.split("==")[1]


def test_a_missing_streaming_names_the_install_command():
    # bumblefast.shards resolves its names lazily (prep's start-up needs no streaming): the reader is
    # where a missing streaming is met
    probe = "import sys; sys.modules['streaming'] = None; from bumblefast.shards import build_loader"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env())
    assert res.returncode == 1
    assert "ModuleNotFoundError" in res.stderr and INSTALL_COMMAND in res.stderr, res.stderr[-2000:]
    other = missing_streaming(ModuleNotFoundError("No module named 'snappy'", name="snappy"))
    assert other.name == "snappy" and "'snappy'" in str(other) and "reinstall bumblefast" in str(other)
