"""Key table for transformers' ``T5EncoderModel`` checkpoints (golden README, "Weight layout facts": T5 encoder).

Parameter paths mirror the state-dict names, so the table is: the token table (``shared.weight``, tied to
``encoder.embed_tokens.weight``), block 0's relative-attention-bias table, then the standard leaves (RMSNorm
``weight`` -> ``scale``; bias-free Linear ``weight`` (out, in) -> ``kernel`` (in, out)).

Tied embedding: ``shared.weight`` and ``encoder.embed_tokens.weight`` are one tensor. transformers writes only
``shared.weight``; other writers keep both, or only the alias. Both rules fill ``shared.embedding``; when both keys
are present :func:`ignored_keys` drops the alias (the loader skips it) and :func:`check` requires equal shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from show1_jax.keymap import KeyTable, MappingReport, Rule, standard_leaf_rules
from show1_jax.t5 import T5Config

SHARED = "shared.weight"
EMBED_TOKENS_ALIAS = "encoder.embed_tokens.weight"


def key_table(config: T5Config) -> KeyTable:
    return (
        Rule(r"shared\.weight", "shared.embedding"),
        Rule(r"encoder\.embed_tokens\.weight", "shared.embedding"),
        Rule(r"(encoder\.block\.\d+\.layer\.0\.SelfAttention\.relative_attention_bias)\.weight", r"\1.embedding"),
        *standard_leaf_rules(),
    )


def ignored_keys(config: T5Config, keys: Iterable[str]) -> set[str]:
    """Checkpoint keys the loader must skip: the tied alias of ``shared.weight`` when both are stored."""
    keys = set(keys)
    return {EMBED_TOKENS_ALIAS} if SHARED in keys and EMBED_TOKENS_ALIAS in keys else set()


def check(config: T5Config, keys_and_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    problems = []
    if SHARED in keys_and_shapes and EMBED_TOKENS_ALIAS in keys_and_shapes:
        a, b = tuple(keys_and_shapes[SHARED]), tuple(keys_and_shapes[EMBED_TOKENS_ALIAS])
        if a != b:
            problems.append(
                f"`{SHARED}` {a} and its tied alias `{EMBED_TOKENS_ALIAS}` {b} differ in shape: they must be the"
                " same tensor; re-save the checkpoint with transformers' save_pretrained"
            )
    return problems


def hint(config: T5Config, report: MappingReport) -> str:
    keys = list(report.unmapped) + [k for k, _ in report.no_target]
    if any(k.startswith(("decoder.", "lm_head.")) for k in keys):
        return (
            "the checkpoint is a full encoder-decoder T5 (T5ForConditionalGeneration); save its encoder with"
            " transformers' T5EncoderModel.from_pretrained(...).save_pretrained(...) and load that folder"
        )
    if any("relative_attention_bias" in k for k, _ in report.no_target):
        return "only block 0 may own a relative_attention_bias table in a T5 v1.1 encoder"
    shapes = {k: (s, e) for k, _, s, e in report.shape_mismatch}
    if shapes:
        return (
            f"parameter shapes differ from config.json (d_model={config.d_model}, num_heads={config.num_heads},"
            f" d_kv={config.d_kv}, d_ff={config.d_ff}, vocab_size={config.vocab_size}): is config.json the one"
            " saved with these weights?"
        )
    if report.unfilled:
        return f"config.json asks for {config.num_layers} blocks; does the checkpoint have as many?"
    return ""
