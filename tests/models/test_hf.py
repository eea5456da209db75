"""Hugging Face checkpoint interop: load with/without prefix and head, export round trip."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from jaxcompress.models.bert import Bert, init_params
from jaxcompress.models.hf import load_pretrained, resolve_model_dir, save_pretrained
from tests.helpers import compressed_tiny_config, save_tiny_model, tiny_config


def _logits(config, params, ids):
    return np.asarray(Bert(config).apply({"params": params}, ids).logits)


def test_minilm_loads_without_prefix_or_head(minilm_dir):
    config, params = load_pretrained(minilm_dir)
    assert (config.num_hidden_layers, config.hidden_size, config.num_labels) == (6, 384, 0)
    assert "classifier" not in params
    count = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert count == 22_713_216  # 22.7M as the model card says
    config2, params2 = load_pretrained(minilm_dir, num_labels=2, head_seed=3)
    assert params2["classifier"]["kernel"].shape == (384, 2)
    np.testing.assert_array_equal(
        params2["bert"]["pooler"]["dense"]["kernel"], params["bert"]["pooler"]["dense"]["kernel"]
    )


def test_teacher_loads_with_prefix_and_head(teacher_dir):
    config, params = load_pretrained(teacher_dir)
    assert config.num_labels == 2
    raw = load_file(teacher_dir / "model.safetensors")
    np.testing.assert_array_equal(params["classifier"]["kernel"], raw["classifier.weight"].T)
    np.testing.assert_array_equal(
        params["bert"]["encoder"]["layer"]["3"]["attention"]["self"]["query"]["kernel"],
        raw["bert.encoder.layer.3.attention.self.query.weight"].T,
    )


@pytest.mark.slow
def test_export_loads_in_transformers_with_same_logits(teacher_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import BertForSequenceClassification

    config, params = load_pretrained(teacher_dir)
    out = save_pretrained(config, params, tmp_path / "export", tokenizer_dir=teacher_dir)
    assert (out / "tokenizer.json").exists()
    reference = BertForSequenceClassification.from_pretrained(out).eval()
    ids = np.array([[101, 2023, 3185, 2001, 2307, 102], [101, 6659, 102, 0, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    ours = Bert(config).apply({"params": params}, ids, mask).logits
    assert np.abs(theirs.numpy() - np.asarray(ours)).max() < 1e-4
    # And back: the exported directory loads to identical parameters.
    _, again = load_pretrained(out)
    for path, value in flatten_dict(params, sep="/").items():
        np.testing.assert_array_equal(flatten_dict(again, sep="/")[path], value, err_msg=path)


def test_compressed_model_exports_its_dense_equivalent(tmp_path, minilm_dir):
    torch = pytest.importorskip("torch")
    from transformers import BertForSequenceClassification

    config = compressed_tiny_config(low_rank_module="output")
    params = init_params(config, jax.random.key(0))
    # Non-zero biases so that the padded neurons and pruned heads would show if wrong.
    params = jax.tree_util.tree_map(lambda x: x + 0.01 if x.ndim == 1 else x, params)
    out = save_pretrained(config, params, tmp_path / "dense")
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["num_hidden_layers"], hf_config["intermediate_size"]) == (3, 64)
    ids = np.array([[101, 2023, 3185, 2001, 102]])
    reference = BertForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, _logits(config, params, ids), atol=1e-5)
    dense_config, dense_params = load_pretrained(out)
    assert dense_config.heads_per_layer is None and dense_config.embedding_size is None
    np.testing.assert_allclose(_logits(dense_config, dense_params, ids), theirs, atol=1e-5)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "empty")


def test_model_root_maps_hub_ids_to_local_dirs(monkeypatch, minilm_dir):
    monkeypatch.setenv("JAXCOMPRESS_MODEL_ROOT", str(minilm_dir.parent))
    assert (
        resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")
        == minilm_dir.parent / "all-MiniLM-L6-v2"
    )


def test_pickle_checkpoint_needs_opt_in(tmp_path, minilm_dir):
    torch = pytest.importorskip("torch")
    model_dir = save_tiny_model(tmp_path / "tiny", minilm_dir, num_labels=2)
    state = {k: torch.tensor(v) for k, v in load_file(model_dir / "model.safetensors").items()}
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(model_dir / "config.json", pickled / "config.json")
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled PyTorch checkpoint.*model.safetensors") as info:
        load_pretrained(pickled)
    assert "allow_pickle" not in str(info.value)  # no command offers it
    config, params = load_pretrained(pickled, allow_pickle=True)
    _, expected = load_pretrained(model_dir)
    ids = np.array([[101, 2023, 102]])
    np.testing.assert_array_equal(_logits(config, params, ids), _logits(config, expected, ids))


def test_shape_mismatch_names_the_parameter(tmp_path, minilm_dir):
    model_dir = save_tiny_model(tmp_path / "tiny", minilm_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["intermediate_size"] = 48
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"parameter bert/encoder/layer/0/intermediate/dense/(kernel|bias)"
    ):
        load_pretrained(model_dir)


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    from jaxcompress.models import hf

    def disk_full(tensors, path, metadata=None):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(0))
    previous = tmp_path / "out"
    previous.mkdir()
    (previous / "marker").write_text("old export")
    monkeypatch.setattr(hf, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(config, params, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (previous / "marker").read_text() == "old export"


def test_weights_without_bert_prefix_and_legacy_layernorm_names(tmp_path, minilm_dir):
    model_dir = save_tiny_model(tmp_path / "tiny", minilm_dir, num_labels=2)
    weights = load_file(model_dir / "model.safetensors")
    renamed = {}
    for key, value in weights.items():
        key = key.removeprefix("bert.")
        renamed[
            key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                "LayerNorm.bias", "LayerNorm.beta"
            )
        ] = value
    save_file(renamed, model_dir / "model.safetensors")
    config, params = load_pretrained(model_dir)
    np.testing.assert_array_equal(
        params["bert"]["embeddings"]["LayerNorm"]["scale"],
        weights["bert.embeddings.LayerNorm.weight"],
    )
