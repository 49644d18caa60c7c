"""Key table for transformers' ``CLIPTextModel`` checkpoints (golden README, "Weight layout facts": CLIP).

Parameter paths mirror the state-dict names: the two embedding tables keep their ``weight`` unchanged as
``embedding``; LayerNorm ``weight`` -> ``scale``; Linear ``weight`` (out, in) -> ``kernel`` (in, out); biases as is.
Older checkpoints also store the ``position_ids`` buffer (0..L-1): it is not a parameter, and :func:`ignored_keys`
tells the loader to skip it; :func:`check` verifies its shape. transformers 5 saves ``CLIPTextModel`` without the
``text_model.`` prefix of the released checkpoints (``encoder.layers.0...``): both spellings map to the same
parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from show1_jax.clip import CLIPTextConfig
from show1_jax.keymap import KeyTable, MappingReport, Rule, standard_leaf_rules

POSITION_IDS = "text_model.embeddings.position_ids"
PREFIX = "text_model."


def key_table(config: CLIPTextConfig) -> KeyTable:
    rules = (
        Rule(r"embeddings\.(token_embedding|position_embedding)\.weight", r"embeddings.\1.embedding"),
        *standard_leaf_rules(),
    )
    # The prefix is optional in the checkpoint (transformers 5 drops it) and always there in our parameter paths.
    return tuple(Rule(r"(?:text_model\.)?" + r.pattern, PREFIX + r.target, r.transform) for r in rules)


def _position_ids_key(keys: Iterable[str]) -> str | None:
    found = {POSITION_IDS, POSITION_IDS.removeprefix(PREFIX)} & set(keys)
    return next(iter(found), None)


def ignored_keys(config: CLIPTextConfig, keys: Iterable[str]) -> set[str]:
    """Checkpoint keys the loader must skip: the ``position_ids`` buffer of older checkpoints."""
    key = _position_ids_key(keys)
    return set() if key is None else {key}


def check(config: CLIPTextConfig, keys_and_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    key = _position_ids_key(keys_and_shapes)
    if key is None:
        return []
    shape = tuple(keys_and_shapes[key])
    n = config.max_position_embeddings
    if shape not in ((1, n), (n,)):
        return [
            f"`{key}` has shape {shape}, expected (1, {n}) for max_position_embeddings={n}: is config.json"
            " the one saved with these weights?"
        ]
    return []


def hint(config: CLIPTextConfig, report: MappingReport) -> str:
    keys = list(report.unmapped) + [k for k, _ in report.no_target]
    if any(k.startswith(("vision_model.", "visual_projection.", "logit_scale")) for k in keys):
        return (
            "the checkpoint is a full CLIPModel (text and vision towers); save its text tower with transformers'"
            " CLIPTextModel.from_pretrained(...).save_pretrained(...) and load that folder"
        )
    if any(k.startswith("text_projection.") for k in keys):
        return "the checkpoint is a CLIPTextModelWithProjection; only CLIPTextModel (no projection) is supported"
    if report.shape_mismatch:
        return (
            f"parameter shapes differ from config.json (hidden_size={config.hidden_size}, intermediate_size="
            f"{config.intermediate_size}, vocab_size={config.vocab_size}, max_position_embeddings="
            f"{config.max_position_embeddings}): is config.json the one saved with these weights?"
        )
    if report.unfilled:
        return f"config.json asks for {config.num_hidden_layers} layers; does the checkpoint have as many?"
    return ""
