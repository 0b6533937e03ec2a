"""How mosaicml-streaming is installed, and the error that says so when it is missing.

streaming 0.13.0 (its last release) declares transformers<5 and numpy<2.2; its code runs
under transformers 5 and numpy 2.4, so BumbleFast does not list it as a dependency (pip
would downgrade the user's stack to meet those pins). It is installed without its metadata,
`pip install --no-deps mosaicml-streaming==0.13.0` (the Makefile does it), and pyproject
lists the packages it imports instead (docs/dependencies.md).
"""

from __future__ import annotations

STREAMING = "mosaicml-streaming==0.13.0"
INSTALL_COMMAND = f"pip install --no-deps {STREAMING}"


def missing_streaming(err: ModuleNotFoundError) -> ModuleNotFoundError:
    """The ImportError to raise from `err` (raised by `import streaming`): names the command that fixes it."""
    if err.name == "streaming":
        return ModuleNotFoundError(
            f"BumbleFast reads and writes shards with mosaicml-streaming, which is not installed. Install it "
            f"without its stale pins (transformers<5, numpy<2.2; docs/dependencies.md):\n    {INSTALL_COMMAND}",
            name="streaming",
        )
    return ModuleNotFoundError(
        f"mosaicml-streaming needs the package providing '{err.name}', which is missing (streaming is installed "
        f"--no-deps, so pip did not add it): reinstall bumblefast, whose dependencies list it, or install it "
        f"yourself; the full error: {err}",
        name=err.name,
    )
