"""One tree contract: QAT, LSQ, binary split, low-rank, packing, GOBO and tying on any pytree."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

from jaxcompress import core
from jaxcompress.compress import factorize, share
from jaxcompress.compress.quant import gobo, qat
from jaxcompress.compress.quant import pack as quant_pack
from jaxcompress.compress.quant.quantizers import QuantSpec, fake_quant

KERNELS = r"(.*/)?kernel(/value)?"  # nnx.State paths end in the Variable's 'value'
FORMS = ("dict", "frozen", "mixed", "pure", "state", "variables")


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)])
        self.head = nnx.List([nnx.Linear(8, 4, rngs=rngs)])
        self.norm = nnx.LayerNorm(8, rngs=rngs)


def state() -> nnx.State:
    s = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(0)  # biases and norms away from 0 and 1, so values tell
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), s)


def form(name: str):
    """The same weights as nested dicts, a FrozenDict, lists and tuples, int keys, an
    nnx.State, and plain dicts of nnx Variables (what flax means to replace State by)."""
    s = state()
    pure = nnx.to_pure_dict(s)  # int keys under 'layers' and 'head'
    layers, head = pure["layers"], pure["head"]
    return {
        "dict": {
            "layers": {"0": layers[0], "1": layers[1]},
            "head": {"0": head[0]},
            "norm": pure["norm"],
        },
        "frozen": FrozenDict(
            {
                "layers": {"0": layers[0], "1": layers[1]},
                "head": {"0": head[0]},
                "norm": pure["norm"],
            }
        ),
        "mixed": {"layers": [layers[0], layers[1]], "head": (head[0],), "norm": pure["norm"]},
        "pure": pure,
        "state": s,
        "variables": jax.tree.map(lambda x: x, s.raw_mapping),
    }[name]


def flat(tree) -> dict[str, np.ndarray]:
    """Leaves by path, the nnx Variable's trailing 'value' dropped so that forms compare."""
    return {
        re.sub(r"/value$", "", core.path_str(p)): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def containers(tree, prefix: str = "") -> dict[str, type]:
    """The type of every inner node and nnx Variable, by path."""
    if isinstance(tree, nnx.Variable):
        return {prefix: type(tree)}
    children = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)[0]
    if not children or jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree)):
        return {}
    out = {prefix: type(tree)}
    for key_path, child in children:
        out |= containers(child, f"{prefix}/{core.path_str(key_path)}")
    return out


def assert_same(a: dict, b: dict, exact: bool = True):
    assert sorted(a) == sorted(b)
    for path in a:
        if exact:
            np.testing.assert_array_equal(a[path], b[path], err_msg=path)
        else:
            np.testing.assert_allclose(a[path], b[path], rtol=1e-6, atol=1e-6, err_msg=path)


def test_generic_default_rules_fake_quantize_every_kernel_on_any_form():
    reference = None
    for name in FORMS:
        params = form(name)
        out = qat.qat(qat.default_rules(QuantSpec(4))).apply(params, ())
        model, codes = qat.quantize_tree(params, qat.default_rules(QuantSpec(4)))
        assert jax.tree.structure(out) == jax.tree.structure(params), name
        assert jax.tree.structure(model) == jax.tree.structure(params), name
        got = flat(out)
        assert len(codes) == 3 and all(p.split("/")[-1] in ("kernel", "value") for p in codes)
        if reference is None:
            reference = got
            kernel = flat(params)["layers/0/kernel"]
            np.testing.assert_array_equal(got["layers/0/kernel"], fake_quant(kernel, QuantSpec(4)))
            np.testing.assert_array_equal(got["norm/scale"], flat(params)["norm/scale"])
        assert_same(got, reference)
    # A conv kernel (4-D) is a kernel too: one scale per output channel.
    conv = {"Conv_0": {"kernel": jnp.arange(72.0).reshape(3, 3, 2, 4), "bias": jnp.ones(4)}}
    _, codes = qat.quantize_tree(conv, qat.default_rules())
    assert codes["Conv_0/kernel"][0].scale.shape == (4,)


def test_lsq_steps_and_binary_split_on_any_form():
    lsq = [(KERNELS, QuantSpec(4, scale_method="lsq"))]
    binary = [(KERNELS, QuantSpec(scheme="binary"))]
    ref_lsq = ref_split = None
    for name in FORMS:
        params = form(name)
        with_steps = qat.add_lsq_steps(params, lsq)
        kinds = containers(with_steps)
        assert {p: t for p, t in kinds.items() if "@" not in p} == containers(params), name
        model, steps = qat.split_lsq_steps(with_steps)
        assert jax.tree.structure(model) == jax.tree.structure(params)
        assert len(steps) == 3
        split = qat.add_binary_split(params, binary)
        assert jax.tree.structure(qat.strip_suffix(split, qat.SPLIT_SUFFIX)[0]) == (
            jax.tree.structure(params)
        )
        if name in ("state", "variables"):  # the added entries are Params like their weights
            assert kinds["/layers/0/kernel@lsq_step"] is nnx.Param
            assert type(split["layers"][0]["kernel@binary_split"]) is nnx.Param
        seen_lsq = qat.qat(lsq).apply(with_steps, ())
        seen_split = qat.qat(binary).apply(split, ())
        assert jax.tree.structure(seen_lsq) == jax.tree.structure(params)
        assert jax.tree.structure(seen_split) == jax.tree.structure(params)
        if ref_lsq is None:
            ref_lsq, ref_split = flat(with_steps), flat(seen_split)
            ternary = fake_quant(flat(params)["head/0/kernel"], QuantSpec(scheme="ternary"))
            np.testing.assert_allclose(ref_split["head/0/kernel"], ternary, atol=1e-6)
        assert_same(flat(with_steps), ref_lsq)
        assert_same(flat(seen_split), ref_split)


def test_added_leaves_need_a_mapping():
    params = {"weights": [jnp.ones((4, 4)), jnp.ones((4, 2))]}
    with pytest.raises(ValueError, match="weights/1: cannot add '@lsq_step' beside it"):
        qat.add_lsq_steps(params, [("weights/1", QuantSpec(4, scale_method="lsq"))])
    with pytest.raises(ValueError, match="weights/0 sits in a list or tuple"):
        factorize.low_rank_params(params, [("weights/0", factorize.LowRank(rank=1))])


def test_low_rank_and_densify_on_any_form():
    rules = [(r"layers/\d+/kernel(/value)?", factorize.LowRank(rank=3))]
    reference = None
    for name in FORMS:
        params = form(name)
        factored, ranks = factorize.low_rank_params(params, rules)
        assert ranks == {"layers/0": 3, "layers/1": 3}, name
        kinds = containers(factored)
        assert {p: t for p, t in kinds.items() if "kernel_" not in p} == {
            p: t for p, t in containers(params).items() if "layers/" not in p or "kernel" not in p
        }
        dense = factorize.densify(factored)
        assert jax.tree.structure(dense) == jax.tree.structure(params), name
        if reference is None:
            reference = flat(factored)
            assert reference["layers/1/kernel_a"].shape == (8, 3)
            a, b = reference["layers/0/kernel_a"], reference["layers/0/kernel_b"]
            np.testing.assert_allclose(flat(dense)["layers/0/kernel"], a @ b, atol=1e-6)
        assert_same(flat(factored), reference)
    full, _ = factorize.low_rank_params(
        form("mixed"), [("head/0/kernel", factorize.LowRank(fraction=1.0))]
    )
    assert "head/0/kernel_a" in flat(full)


@pytest.mark.parametrize("name", FORMS)
def test_pack_round_trips_bit_exactly_with_structure(name, tmp_path):
    params = form(name)
    rules = [
        (KERNELS, QuantSpec(3, "asymmetric")),
        (r"norm/.*", QuantSpec(8, granularity="tensor")),
    ]
    expected = qat.qat(rules).apply(params, ())
    path = quant_pack.save(tmp_path / "q.safetensors", params, rules)
    loaded = quant_pack.load(path)
    want = expected  # without a template, nnx Variables come back as their arrays
    if name in ("state", "variables"):
        want = nnx.to_pure_dict(nnx.State(expected) if name == "variables" else expected)
    assert jax.tree.structure(loaded) == jax.tree.structure(want)
    assert containers(loaded) == containers(want)
    assert_same(flat(loaded), flat(expected))
    like = quant_pack.load(path, like=params)
    assert jax.tree.structure(like) == jax.tree.structure(params)
    assert_same(flat(like), flat(expected))
    assert ("tree" in quant_pack.read(path).meta) == (name != "dict")


def test_pack_like_template_must_match(tmp_path):
    params = form("dict")
    path = quant_pack.save(tmp_path / "q.safetensors", params, qat.default_rules())
    with pytest.raises(ValueError, match="like: the artefact has no leaf extra"):
        quant_pack.load(path, like={**params, "extra": jnp.zeros(2)})
    wrong = jax.tree.map(lambda x: x, params)
    wrong["norm"]["scale"] = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"like: norm/scale is \(3,\) in the template"):
        quant_pack.load(path, like=wrong)
    with pytest.raises(ValueError, match="two leaves share this path"):
        quant_pack.pack({"a/b": jnp.ones(2), "a": {"b": jnp.ones(2)}}, [("a/.*", None)])


def test_gobo_on_any_form(tmp_path):
    rules = gobo.default_rules(gobo.GoboSpec(bits=2, iterations=3))
    reference = None
    for name in FORMS:
        params = form(name)
        out, tensors = gobo.gobo(params, rules)
        assert jax.tree.structure(out) == jax.tree.structure(params), name
        if reference is None:
            reference = flat(out)
            assert len(np.unique(reference["layers/0/kernel"])) <= 4 + len(
                tensors["layers/0/kernel"].outlier_index
            )
        assert_same(flat(out), reference)
    path = gobo.gobo_save(
        tmp_path / "g.safetensors", form("mixed"), gobo.gobo(form("mixed"), rules)[1]
    )
    loaded, _ = gobo.gobo_load(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(form("mixed"))
    assert_same(flat(loaded), reference)


def test_tie_shares_groups_on_any_form():
    groups = [r"layers/\d+"]
    reference = None
    for name in FORMS:
        params = form(name)
        tied, shared = share.tie(params, groups)
        full = share.expand(tied, shared)
        assert jax.tree.structure(full) == jax.tree.structure(params), name
        assert len(jax.tree.leaves(tied)) == len(jax.tree.leaves(params)) - 2
        got = flat(full)
        np.testing.assert_array_equal(got["layers/0/kernel"], got["layers/1/kernel"])
        if reference is None:
            reference = got
            assert shared == {
                "layers/1/bias": "layers/0/bias",
                "layers/1/kernel": "layers/0/kernel",
            }
            source = flat(params)
            mean = (source["layers/0/kernel"] + source["layers/1/kernel"]) / 2
            np.testing.assert_allclose(got["layers/1/kernel"], mean, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(got["head/0/kernel"], source["head/0/kernel"])
        assert_same(got, reference)


def test_tied_gradient_is_the_sum_over_members():
    params = form("mixed")
    tied, shared = share.tie(params, [["layers/0", "layers/1"]], init="first")
    np.testing.assert_array_equal(tied["layers"][0]["kernel"], params["layers"][0]["kernel"])
    assert tied["layers"][1]["kernel"] is None

    def forward(p, x):
        for layer in p["layers"]:
            x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
        return jnp.sum(x @ p["head"][0]["kernel"])

    x = jnp.linspace(-1.0, 1.0, 16).reshape(2, 8)
    grad_tied = jax.jit(jax.grad(lambda t: forward(share.expand(t, shared), x)))(tied)
    grad_full = jax.grad(forward)(share.expand(tied, shared), x)
    reparam = share.tying(shared)
    grad_reparam = jax.grad(lambda t: forward(reparam.apply(t, reparam.init(t)), x))(tied)
    assert jax.tree.structure(grad_reparam) == jax.tree.structure(grad_tied)
    for key in ("kernel", "bias"):
        total = grad_full["layers"][0][key] + grad_full["layers"][1][key]
        np.testing.assert_allclose(grad_tied["layers"][0][key], total, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grad_reparam["layers"][0][key], total, rtol=1e-6, atol=1e-6)
        assert grad_tied["layers"][1][key] is None
    with pytest.raises(ValueError, match="needs two or more members"):
        share.tie(params, [r"head/\d+"])
    with pytest.raises(ValueError, match="holds other parameters than layers/0"):
        share.tie(params, [["layers/0", "norm"]])
    with pytest.raises(ValueError, match="the members differ"):
        share.tie(params, [["layers/0/kernel", "head/0/kernel"]])
