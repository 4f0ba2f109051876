"""No deprecated transformers / torch API is used by our code: a forward, a training step and a KV-cache `generate`
with an image emit no deprecation warning whose origin is one of our packages.

transformers 5 reports most deprecated aliases through its logger (`logger.warning_once`, e.g. `past_key_values` ->
`cache` in transformers/utils/generic.py:639, `image_hidden_states` in models/llava/modeling_llava.py:56), others
through `warnings.warn(..., FutureWarning)` (e.g. `is_gradient_checkpointing`, modeling_utils.py:3310). Both are
captured here with the call stack at emission. A warning is *ours* when the function that emitted it was called
from a file of our packages (the frame `warnings.warn(stacklevel=2)` would blame); third-party code that warns on
its own (peft reading `is_gradient_checkpointing`, DeepSpeed calling `torch.distributed.all_gather_into_tensor`) is
not ours. pyproject's `ignore::DeprecationWarning` filter is overridden inside the capture ("always").
"""
from __future__ import annotations

import contextlib
import logging
import os
import traceback
import warnings

import pytest
import torch
from transformers.utils import logging as hf_logging

from tests.test_modeling import _tiny_mose, inputs_for, llava_config, qwen2vl_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_PACKAGES = tuple(os.path.join(ROOT, p) + os.sep for p in ("common", "mose", "datasets_cfg", "curation", "training",
                                                               "eval", "pipelines"))
DEPRECATION_WORDS = ("deprecat", "will be removed", "will return", "instead")
_MACHINERY = (os.sep + "logging" + os.sep, os.path.join("transformers", "utils", "logging.py"), os.sep + "warnings.py", "typing_extensions.py", os.sep + "contextlib.py")


def _blamed_file(stack: list[traceback.FrameSummary]) -> str | None:
    """The file that called the emitting function: skip the logging / warnings machinery at the top of the stack,
    then the emitting function (a deprecated property, or the `deprecated` decorator's wrapper), and return its
    caller's file."""
    frames = [f for f in reversed(stack) if not any(m in f.filename for m in _MACHINERY)]
    frames = [f for f in frames if f.filename != __file__ or f.name not in ("emit", "_show")]
    return frames[1].filename if len(frames) > 1 else None


@contextlib.contextmanager
def deprecations(packages=OUR_PACKAGES):
    """Collect (message, blamed file) of every deprecation warning -- `warnings` categories Deprecation/FutureWarning
    and transformers logger warnings that read as a deprecation -- whose blamed file lies under `packages`."""
    found: list[tuple[str, str]] = []

    def record(message: str, stack) -> None:
        blamed = _blamed_file(stack)
        if blamed and blamed.startswith(packages):
            found.append((message, blamed))

    class Handler(logging.Handler):
        def emit(self, rec):
            msg = rec.getMessage()
            if any(w in msg.lower() for w in DEPRECATION_WORDS):
                record(msg, traceback.extract_stack())

    def _show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning)):
            record(str(message), traceback.extract_stack())

    hf_logger = hf_logging.get_logger("transformers")
    handler, level = Handler(level=logging.WARNING), hf_logger.level
    hf_logging.warning_once.cache_clear()  # "once" per process: an earlier test must not hide a warning from this one
    hf_logger.addHandler(handler)
    hf_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _show
            yield found
    finally:
        hf_logger.removeHandler(handler)
        hf_logger.setLevel(level)
        hf_logging.warning_once.cache_clear()


@pytest.mark.parametrize("config_fn", [llava_config, qwen2vl_config], ids=["llava", "qwen2vl"])
def test_forward_train_step_and_cached_generate_use_no_deprecated_api(config_fn):
    model = _tiny_mose(config_fn).eval()
    batch = inputs_for(model.config.base_config, batch=2, seq=10)
    with deprecations() as found:
        with torch.no_grad():
            out = model(**batch, use_cache=True)
        assert out.cache is not None and out.cache.get_seq_length() == 10  # the KV cache under its transformers-5 name
        # the image features under their transformers-5 name: one (4 image tokens, hidden) tensor per row's image
        hidden = model.config.get_text_config(decoder=True).hidden_size
        assert [tuple(p.shape) for p in out.image_outputs.pooler_output] == [(4, hidden), (4, hidden)]
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=True)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
    assert generated.shape == (2, 13)
    assert found == [], f"deprecated API used by our code: {found}"


def test_the_capture_blames_the_caller_of_a_deprecated_alias():
    """The detector can fail: reading the base output's deprecated `past_key_values` / `image_hidden_states` from
    this file is caught when this file counts as ours, and not when it does not."""
    model = _tiny_mose(llava_config).eval()
    batch = inputs_for(model.config.base_config, batch=1, seq=10)
    with torch.no_grad():
        base_out = model.vlm(**batch, use_cache=True)
    with deprecations(packages=(os.path.abspath(__file__),)) as found:
        assert base_out.past_key_values is base_out.cache
        base_out.image_hidden_states
        model.is_gradient_checkpointing  # a FutureWarning through `warnings` (transformers modeling_utils.py:3310)
    messages = [m for m, _ in found]
    assert len(found) == 3, found
    assert any("`past_key_values`" in m for m in messages) and any("`image_hidden_states`" in m for m in messages)
    assert any("is_gradient_checkpointing" in m for m in messages)
    with deprecations() as found_ours:
        base_out.past_key_values
    assert found_ours == []  # this test file is not one of our packages
