"""Tokens/s of greedy generation constrained by the answer grammar (mose/answer_grammar.py) against plain greedy
`generate` (the baseline), on the tiny random-init MoSE preset with a byte-level tokenizer trained on answers.

Contenders, interleaved round-robin on the same prompts (batch `--batch`, budget `--budget` new tokens), medians:
  - plain:              model.generate, greedy, KV cache (no logits processor)
  - constrained_cold:   the same with a fresh AnswerConstraint each round (token masks built while generating)
  - constrained_warm:   the same with one AnswerConstraint kept across rounds (masks cached from earlier rounds)
Tokens counted per row up to and including its end-of-turn token (the plain untrained model rarely emits one, so it
runs the whole budget, while constrained rows stop at their answer's end: shorter sequences, cheaper attention, so
tokens/s alone flatters the constrained runs); `ms_per_decoding_step` (wall time / decoding steps of the batch) is the
like-for-like cost of a step. Also: the processor's own time per step (masking, state updates) in the warm runs, and
the share of constrained answers that parse (parse_answer without error, 8 poses).

    python benchmarks/constrained_decoding.py                 # JSON to stdout
    python benchmarks/constrained_decoding.py --rounds 1 --budget 200
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def _setup():
    from mose.presets import build_preset
    from mose.skill_format import Segment, format_trajectory, render_target
    from mose.skill_tokenizer import train_chat_tokenizer

    def target(k):
        return render_target([Segment("vehicles", f"A white van is parked {k} m ahead in the right lane."),
                              Segment("agent_intent", "The van stays parked."), Segment("lateral_control", "Keep the lane."),
                              Segment("trajectory", format_trajectory([(4.01 * j, -0.01 * j * k) for j in range(1, 9)]))])[0]

    tok = train_chat_tokenizer([target(k) for k in range(8)] + ["You are driving the ego car. Plan step by step."] * 4, 2048)
    tok.padding_side = "left"
    return build_preset("tiny"), tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from mose.answer_grammar import AnswerConstraint
    from mose.skill_format import parse_answer
    from mose.skills import load_taxonomy

    tax = load_taxonomy(None)

    model, tok = _setup()
    prompts = [f"<|im_start|>user\nScene {i}: plan step by step.<|im_end|>\n<|im_start|>assistant\n" for i in range(args.batch)]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    n0 = enc["input_ids"].shape[1]
    warm = AnswerConstraint(tok, tax)

    def count(out):
        new = out[:, n0:]
        total = 0
        for row in new.tolist():
            total += row.index(2) + 1 if 2 in row else len(row)
        return total

    proc_time = []

    def run(kind):
        kw = {}
        if kind != "plain":
            c = AnswerConstraint(tok, tax) if kind == "constrained_cold" else warm
            p = c.logits_processor(args.budget)
            inner = p.__call__

            class Timed:
                def __call__(self, ids, scores):
                    t = time.perf_counter()
                    r = inner(ids, scores)
                    if kind == "constrained_warm":
                        proc_time.append(time.perf_counter() - t)
                    return r

            kw["logits_processor"] = [Timed()]
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=args.budget, do_sample=False, pad_token_id=0, eos_token_id=2, **kw)
        dt = time.perf_counter() - t
        answers = tok.batch_decode(out[:, n0:], skip_special_tokens=True)
        ok = sum(parse_answer(a.strip(), tax).ok and parse_answer(a.strip(), tax).trajectory_complete for a in answers)
        return count(out), dt, ok, out.shape[1] - n0

    run("constrained_warm")  # warm-up: fills the warm cache, first-call overheads
    proc_time.clear()
    res = {k: {"tokens": [], "seconds": [], "parsed": [], "steps": []} for k in ("plain", "constrained_cold", "constrained_warm")}
    for _ in range(args.rounds):
        for k in res:
            n, dt, ok, steps = run(k)
            res[k]["steps"].append(steps)
            res[k]["tokens"].append(n)
            res[k]["seconds"].append(dt)
            res[k]["parsed"].append(ok)
    out = {"benchmark": "constrained_decoding", "baseline": "plain", "preset": "tiny", "vocab": len(tok), "batch": args.batch,
           "budget": args.budget, "rounds": args.rounds, "threads": args.threads, "python": platform.python_version(),
           "torch": torch.__version__, "min_answer_tokens": warm.min_new_tokens(), "contenders": {}}
    for k, r in res.items():
        tps = [n / s for n, s in zip(r["tokens"], r["seconds"])]
        out["contenders"][k] = {"tokens_per_s_median": statistics.median(tps), "tokens_median": statistics.median(r["tokens"]),
                                "seconds_median": statistics.median(r["seconds"]),
                                "ms_per_decoding_step_median": statistics.median(1000 * s / n for s, n in zip(r["seconds"], r["steps"])),
                                "answers_parsed": f"{sum(r['parsed'])}/{args.batch * args.rounds}"}
    base = out["contenders"]["plain"]["tokens_per_s_median"]
    for k, v in out["contenders"].items():
        v["tokens_per_s_ratio_vs_plain"] = v["tokens_per_s_median"] / base
        v["ms_per_step_ratio_vs_plain"] = v["ms_per_decoding_step_median"] / out["contenders"]["plain"]["ms_per_decoding_step_median"]
    out["processor_ms_per_step_warm_median"] = 1000 * statistics.median(proc_time) if proc_time else None
    out["cached_states_warm"] = len(warm._masks)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
