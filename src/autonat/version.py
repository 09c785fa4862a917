"""The package's version, in one leaf module: `autonat.__version__` (loaded on first use), the SSDP
USER-AGENT (proto/ssdp.py) and `autonat --version` all read it here, so no layer imports the package face.
pyproject.toml's `version` must say the same (tests/unit/test_packaging.py checks the built wheel)."""

__version__ = "0.1.0"
