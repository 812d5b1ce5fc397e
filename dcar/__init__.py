"""dcar: a text-to-image inference server for DC-AR.

The installed package is one namespace over the repository's folders (setuptools ``package-dir``):
``dcar.model`` is model/, ``dcar.server`` is server/, ``dcar.training`` is training/, ``dcar.cli`` is cli/
and ``dcar.weights`` is weights/ (the embedded default model as package data).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dcar")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
