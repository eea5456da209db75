"""ALBERT-family compression of the SST-2 teacher, recovered by logit distillation from it.

  jaxcompress finetune --config configs/albert.py:e128 --workdir runs/albert/e128
  jaxcompress finetune --config configs/albert.py:share_all,quick --workdir runs/albert/q

Variants: e128, e64 (factorized embeddings, token-frequency-weighted SVD init of the trained
table), e128_svd, e64_svd (plain truncated SVD init), share_all, share_2, share_3
(cross-layer sharing of whole layers, mean init), share_attention, share_ffn (all layers),
lowrank_ffn_50, lowrank_ffn_25 (FFN kernels at that share of full rank). Flags: `quick`
shortens recovery to 50 steps; `long` recovers for 800 steps at lr 1e-4; `layers` adds
TinyBERT's layer terms (hidden-state and embedding MSE, attention KL on every layer) to the
logit distillation.
"""

import ml_collections

TEACHER = "minilm-l6-sst2-teacher"
VARIANTS = {
    "e128": "factorize_embeddings(embedding_size=128, init='frequency_svd')",
    "e64": "factorize_embeddings(embedding_size=64, init='frequency_svd')",
    "e128_svd": "factorize_embeddings(embedding_size=128)",
    "e64_svd": "factorize_embeddings(embedding_size=64)",
    "share_all": "share_layers(groups='all')",
    "share_2": "share_layers(groups='every:2')",
    "share_3": "share_layers(groups='every:3')",
    "share_attention": "share_layers(groups='all', scope='attention')",
    "share_ffn": "share_layers(groups='all', scope='ffn')",
    "lowrank_ffn_50": "low_rank(target='ffn', fraction=0.5)",
    "lowrank_ffn_25": "low_rank(target='ffn', fraction=0.25)",
}


def get_config(arg: str = "e128") -> ml_collections.ConfigDict:
    variant, *flags = arg.split(",")
    if unknown := set(flags) - {"quick", "long", "layers"}:
        raise ValueError(f"unknown flags {sorted(unknown)}; known: quick, long, layers")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.model = TEACHER
    c.task = "sst2"
    c.transforms = (VARIANTS[variant],)
    c.distill = ml_collections.ConfigDict({"teacher": TEACHER, "alpha": 0.5, "temperature": 2.0})
    if "layers" in flags:
        c.distill.update({"hidden": 1.0, "embedding": 1.0, "attention": 1.0})
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32
    c.train.steps = 50 if "quick" in flags else 800 if "long" in flags else 400
    c.train.lr = 1e-4 if "long" in flags else 5e-5
    c.train.warmup_ratio = 0.06
    c.checkpoint_every = 200
    return c
