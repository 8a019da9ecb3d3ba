"""The release, written in this one place (pyproject.toml and `captioner --version` read it)."""
__version__ = "1.1.0"
