"""`bumblefast bench`: its arguments and the hand-over to the checkout's `benchmarks/`.

The benchmark machinery (the suite runner, the report format, the published tables, every
script) lives in `benchmarks/` beside the package: benchmarks run from a source checkout
(git clone + pip install -e .), and the installed package carries none of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bumblefast.config import UserError

SECTIONS = ("prep", "stream", "kernels", "train", "scaling", "serve")
SIZES = ("min", "cpu", "gpu", "real", "real-ours", "real-split", "real-split-kept")  # real*: the train section only
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmarks_dir() -> Path:
    """The checkout's benchmarks/ on sys.path (its modules import each other by name)."""
    if not (BENCHMARKS / "suite.py").is_file():
        raise UserError(
            f"{BENCHMARKS}: benchmark scripts not found; `bumblefast bench` runs the scripts of a source "
            "checkout (git clone + pip install -e .)"
        )
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return BENCHMARKS


def cli_main(args) -> int:
    benchmarks_dir()
    import suite

    return suite.cli_main(args)


def add_arguments(p) -> None:
    """`bumblefast bench`'s arguments."""
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=(*SECTIONS, "all", "report"),
        help="a section, all, or report (regenerate the README/docs tables from RESULTS)",
    )
    p.add_argument(
        "results",
        nargs="*",
        default=None,
        help="report: the results JSON to publish (default: the ones the tables already name); several: "
        "a later one's sections replace the earlier's (e.g. a whole run, then a `bench prep` run)",
    )
    p.add_argument("--check", action="store_true", help="report: write nothing; fail if a table is stale")
    p.add_argument("--size", choices=SIZES, default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--out", default="benchmarks/results", help="folder for the report (default benchmarks/results)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
