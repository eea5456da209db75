"""The package's public names resolve, and none of them hides a submodule."""

import importlib
import pkgutil

import jaxcompress


def test_public_names_resolve_and_leave_submodules_alone():
    for name in jaxcompress.__all__:
        assert getattr(jaxcompress, name) is not None, name
    for module in pkgutil.iter_modules(jaxcompress.__path__):
        loaded = importlib.import_module(f"jaxcompress.{module.name}")
        assert getattr(jaxcompress, module.name) is loaded, module.name
