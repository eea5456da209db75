"""The package's public names resolve, none of them hides a submodule, the top level is
model-agnostic, and BERT's names in `jaxcompress.bert` are documented."""

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


def test_bert_names_resolve_and_are_documented():
    assert BERT_NAMES <= set(jaxcompress.bert.__all__)
    assert sorted(jaxcompress.bert.__all__) == sorted(set(jaxcompress.bert.__all__))
    public = {n for n in vars(jaxcompress.bert) if not n.startswith("_")}
    assert public == set(jaxcompress.bert.__all__)  # re-exports only
    undocumented = []
    for name in jaxcompress.bert.__all__:
        obj = getattr(jaxcompress.bert, name)
        if not callable(obj):
            continue  # constants (rule patterns): documented where they are defined
        doc = inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            if not (obj.__doc__ or "").strip():
                undocumented.append(name)
        elif "Args:" not in doc or "Returns:" not in doc:
            undocumented.append(name)
    assert undocumented == []
