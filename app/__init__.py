"""Unbox HTTP front end: settings, image intake, routes, CLI."""

FALLBACK_VERSION = "0.1.0"  # for a source tree that was never pip-installed


def package_version() -> str:
    """The installed package's version (``unbox --version``, the OpenAPI document)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unbox")
    except PackageNotFoundError:
        return FALLBACK_VERSION
