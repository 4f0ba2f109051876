"""Inference mode and the CPU expert threads: generation runs under torch.inference_mode, training does not."""
import torch

from mose.expert_dispatch import EXPERT_THREADS, clear_scratch
from mose.moe import MoSESparseBlock
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


def test_threaded_sort_dispatch_under_inference_mode_then_training(monkeypatch):
    """The expert worker threads inherit the caller's inference mode, and their own scratch buffers stay writable
    by a later training step; outputs equal the single-threaded reference."""
    torch.manual_seed(0)
    block = MoSESparseBlock(64, 96, num_experts=4, top_k=2, dispatch="sort")
    x = torch.randn(2048, 64)
    used = []
    run = EXPERT_THREADS.run

    def spy(fn, counts, device, *a, **k):
        used.append(torch.get_num_threads())
        return run(fn, counts, device, *a, **k)

    monkeypatch.setattr(EXPERT_THREADS, "run", spy)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            expected = block(x)
        torch.set_num_threads(2)  # the threaded path (2048 * 2 rows over 2 threads is above its work threshold)
        with torch.inference_mode():
            got = block(x)
        assert got.is_inference()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        y = block(x.requires_grad_())  # training after inference, on the same worker threads and buffers
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all() and block.experts.gate_up_proj.grad.abs().sum() > 0
    finally:
        torch.set_num_threads(old)
    assert used == [1, 2, 2, 2]  # reference, inference, training forward, backward
