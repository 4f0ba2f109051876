"""Regression: generating under torch.inference_mode must not poison the CPU scratch buffers for later training."""
import torch

from mose.moe import clear_scratch
from mose.presets import build_preset


def test_training_step_after_an_inference_mode_forward():
    torch.manual_seed(0)
    model = build_preset("tiny")
    ids = torch.randint(3, 100, (2, 24))
    clear_scratch()  # buffers are first allocated under inference mode below, as in a generate() call
    with torch.inference_mode():
        model(input_ids=ids)
    out = model(input_ids=ids, labels=ids)  # in-place writes into the same scratch buffers, outside inference mode
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
