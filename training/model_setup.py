"""The model and processor a run starts from, built offline.

- `model.path`: a MoSE checkpoint directory (`from_pretrained`), processor from `model.processor` or the same directory.
- `model.preset` with a hub model (e.g. "qwen2-vl-2b-mose"): the dense hub VLM (`model.preset_args.base`, default
  the preset's hub id; a local directory works offline) is upcycled with the preset's MoE options and the skill
  taxonomy's expert groups; its own processor.
- `model.preset` without one ("tiny"): random init; its processor is a byte-level BPE tokenizer trained on the
  run's own item texts (`mose.skill_tokenizer`: ChatML template, the image token on the preset's image id) + a
  SigLIP image processor + `LlavaProcessor`; the preset's vocabulary and special ids follow that tokenizer. It is saved in `<output_dir>/processor` and
  reused on resume, so every stage and every checkpoint speaks the same tokens.
"""
from __future__ import annotations

from pathlib import Path

from training.config import ConfigError


def train_processor(texts, base):
    """A LlavaProcessor around a byte-level BPE trained on `texts`, sized for the random-init base config `base`
    (its vocabulary, image token id and image size): `mose.skill_tokenizer`, the same builder the skill dataset uses."""
    from mose.skill_tokenizer import llava_processor_for, train_chat_tokenizer

    tok = train_chat_tokenizer(list(texts), base.text_config.vocab_size, image_token_id=base.image_token_id)
    return llava_processor_for(base, tok)


def item_texts(items_by_stage: dict) -> list[str]:
    out = []
    for ds in items_by_stage.values():
        out += list(ds["prompt"]) + list(ds["target"])
    return out


def load_processor(path: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path))


def _taxonomy_kwargs(taxonomy, num_experts: int) -> dict:
    kw = taxonomy.config_kwargs(num_experts)
    kw.pop("shared_expert", None)  # the preset decides its architecture
    return kw


def initial_processor(cfg, items_by_stage: dict, processor_dir: Path):
    """The run's processor: `model.processor`, a processor saved earlier in `processor_dir`, the checkpoint's / hub
    model's own, or (random-init presets) one trained on the run's item texts."""
    m = cfg.model
    if m.processor:
        return load_processor(m.processor)
    if (processor_dir / "processor_config.json").is_file() or (processor_dir / "tokenizer.json").is_file():
        return load_processor(processor_dir)
    if m.path is not None:
        return load_processor(m.path)
    from mose.presets import base_config

    preset = _preset(cfg)
    if preset.hub_id is not None:
        return load_processor(m.preset_args.get("base", preset.hub_id))
    return train_processor(item_texts(items_by_stage), base_config(m.preset))


def _preset(cfg):
    from mose.presets import PRESETS

    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"{cfg.source}: model.preset: unknown preset {cfg.model.preset!r}; available: {', '.join(PRESETS)}")
    return PRESETS[cfg.model.preset]


def starts_from_random_init(cfg) -> bool:
    """True when the run's first model has no pretrained weights: a preset without a hub model (e.g. "tiny")."""
    return cfg.model.path is None and _preset(cfg).hub_id is None


def initial_model(cfg, taxonomy, processor):
    """The model the first stage starts from: a checkpoint, an upcycled hub VLM or a random-init preset."""
    import torch

    import mose.modeling  # noqa: F401  (registers MoSE with the Auto classes)
    from mose.config import MoSEConfig
    from mose.modeling import MoSEForConditionalGeneration
    from mose.presets import base_config

    m = cfg.model
    if m.path is not None:
        return _dispatch(MoSEForConditionalGeneration.from_pretrained(m.path), m.dispatch)
    preset = _preset(cfg)
    args = dict(m.preset_args)
    seed = int(args.pop("seed", cfg.run.seed))
    base_path = args.pop("base", preset.hub_id)
    moe = {**preset.moe_options, **args}
    moe = {**_taxonomy_kwargs(taxonomy, int(moe.get("num_experts", 4))), **moe}
    if m.dispatch:
        moe["dispatch"] = m.dispatch
    if preset.hub_id is not None:  # a real VLM: upcycle its pretrained dense weights
        from transformers import AutoModelForImageTextToText

        from mose.modeling import upcycle

        return upcycle(AutoModelForImageTextToText.from_pretrained(base_path), seed=seed, **moe)
    # random-init preset: the vocabulary and image token follow the run's tokenizer
    base = base_config(m.preset)
    tok = processor.tokenizer
    base.text_config.vocab_size = len(tok)
    base.image_token_index = tok.convert_tokens_to_ids(processor.image_token)
    base.text_config.pad_token_id, base.text_config.bos_token_id, base.text_config.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(seed)
    return MoSEForConditionalGeneration(MoSEConfig(base_config=base, **moe))


def _dispatch(model, dispatch: str | None):
    if dispatch:
        model.config.dispatch = dispatch
        for block in model.moe_blocks():
            block.experts.dispatch = dispatch
    return model


def stage_model(final_dir: Path, dispatch: str | None = None):
    """The model a later stage starts from: the previous stage's final checkpoint, plain from_pretrained."""
    from mose.modeling import MoSEForConditionalGeneration

    return _dispatch(MoSEForConditionalGeneration.from_pretrained(str(final_dir)), dispatch)


__all__ = ["train_processor", "initial_processor", "initial_model", "stage_model", "load_processor", "item_texts", "starts_from_random_init"]
