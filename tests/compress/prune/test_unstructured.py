"""Unstructured pruning: schedules, exact sparsity, frozen zeros, movement scores, artefacts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from jaxcompress import core
from jaxcompress.compress.method import Rate
from jaxcompress.compress.prune import sparse
from jaxcompress.compress.prune import unstructured as prune
from jaxcompress.compress.prune.method import PRUNING
from jaxcompress.compress.registry import NOT_WEIGHTS
from jaxcompress.config import finetune_defaults
from jaxcompress.train.loop import train
from jaxcompress.train.step import make_optimizer
from tests.helpers import tiny_model_run_config

RULES = [(r".*/kernel", True), (".*", None)]


def params(seed=0) -> dict:
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "enc": {
            "a": {"kernel": jax.random.normal(k[0], (32, 16)), "bias": jnp.zeros(16)},
            "b": {"kernel": jax.random.normal(k[1], (16, 8)), "bias": jnp.zeros(8)},
        },
        "LayerNorm": {"scale": jnp.ones(8)},
    }


def kernels(tree) -> dict[str, np.ndarray]:
    flat = flatten_dict(tree, sep="/")
    return {k: np.asarray(v) for k, v in flat.items() if k.endswith("/kernel")}


def loss(tree):
    return sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree.leaves(tree))


def run_steps(reparam, tree, steps):
    """Jitted optimizer steps as the train loop takes them, through `core.with_reparam`;
    yields (step, params, reparam state, optimizer state)."""
    tx = core.with_reparam(reparam, make_optimizer(finetune_defaults().train, 100, NOT_WEIGHTS))

    @jax.jit
    def one(tree, opt):
        grads = jax.grad(lambda p: loss(core.reparam_apply(p, opt)))(tree)
        updates, opt = tx.update(grads, opt, tree)
        return optax.apply_updates(tree, updates), opt

    opt = tx.init(tree)
    for step in range(1, steps + 1):
        tree, opt = one(tree, opt)
        yield step, tree, core.reparam_state(opt).state, opt


def test_schedule_is_zhu_and_gupta_cubic():
    s = prune.Schedule(final=0.9, begin_step=10, end_step=50, frequency=10)
    values = [float(s.value(t)) for t in (0, 10, 19, 20, 30, 40, 50, 80)]
    cubic = [0.9 * (1 - (1 - f) ** 3) for f in (0.25, 0.5, 0.75)]
    np.testing.assert_allclose(values, [0, 0, 0, *cubic, 0.9, 0.9], 1e-6, atol=1e-7)
    assert [bool(s.is_update(t)) for t in (9, 10, 15, 20, 50, 60)] == [0, 1, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="begin_step <= end_step"):
        prune.Schedule(final=0.5, begin_step=5, end_step=2)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_sparsity_is_the_target_at_every_step_and_zeros_stay(scope):
    schedule = prune.Schedule(final=0.9, begin_step=2, end_step=10, frequency=2)
    reparam = prune.magnitude_pruning(RULES, schedule, scope)
    before: dict[str, np.ndarray] = {}
    for step, tree, state, opt in run_steps(reparam, params(), 14):
        target = float(schedule.value(step))
        assert float(state.target) == pytest.approx(target, rel=1e-6, abs=1e-7)
        ks = kernels(tree)
        zeros = {k: int(np.sum(v == 0)) for k, v in ks.items()}
        if scope == "layer":
            for k, v in ks.items():
                assert zeros[k] == round(target * v.size), (step, k)
        else:
            total = sum(v.size for v in ks.values())
            assert sum(zeros.values()) == round(target * total)
        adam = opt.inner[1][0]
        for k, v in before.items():
            assert np.all(ks[k][v == 0] == 0)  # once pruned, a weight stays exactly zero
            for moment in (adam.mu, adam.nu):  # and its Adam moments are zero, not drifting
                assert np.all(kernels(moment)[k][v == 0] == 0)
        before = ks
    assert prune.sparsity(tree, RULES) == pytest.approx(0.9, abs=1e-3)
    dense = sum(x.size for x in jax.tree_util.tree_leaves(tree))
    zeros = sum(int(np.sum(v == 0)) for v in kernels(tree).values())
    assert prune.pruning_stats(tree, RULES) == {
        "sparsity": prune.sparsity(tree, RULES),
        "remaining_params": dense - zeros,
    }


def test_one_shot_global_pruning_keeps_the_largest_weights():
    tree = params()
    reparam = prune.magnitude_pruning(RULES, prune.Schedule(final=0.5), "global")
    pruned = reparam.apply(tree, reparam.init(tree))
    everything = np.concatenate([np.abs(v).reshape(-1) for v in kernels(tree).values()])
    cut = np.sort(everything)[everything.size // 2]
    for k, v in kernels(tree).items():
        np.testing.assert_array_equal(kernels(pruned)[k], np.where(np.abs(v) >= cut, v, 0.0))
    np.testing.assert_array_equal(pruned["enc"]["a"]["bias"], tree["enc"]["a"]["bias"])


def test_movement_scores_learn_from_the_straight_through_gradient():
    tree = prune.add_movement_scores(params(), RULES)
    schedule = prune.Schedule(final=0.75, begin_step=0, end_step=0)
    reparam = prune.movement_pruning(RULES, schedule, "hard")
    state = reparam.init(tree)
    seen = reparam.apply(tree, state)
    assert "kernel" + prune.SCORE_SUFFIX not in seen["enc"]["a"]
    grads = jax.grad(lambda p: loss(reparam.apply(p, state)))(tree)
    w = tree["enc"]["a"]["kernel"]
    mask = state.masks["enc"]["a"]["kernel"]
    g_seen = jax.grad(loss)(seen)["enc"]["a"]["kernel"]
    np.testing.assert_allclose(
        grads["enc"]["a"]["kernel" + prune.SCORE_SUFFIX], g_seen * w, 1e-6, atol=1e-7
    )
    np.testing.assert_allclose(grads["enc"]["a"]["kernel"], g_seen * mask, 1e-6, atol=1e-7)
    # After scores move, the mask keeps exactly the top 25% of them.
    scores = jax.random.normal(jax.random.key(3), w.shape)
    tree["enc"]["a"]["kernel" + prune.SCORE_SUFFIX] = scores
    state = reparam.update(tree, state, 0)
    kept = np.asarray(state.masks["enc"]["a"]["kernel"])
    assert kept.sum() == w.size // 4
    assert np.min(np.asarray(scores)[kept]) > np.max(np.asarray(scores)[~kept])


def test_movement_scores_can_start_from_the_movement_of_a_fine_tune():
    before, after = params(0), params(1)
    tree = prune.add_movement_scores(after, RULES, init=0.5, fine_tuned_from=before)
    primed = prune.add_movement_scores(after, RULES, 0.5, before, magnitude=0.25)
    alone = prune.add_movement_scores(after, RULES, 0.5, magnitude=0.25)
    for name in ("a", "b"):
        w, w0 = jnp.abs(after["enc"][name]["kernel"]), jnp.abs(before["enc"][name]["kernel"])
        key = "kernel" + prune.SCORE_SUFFIX
        np.testing.assert_allclose(tree["enc"][name][key], 0.5 + w - w0, 1e-6, atol=1e-6)
        np.testing.assert_allclose(primed["enc"][name][key], 0.5 + w - 0.75 * w0, 1e-6, atol=1e-6)
        np.testing.assert_allclose(alone["enc"][name][key], 0.5 + 0.25 * w, 1e-6, atol=1e-6)
    assert "scale" + prune.SCORE_SUFFIX not in tree["LayerNorm"]
    # Through the method: `scores_from` is loaded with the loop's loader, by its path.
    cfg = finetune_defaults().prune
    cfg.method, cfg.params, cfg.sparsity, cfg.scores_from = "movement", ".*/kernel", 0.5, "base"
    spec = PRUNING.parse(cfg)
    prepared = PRUNING.prepare(spec, after, {"base": before}.__getitem__)
    np.testing.assert_allclose(
        prepared["enc"]["b"]["kernel" + prune.SCORE_SUFFIX],
        jnp.abs(after["enc"]["b"]["kernel"]) - jnp.abs(before["enc"]["b"]["kernel"]),
        1e-6,
        atol=1e-6,
    )
    other = params(2)
    other["enc"]["b"]["kernel"] = jnp.ones((16, 4))
    with pytest.raises(ValueError, match="'enc/b/kernel'.*fine-tuned from"):
        prune.add_movement_scores(after, RULES, fine_tuned_from=other)
    del other["enc"]["b"]
    with pytest.raises(ValueError, match="has nothing at 'enc/b/kernel'"):
        prune.add_movement_scores(after, RULES, fine_tuned_from=other)


def test_summed_movement_scores_are_minus_the_sum_of_gradient_times_weight():
    """score_update='sum' inside the loop's optimizer (the reparam zeroing held weights'
    moments beside a masked AdamW): each score is -lr * the sum of its dL/dW' * W."""
    tree = prune.add_movement_scores(params(), RULES)
    reparam = prune.movement_pruning(RULES, prune.Schedule(final=0.5), "hard")
    train = finetune_defaults().train
    with train.unlocked():
        train.clip_norm = 1e9  # no clipping: the sum is exact
    rates = {prune.SCORE_SUFFIX: Rate(0.5, "sum")}
    tx = core.with_reparam(reparam, make_optimizer(train, 10, NOT_WEIGHTS, rates))
    opt = tx.init(tree)
    expected = jnp.zeros_like(tree["enc"]["a"]["kernel" + prune.SCORE_SUFFIX])
    for _ in range(3):
        seen = core.reparam_apply(tree, opt)
        g_seen = jax.grad(loss)(seen)["enc"]["a"]["kernel"]
        expected -= 0.5 * g_seen * tree["enc"]["a"]["kernel"]
        grads = jax.grad(lambda p, o=opt: loss(core.reparam_apply(p, o)))(tree)
        updates, opt = tx.update(grads, opt, tree)
        tree = optax.apply_updates(tree, updates)
    np.testing.assert_allclose(
        tree["enc"]["a"]["kernel" + prune.SCORE_SUFFIX], expected, rtol=1e-5, atol=1e-7
    )


def test_soft_movement_thresholds_sigmoid_scores_and_penalises_them():
    tree = prune.add_movement_scores(params(), RULES, init=-1.0)
    tree["enc"]["b"]["kernel" + prune.SCORE_SUFFIX] = jnp.full((16, 8), 2.0)
    reparam = prune.movement_pruning(RULES, prune.Schedule(final=0.5), "soft")
    state = reparam.init(tree)
    assert not np.any(state.masks["enc"]["a"]["kernel"])  # sigmoid(-1) < 0.5
    assert np.all(state.masks["enc"]["b"]["kernel"])
    expected = (32 * 16 * jax.nn.sigmoid(-1.0) + 16 * 8 * jax.nn.sigmoid(2.0)) / (32 * 16 + 128)
    assert float(prune.movement_penalty(tree)) == pytest.approx(float(expected), 1e-5)


def test_lottery_ticket_rewinding_and_fixed_masks():
    initial, trained = params(0), params(1)
    pruned = prune.magnitude_pruning(RULES, prune.Schedule(final=0.8))
    winner = pruned.apply(trained, pruned.init(trained))
    rewound = prune.rewind(winner, initial, RULES)
    for k, v in kernels(rewound).items():
        np.testing.assert_array_equal(v, np.where(kernels(winner)[k] != 0, kernels(initial)[k], 0))
    fixed = prune.fixed_masks(prune.masks_from_zeros(winner, RULES))
    for _, tree, state, _ in run_steps(fixed, rewound, 3):
        assert float(state.target) == pytest.approx(0.8, abs=1e-2)
        for k, v in kernels(tree).items():
            assert np.all(v[kernels(winner)[k] == 0] == 0)


def test_sparse_artefact_round_trip_and_bytes(tmp_path):
    tree = params()
    reparam = prune.magnitude_pruning(RULES, prune.Schedule(final=0.9))
    pruned = reparam.apply(tree, reparam.init(tree))
    path = sparse.save(tmp_path / "sparse.safetensors", pruned, RULES)
    loaded = sparse.load(path)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(pruned), strict=True):
        np.testing.assert_array_equal(got, want)
    kept = sum(int(np.sum(v != 0)) for v in kernels(pruned).values())
    size = sum(v.size for v in kernels(pruned).values())
    payload = load_file(path)
    assert sum(payload[k].nbytes for k in payload if k.endswith(":values")) == 4 * kept
    assert sum(payload[k].nbytes for k in payload if k.endswith(":bitmask")) == size // 8
    with pytest.raises(ValueError, match="not a sparse artefact"):
        from safetensors.numpy import save_file

        save_file({"x": np.zeros(2, np.float32)}, tmp_path / "plain.safetensors")
        sparse.load(tmp_path / "plain.safetensors")


def test_bad_prune_configs_fail_clearly():
    cfg = finetune_defaults().prune
    with cfg.unlocked():
        cfg.method = "random"
    with pytest.raises(ValueError, match="prune.method must be one of"):
        PRUNING.parse(cfg)
    cfg.method, cfg.begin, cfg.end = "magnitude", 0.5, 0.2
    with pytest.raises(ValueError, match="begin <= end"):
        PRUNING.parse(cfg)
    cfg.begin, cfg.end, cfg.sparsity = 0.0, 0.5, 1.0
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        PRUNING.parse(cfg)
    cfg.sparsity, cfg.masks_from = 0.5, "somewhere"
    with pytest.raises(ValueError, match="leave prune.method empty"):
        PRUNING.parse(cfg)
    cfg.masks_from, cfg.scores_from = "", "base"
    with pytest.raises(ValueError, match="prune.scores_from starts movement scores"):
        PRUNING.parse(cfg)
    cfg.scores_from, cfg.score_magnitude = "", 0.1
    with pytest.raises(ValueError, match="leave score_magnitude unset"):
        PRUNING.parse(cfg)


@pytest.mark.slow
def test_magnitude_pruning_run_resumes_exactly_and_saves_sparse(tmp_path, minilm_dir, glue_dir):
    config = tiny_model_run_config(tmp_path, minilm_dir, glue_dir, steps=4)
    with config.unlocked():
        config.prune.method = "magnitude"
        config.prune.sparsity = 0.75
        config.prune.begin, config.prune.end, config.prune.frequency = 0.25, 0.75, 1
    straight = train(config, tmp_path / "straight")
    train(config, tmp_path / "resumed", stop_after_step=2)
    resumed = train(config, tmp_path / "resumed")
    assert straight["eval"] == resumed["eval"]
    assert straight["sparsity"] == pytest.approx(0.75, abs=1e-4)
    assert straight["remaining_params"] < straight["params"]
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    query = a["bert.encoder.layer.0.attention.self.query.weight"]
    assert np.sum(query == 0) == round(0.75 * query.size)
    assert np.all(a["bert.embeddings.word_embeddings.weight"] != 0)
    packed = tmp_path / "straight" / "sparse" / "params.safetensors"
    assert straight["bytes"] == packed.stat().st_size
    assert straight["bytes_no_embeddings"] < 0.5 * sum(
        v.nbytes for k, v in a.items() if "embeddings" not in k
    )


def test_weight_decay_spares_movement_scores_and_lsq_steps():
    tree = {
        "dense": {
            "kernel": jnp.ones((2, 2)),
            "kernel" + prune.SCORE_SUFFIX: jnp.ones((2, 2)),
            "kernel@lsq_step": jnp.ones(()),
        }
    }
    tx = make_optimizer(finetune_defaults().train, 10, NOT_WEIGHTS)  # as the loop builds it
    opt = tx.init(tree)
    for _ in range(3):
        updates, opt = tx.update(jax.tree.map(jnp.zeros_like, tree), opt, tree)
        tree = optax.apply_updates(tree, updates)
    assert np.all(tree["dense"]["kernel"] < 1.0)  # decayed
    np.testing.assert_array_equal(tree["dense"]["kernel" + prune.SCORE_SUFFIX], 1.0)
    np.testing.assert_array_equal(tree["dense"]["kernel@lsq_step"], 1.0)


def test_movement_scores_train_at_their_own_rate_or_sum_their_gradients():
    config = finetune_defaults()
    with config.unlocked():
        config.prune.method, config.prune.sparsity, config.prune.end = "movement", 0.5, 0.5
        config.prune.score_lr = 1e-2
        config.train.weight_decay = 0.0
    score = "kernel" + prune.SCORE_SUFFIX
    tree = {"dense": {"kernel": jnp.ones((2, 2)), score: jnp.ones((2, 2))}}
    grads = [jax.tree.map(lambda x, i=i: (i + 1.0) * x, tree) for i in range(4)]

    def last_update(rates):
        tx = make_optimizer(config.train, 10, NOT_WEIGHTS, rates)
        opt = tx.init(tree)
        for g in grads:
            updates, opt = tx.update(g, opt, tree)
        return updates["dense"], opt

    rates = PRUNING.extra_rates(PRUNING.parse(config.prune))
    assert rates == {prune.SCORE_SUFFIX: Rate(1e-2, "adam")}
    step, _ = last_update(rates)
    np.testing.assert_allclose(step[score], step["kernel"] * 1e-2 / config.train.lr, rtol=1e-6)
    assert np.all(step["kernel"] < 0)

    with config.unlocked():
        config.prune.score_update, config.prune.score_lr = "sum", 0.5
    rates = PRUNING.extra_rates(PRUNING.parse(config.prune))
    assert rates == {prune.SCORE_SUFFIX: Rate(0.5, "sum")}
    step, _ = last_update(rates)
    clipped = 4.0 * config.train.clip_norm / np.sqrt(8 * 4.0**2)  # global norm clipping
    np.testing.assert_allclose(step[score], -0.5 * clipped, rtol=1e-6)  # -lr * gradient
    assert np.all(step["kernel"] < 0) and not np.allclose(step["kernel"], step[score])

    with config.unlocked():
        config.prune.score_update, config.prune.score_lr = "adam", 0.0  # as the weights
    assert PRUNING.extra_rates(PRUNING.parse(config.prune)) == {}


@pytest.mark.slow
def test_movement_pruning_run_exports_the_pruned_model_without_scores(
    tmp_path, minilm_dir, glue_dir
):
    config = tiny_model_run_config(tmp_path, minilm_dir, glue_dir, steps=2)
    with config.unlocked():
        config.prune.method, config.prune.movement = "movement", "hard"
        config.prune.sparsity, config.prune.end, config.prune.frequency = 0.5, 0.5, 1
        config.prune.scores_from = config.model  # loaded and matched by path (all zero here)
    summary = train(config, tmp_path / "run")
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-4)
    exported = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert not any(prune.SCORE_SUFFIX in key for key in exported)
    query = exported["bert.encoder.layer.1.attention.self.query.weight"]
    assert np.sum(query == 0) == query.size // 2
    assert sparse.load(tmp_path / "run" / "sparse" / "params.safetensors").keys() == {
        "bert",
        "classifier",
    }
