"""The package's public names resolve, none of them hides a submodule, the top level is
model-agnostic, and every public name (of `jaxcompress` and of `jaxcompress.bert`) is
documented."""

import importlib
import inspect
import pkgutil

import jaxcompress
import jaxcompress.bert

BERT_NAMES = {
    "Bert",
    "BertConfig",
    "load_pretrained",
    "save_pretrained",
    "prune_heads",
    "prune_ffn",
    "shrink",
    "head_importance",
}


def test_public_names_resolve_and_leave_submodules_alone():
    for name in jaxcompress.__all__:
        assert getattr(jaxcompress, name) is not None, name
    for module in pkgutil.iter_modules(jaxcompress.__path__):
        loaded = importlib.import_module(f"jaxcompress.{module.name}")
        assert getattr(jaxcompress, module.name) is loaded, module.name


def test_the_top_level_exports_no_bert_specific_name():
    assert BERT_NAMES.isdisjoint(jaxcompress.__all__)
    assert [name for name in BERT_NAMES if name in vars(jaxcompress)] == []


def _undocumented(module) -> list[str]:
    """The names in `module.__all__` whose docstring lacks its sections.

    Functions need `Args:` (unless they take no argument) and `Returns:` (`Yields:` for a
    context manager); classes need `Attributes:`, except for a class whose name is in
    `jaxcompress.bert`, for which a docstring is enough (the model and its config).
    """
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not callable(obj):
            continue  # constants (rule patterns): documented where they are defined
        doc = inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            if not (obj.__doc__ or "").strip():
                missing.append(name)
            elif module is jaxcompress and "Attributes:" not in doc:
                missing.append(f"{name} (Attributes:)")
            continue
        if inspect.signature(obj).parameters and "Args:" not in doc:
            missing.append(f"{name} (Args:)")
        if "Returns:" not in doc and "Yields:" not in doc:
            missing.append(f"{name} (Returns:)")
    return missing


def test_bert_names_resolve_and_are_documented():
    assert BERT_NAMES <= set(jaxcompress.bert.__all__)
    assert sorted(jaxcompress.bert.__all__) == sorted(set(jaxcompress.bert.__all__))
    public = {n for n in vars(jaxcompress.bert) if not n.startswith("_")}
    assert public == set(jaxcompress.bert.__all__)  # re-exports only
    assert _undocumented(jaxcompress.bert) == []


def test_top_level_names_are_documented():
    assert sorted(jaxcompress.__all__) == sorted(set(jaxcompress.__all__))
    assert _undocumented(jaxcompress) == []
