"""Reading released ``config.json`` files into frozen dataclasses.

Every network family defines a frozen dataclass whose field names are the keys of the diffusers/transformers
``config.json`` it is built from. :func:`config_from_dict` fills it and refuses what it cannot honour: a key the
dataclass does not know is accepted only when its value is one that changes nothing (``None``/``False``/its
documented neutral value); anything else is an error that names the key, so no setting is ignored silently.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Keys written by save_pretrained/to_json_file that describe provenance, not the network.
_PROVENANCE_KEYS = frozenset(
    {
        "_class_name",
        "_diffusers_version",
        "_name_or_path",
        "_commit_hash",
        "_use_default_values",
        "architectures",
        "transformers_version",
        "model_type",
        "torch_dtype",
        "dtype",
        "use_cache",
        "is_encoder_decoder",
        "is_decoder",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "tie_word_embeddings",
        "pruned_heads",
        "chunk_size_feed_forward",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "prefix",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "finetuning_task",
        "cross_attention_hidden_size",
        "add_cross_attention",
        "tie_encoder_decoder",
        "initializer_factor",
        "initializer_range",
        "sample_size",
        "show1_jax",
        # transformers' PretrainedConfig generation defaults, written by older full config dumps: they only
        # affect text generation, never an encoder forward.
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "tf_legacy_loss",
        "use_bfloat16",
    }
)


class ConfigError(ValueError):
    """A config.json that this implementation cannot build faithfully."""


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: a component folder needs its config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): re-download or re-save the component") from err


def config_from_dict(cls: type[T], raw: Mapping[str, Any], *, neutral: Mapping[str, Any] | None = None) -> T:
    """Build the frozen dataclass ``cls`` from a config mapping.

    Args:
      cls: the family's config dataclass.
      raw: the parsed config.json.
      neutral: keys the family does not model, with the value that makes them a no-op. A key present in
        ``raw`` with any other value raises :class:`ConfigError`.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    neutral = dict(neutral or {})
    kwargs: dict[str, Any] = {}
    refused = []
    for key, value in raw.items():
        if key in fields:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key in _PROVENANCE_KEYS:
            continue
        elif key in neutral:
            if value != neutral[key] and not (value is None and neutral[key] in (None, False)):
                refused.append(f"{key}={value!r} (only {neutral[key]!r} is supported)")
        elif value not in (None, False):
            refused.append(f"{key}={value!r} (unknown to {cls.__name__})")
    if refused:
        raise ConfigError(
            f"config for {cls.__name__} has settings this implementation does not support: "
            + "; ".join(refused)
            + ". Remove them from config.json only if you know they do not change the network."
        )
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"config for {cls.__name__} is incomplete or malformed: {err}") from err


def config_to_dict(config: Any) -> dict[str, Any]:
    """The inverse of :func:`config_from_dict` (tuples become lists), for writing config.json."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
