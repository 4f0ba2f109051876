"""A chat tokenizer trained locally on a corpus, and a LLaVA processor around it, for random-init models.

The tiny preset (mose/presets.py) has no pretrained tokenizer: its vocabulary (2048), image token id (2047) and
image size (32 px, 8 px patches, 16 image tokens) are config numbers. `train_chat_tokenizer` trains a byte-level
BPE on the texts the model will see, reserves ids up to `vocab_size - 1` and puts the image token last, with a
ChatML template (`<|im_start|>role ... <|im_end|>`); `llava_processor_for(config, tokenizer)` sizes a
SigLIP image processor and a `LlavaProcessor` from the model's config so that `<image>` expands to exactly
`image_seq_length` tokens. Nothing is downloaded.
"""
from __future__ import annotations

from typing import Iterable

# ids 0, 1, 2 = pad, bos-like turn start, eos (the tiny preset's pad / bos / eos ids)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int, *, image_token: str = "<image>", image_token_id: int | None = None,
                         image_placeholder: str | None = None, extra_specials: tuple[str, ...] = ()):
    """Byte-level BPE trained on `texts` with `vocab_size` ids in all; `image_token` gets `image_token_id`
    (default: the last id). Unused ids are filled with reserved special tokens so the ids line up with a config.

    `image_placeholder`: what the chat template writes per image (default: the image token; Qwen2-VL style:
    "<|vision_start|><|image_pad|><|vision_end|>" with those markers in `extra_specials`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    image_token_id = vocab_size - 1 if image_token_id is None else image_token_id
    if not len(SPECIALS) <= image_token_id < vocab_size:
        raise ValueError(f"image_token_id must lie in [{len(SPECIALS)}, {vocab_size}), got {image_token_id}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=image_token_id, special_tokens=[*SPECIALS, *extra_specials], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    n = tok.get_vocab_size()
    if n > image_token_id:
        raise ValueError(f"the trained vocabulary has {n} tokens, more than the {image_token_id} before the image token")
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(n, image_token_id)] + [image_token])
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(image_token_id + 1, vocab_size)])
    assert tok.token_to_id(image_token) == image_token_id and tok.get_vocab_size() == vocab_size
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0], bos_token=SPECIALS[1], eos_token=SPECIALS[2],
                                  extra_special_tokens={"image_token": image_token})
    out.chat_template = CHATML.replace("<image>", image_placeholder or image_token)
    return out


def llava_processor_for(config, tokenizer):
    """A LlavaProcessor whose image placeholder expands to the config's image_seq_length tokens.

    `config`: a MoSEConfig or LlavaConfig with a SigLIP-style vision config.
    """
    from transformers import LlavaProcessor, SiglipImageProcessor

    base = getattr(config, "base_config", config)
    v = base.vision_config
    if tokenizer.convert_tokens_to_ids(tokenizer.image_token) != base.image_token_id:
        raise ValueError(f"the tokenizer's {tokenizer.image_token} has id {tokenizer.convert_tokens_to_ids(tokenizer.image_token)}, "
                         f"the model expects image_token_id {base.image_token_id}")
    ip = SiglipImageProcessor(size={"height": v.image_size, "width": v.image_size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=v.patch_size,
                          vision_feature_select_strategy=base.vision_feature_select_strategy, chat_template=tokenizer.chat_template)
    return proc
