"""Constrained decoding of the step-by-step answer (mose/answer_grammar.py) and budgets from the data.

References are independent of the automaton's code: the allowed next bytes of a few states are written by hand
from the grammar in the module doc and the packaged taxonomy (datasets_cfg/skills.yaml); the token masks are
checked against a regular expression of the same grammar (the `regex` module's partial matching); parseability is
`mose.skill_format.parse_answer`; the longest target is the count of trained label tokens of mose/skill_data.py.
"""
import string

import pytest
import regex
import torch

from datasets_cfg.skill_annotation import hierarchical_segments
from mose.answer_grammar import AnswerConstraint, AnswerGrammar, AnswerGrammarError, answer_budget, longest_target_tokens
from mose.skill_format import Segment, format_trajectory, parse_answer, render_target
from mose.skills import Taxonomy
from tests.skill_fixtures import driving_row

TAX = Taxonomy.load()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one torch thread (tests/conftest.py)
PRINTABLE = set(range(0x20, 0x7F)) | set(range(0x80, 0x100))  # what free text may hold, before the exclusions

# the skills of datasets_cfg/skills.yaml, written out by hand
PERCEPTION = ["vehicles", "vulnerable_road_users", "traffic_signs", "traffic_lights", "traffic_cones", "barriers", "other_objects",
              "scene_conditions"]
PREDICTION = ["agent_intent", "interaction_risk"]
PLANNING = ["longitudinal_control", "lateral_control", "rule_compliance"]

_TEXT = r"[^\x00-\x1f\x7f< ][^\x00-\x1f\x7f<]{0,239}"
_NUM = r"-?(?:0|[1-9][0-9]{0,2})(?:\.[0-9]{1,2})?"
_POSE = rf"\({_NUM}, {_NUM}\)"


def _lines(names):
    return rf"(?:\[(?:{'|'.join(names)})\] {_TEXT}\n)*"


ANSWER = regex.compile(rf"<perception>\n{_lines(PERCEPTION)}</perception>\n<prediction>\n{_lines(PREDICTION)}</prediction>\n"
                       rf"<planning>\n{_lines(PLANNING)}\[trajectory\] \[{_POSE}(?:, {_POSE}){{7}}\]\n</planning>")


def allowed_bytes(g: AnswerGrammar, prefix: str) -> set[int]:
    s = g.accepts(prefix)
    assert s is not None, prefix
    return {b for b in range(256) if g.step(s, b) is not None}


def chars(text: str) -> set[int]:
    return set(text.encode())


DIGITS = chars(string.digits)


def test_next_bytes_by_hand():
    g = AnswerGrammar(TAX)
    assert allowed_bytes(g, "") == chars("<")
    assert allowed_bytes(g, "<perception>\n") == chars("[<")  # a fine line or the close (perception has no trajectory)
    assert allowed_bytes(g, "<perception>\n[") == chars("vtbos")  # first letters of perception's fine skills
    assert allowed_bytes(g, "<perception>\n[traffic_") == chars("slc")
    assert allowed_bytes(g, "<perception>\n[vehicles") == chars("]")
    assert allowed_bytes(g, "<perception>\n[vehicles]") == chars(" ")
    assert allowed_bytes(g, "<perception>\n[vehicles] ") == PRINTABLE - chars("< ")  # text: one byte at least, not a space first
    assert allowed_bytes(g, "<perception>\n[vehicles] A") == (PRINTABLE - chars("<")) | chars("\n")
    assert allowed_bytes(g, "<perception>\n[vehicles] A" + "b" * 239) == chars("\n")  # the 240-byte line cap
    assert allowed_bytes(g, "<perception>\n</perception>") == chars("\n")
    pre = "<perception>\n</perception>\n<prediction>\n</prediction>\n<planning>\n"
    assert allowed_bytes(g, pre) == chars("[")  # no close before the trajectory
    assert allowed_bytes(g, pre + "[") == chars("lrt")  # longitudinal/lateral, rule_compliance, trajectory
    assert allowed_bytes(g, pre + "[l") == chars("oa")
    t = pre + "[trajectory] [("
    assert allowed_bytes(g, t) == DIGITS | chars("-")
    assert allowed_bytes(g, t + "-") == DIGITS
    assert allowed_bytes(g, t + "0") == chars(".,")  # no digit after a leading zero
    assert allowed_bytes(g, t + "12") == DIGITS | chars(".,")
    assert allowed_bytes(g, t + "123") == chars(".,")  # three integer digits at most
    assert allowed_bytes(g, t + "1.") == DIGITS
    assert allowed_bytes(g, t + "1.25") == chars(",")  # two decimals at most
    assert allowed_bytes(g, t + "1.2, ") == DIGITS | chars("-")
    assert allowed_bytes(g, t + "1.2, 3") == DIGITS | chars(".)")
    assert allowed_bytes(g, t + "1.2, 3)") == chars(",")  # a pose is followed by ", (" until the eighth
    seven = ", ".join(["(1, 1)"] * 7)
    assert allowed_bytes(g, pre + f"[trajectory] [{seven}, (1, 1)") == chars("]")
    assert allowed_bytes(g, pre + f"[trajectory] [{seven}, (1, 1)]\n</planning>") == set()  # complete: only the end token
    assert g.accepts(pre + f"[trajectory] [{seven}, (1, 1), (") is None  # a ninth pose is refused


def test_shortest_answer_by_hand():
    g = AnswerGrammar(TAX)
    shortest = ("<perception>\n</perception>\n<prediction>\n</prediction>\n<planning>\n[trajectory] ["
                + ", ".join(["(0, 0)"] * 8) + "]\n</planning>")
    assert g.completion(g.start()).decode() == shortest and g.min_answer_bytes() == len(shortest) == 154
    assert parse_answer(shortest, TAX).ok


def test_real_targets_are_in_the_grammar():
    g = AnswerGrammar(TAX)
    for kw in (dict(lane_change=True, qa=False), dict(qa=True), dict(lead_brakes=False)):
        text, _ = render_target(hierarchical_segments(driving_row(**kw), TAX), TAX)
        assert g.accepts(text) == ("end",) and ANSWER.fullmatch(text)


# ----------------------------------------------------------------------------------------------
# a tiny random-init MoSE and a byte-level tokenizer trained on answers


def _target(k: int) -> str:
    return render_target([Segment("vehicles", f"A white van is parked {k} m ahead in the right lane."), Segment("agent_intent", "The van stays."),
                          Segment("lateral_control", "Keep the lane."),
                          Segment("trajectory", format_trajectory([(4.01 * j, -0.01 * j * k) for j in range(1, 9)]))], TAX)[0]


@pytest.fixture(scope="module")
def tiny():
    from mose.config import MoSEConfig
    from mose.modeling import MoSEForConditionalGeneration
    from mose.presets import base_config
    from mose.skill_tokenizer import train_chat_tokenizer

    base = base_config("tiny")
    t = base.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads = 32, 64, 2, 2, 1
    t.layer_types = t.layer_types[:2]
    torch.manual_seed(0)
    model = MoSEForConditionalGeneration(MoSEConfig(base_config=base, num_experts=4, top_k=2, moe_layers="every_other")).eval()
    tok = train_chat_tokenizer([_target(k) for k in range(5)] + ["You are driving the ego car. Plan step by step."] * 3, 2048)
    tok.padding_side = "left"
    return model, tok


def _generate(model, tok, prompts, max_new_tokens, processor=None):
    enc = tok([f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in prompts], return_tensors="pt", padding=True,
              add_special_tokens=False)
    kw = {"logits_processor": [processor]} if processor is not None else {}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2, **kw)
    return out[:, enc["input_ids"].shape[1]:]


def test_token_masks_match_the_grammar_regex(tiny):
    _, tok = tiny
    c = AnswerConstraint(tok, TAX)
    vocab = c.vocab
    assert vocab[tok.eos_token_id] is None and vocab[tok.convert_tokens_to_ids("<image>")] is None  # specials never inside text
    target = _target(3)
    cuts = [0, 5, len("<perception>\n[veh"), target.index("parked") + 2, target.index("</perception>"), target.index("[trajectory]"),
            target.index("(8.02") + 3, target.index("(32.08") + 5]
    prefixes = [target[:c] for c in cuts] + ["<perception>\n[vehicles] " + "ahead " * 39]  # 234 of the 240 text bytes
    sizes = []
    for prefix in prefixes:
        want = {i for i, b in enumerate(vocab) if b and b.isascii() and ANSWER.fullmatch(prefix + b.decode(), partial=True)}
        state = c.grammar.accepts(prefix)
        allowed = c.allowed(state, 10**6).tolist()
        got = {i for i in allowed if vocab[i].isascii()}
        assert got == want, prefix
        for i in allowed:  # the state a token leads to is the state of the longer prefix
            assert c.advance(state, i) == c.grammar.accepts(prefix.encode() + vocab[i])
        sizes.append(len(want))
    text_state = c.grammar.accepts(target[:cuts[3]])
    assert max(sizes) > 100 and any(len(vocab[i]) > 1 for i in c.allowed(text_state, 10**6).tolist())
    assert c.allowed(c.grammar.accepts(target), 10**6).tolist() == [tok.eos_token_id]
    assert c.allowed(text_state, 0).tolist() == []  # no budget left after this token: nothing but a complete answer fits


@pytest.mark.parametrize("budget", [154, 170, 260])
def test_untrained_model_always_parses(tiny, budget):
    model, tok = tiny
    c = AnswerConstraint(tok, TAX)
    prompts = ["Describe the scene.", "You are driving the ego car. Plan step by step.", "Keep the lane?", "Stop at the light."]
    for batch in (prompts[:2], prompts[2:]):
        out = _generate(model, tok, batch, budget, c.logits_processor(budget))
        assert out.shape[1] <= budget
        for row in out:
            answer = tok.decode(row, skip_special_tokens=True).strip()
            parsed = parse_answer(answer, TAX)
            assert parsed.ok and parsed.trajectory_complete, (answer, parsed.errors)


def test_budget_below_the_shortest_answer_is_refused(tiny):
    _, tok = tiny
    with pytest.raises(AnswerGrammarError, match="below the shortest complete answer"):
        AnswerConstraint(tok, TAX).logits_processor(153)


def test_unconstrained_generation_is_plain_generate(tiny, tmp_path):
    from PIL import Image

    from eval.coda_generate import Generator
    from mose.skill_tokenizer import llava_processor_for

    model, tok = tiny
    proc = llava_processor_for(model.config, tok)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    Image.new("RGB", (32, 32), (100, 100, 100)).save(tmp_path / "x.png")
    q = [{"question": "Plan step by step.", "image": str(tmp_path / "x.png")}]
    plain = Generator(str(tmp_path / "m"), batch_size=1, max_new_tokens=12, device="cpu", dtype="float32").load()
    inputs = plain.processor_(images=[Image.open(tmp_path / "x.png").convert("RGB")], text=[plain._prompt(q[0]["question"])], return_tensors="pt")
    with torch.inference_mode():
        ref = plain.model_.generate(**inputs, max_new_tokens=12, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert plain.answer(q) == [plain.processor_.batch_decode(ref, skip_special_tokens=True)[0].strip()]
    constrained = Generator(str(tmp_path / "m"), batch_size=1, max_new_tokens=160, device="cpu", dtype="float32", constrained=True).load()
    parsed = parse_answer(constrained.answer(q)[0], TAX)
    assert parsed.ok and parsed.trajectory_complete


def test_budget_from_data_covers_the_longest_target(tmp_path):
    from mose.skill_data import encode_item
    from tests.skill_fixtures import llava_processor

    proc = llava_processor()
    items = []
    for k, kw in enumerate((dict(lane_change=True, qa=False), dict(qa=True), dict(lead_brakes=False))):
        text, spans = render_target(hierarchical_segments(driving_row(f"s{k}", **kw), TAX), TAX)
        items.append({"item_id": f"i{k}", "prompt": "Plan step by step.", "target": text, "images": [],
                      "spans": [{"start": s.start, "end": s.end, "skill": s.skill} for s in spans]})
    trained = max(sum(lab != -100 for lab in encode_item(it, proc, TAX)["labels"]) for it in items)  # tokens the model learns
    longest = longest_target_tokens([it["target"] for it in items], proc.tokenizer)
    assert longest >= trained
    assert answer_budget(longest) >= longest + 32
    with pytest.warns(UserWarning, match="below the longest planning target"):
        assert answer_budget(longest, cap=longest - 1) == longest - 1
    assert answer_budget(longest, cap=10 * longest) == answer_budget(longest)  # a generous cap changes nothing
