"""Router pretraining: routing accuracy against a hand count, a short run that raises it, trainable sets, heatmap."""
import numpy as np
import pytest
import torch

from benchmarks.router_pretrain_loop import pretrain_router, trainable_parameters
from mose.config import MoSEConfig
from mose.modeling import MoSEForConditionalGeneration
from mose.routing_eval import evaluate_routing, usage_heatmap
from mose.skill_data import IGNORE, SkillCollator, build_skill_dataset
from mose.skill_format import Segment, render_target
from mose.skills import Taxonomy
from tests.skill_fixtures import llava_processor, write_image

TAX = Taxonomy.load()
PHRASES = {
    "vehicles": ["a white car ahead", "a truck on the left", "a bus in the ego lane"],
    "traffic_cones": ["three cones on the right", "a cone ahead"],
    "agent_intent": ["the car will slow down", "the truck will change lanes"],
    "interaction_risk": ["high risk ahead", "low risk"],
    "longitudinal_control": ["slow down", "keep the speed"],
    "lateral_control": ["keep the lane", "change to the left lane"],
}


def toy_items(n, image, seed):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        segs = [Segment(s, str(rng.choice(p))) for s, p in PHRASES.items() if rng.uniform() < 0.8]
        target, spans = render_target(segs, TAX)
        items.append({"item_id": f"toy{seed}-{i}", "prompt": "Think step by step.", "target": target, "images": [image], "box": [],
                      "spans": [{"start": s.start, "end": s.end, "skill": s.skill} for s in spans]})
    return items


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    proc = llava_processor()
    img = write_image(tmp_path_factory.mktemp("img") / "a.png", size=(32, 32))
    train, _ = build_skill_dataset(toy_items(16, img, 0), proc, TAX)
    test, _ = build_skill_dataset(toy_items(6, img, 1), proc, TAX)
    return proc, train, test


def tiny_model(proc, seed=0, top_k=1):
    from transformers import LlavaConfig

    base = LlavaConfig(
        text_config={"model_type": "qwen2", "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": len(proc.tokenizer), "max_position_embeddings": 512},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        image_token_index=proc.image_token_id, vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=16)
    torch.manual_seed(seed)
    return MoSEForConditionalGeneration(MoSEConfig(base_config=base, top_k=top_k, moe_layers="all", **TAX.config_kwargs(6)))


def test_accuracy_matches_a_hand_count(setup):
    proc, _, test = setup
    model = tiny_model(proc, top_k=2).eval()
    with torch.no_grad():  # router weights big enough that routing is far from ties (at the default init logit gaps go down to ~1e-6)
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0, 0.5)
    m = evaluate_routing(model, test, SkillCollator(proc), TAX, batch_size=3)
    groups = model.config.skill_groups
    hits_c = hits_f = n_c = n_f = 0
    usage = np.zeros((len(TAX), 6))
    with torch.no_grad():
        # the same batches of 3 as evaluate_routing, so both count the very same routing decisions (a padded batch and
        # a single item differ by float rounding, enough to flip a near-tie); the count itself is by hand, token by token
        for start in range(0, len(test), 3):
            b = SkillCollator(proc)([test[i] for i in range(start, min(start + 3, len(test)))])
            skills = b.pop("skill_labels").tolist()
            trace = model(**b, output_routing_trace=True).routing_trace
            experts, weights = trace.experts.numpy(), trace.weights.numpy()  # (L, B, T, k)
            assert (weights[..., 0] >= weights[..., 1]).all()  # [..., 0] is the top-1 choice
            for layer in range(experts.shape[0]):
                for row, labels in enumerate(skills):
                    for t, s in enumerate(labels):
                        if s == IGNORE:
                            continue
                        name = TAX.names[s]
                        top1 = int(experts[layer, row, t, 0])
                        hits_c += top1 in groups[TAX.root_of(name)]
                        n_c += 1
                        if TAX.parent(name):
                            hits_f += top1 in groups[name]
                            n_f += 1
                        for e in experts[layer, row, t]:
                            usage[s, e] += 1
    assert (m.coarse_tokens, m.fine_tokens) == (n_c, n_f) and n_c > n_f > 0
    assert m.coarse_accuracy == pytest.approx(hits_c / n_c) and m.fine_accuracy == pytest.approx(hits_f / n_f)
    rows = usage.sum(1, keepdims=True)
    np.testing.assert_allclose(m.usage, np.divide(usage, rows, out=np.zeros_like(usage), where=rows > 0), atol=1e-12)
    assert m.expert_load.sum() == pytest.approx(1.0) and 1.0 <= m.balance <= 6.0 and np.isfinite(m.lm_loss)


def test_short_pretraining_raises_routing_accuracy(setup, tmp_path):
    proc, train, test = setup
    collate = SkillCollator(proc)
    model = tiny_model(proc)
    before = evaluate_routing(model, test, collate, TAX)
    assert before.coarse_accuracy < 0.6  # random routers: about group size / E (3/8 on average)
    # attention must learn to carry the step's context to every token, so the whole model trains
    history = pretrain_router(model, train, collate, steps=30, lr=5e-3, batch_size=4, trainable="all", skill_loss_coef=1.0,
                              progress=False, log_every=10)
    after = evaluate_routing(model, test, collate, TAX)
    assert after.coarse_accuracy >= 0.9 and after.coarse_accuracy > before.coarse_accuracy + 0.3
    assert after.fine_accuracy > before.fine_accuracy + 0.3
    assert history[-1]["skill_loss"] < history[0]["skill_loss"] and len(history) == 3
    png = usage_heatmap(after, TAX, model.config.skill_groups, tmp_path / "usage.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    assert model.config.skill_loss_coef == pytest.approx(0.1)  # the override was restored


def test_trainable_sets_and_skill_map_check(setup):
    proc, train, _ = setup
    model = tiny_model(proc)
    params = trainable_parameters(model, "router")
    routers = {id(b.router.weight) for b in model.moe_blocks()}
    assert {id(p) for p in params} == routers
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    pretrain_router(model, train, SkillCollator(proc), steps=2, batch_size=4, trainable="router", progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with pytest.raises(ValueError, match="trainable must be one of"):
        trainable_parameters(model, "everything")
    other = Taxonomy.from_dict({"skills": {"a": {}, "b": {}, "a1": {"parent": "a"}}})
    with pytest.raises(ValueError, match="not the taxonomy's"):
        evaluate_routing(model, train, SkillCollator(proc), other)


def test_token_identity_router_by_hand():
    from mose.routing_eval import token_identity_router

    # skills A (experts 0, 1) and B (experts 2, 3); training: id 5 is A three times and B once, id 7 is B twice
    groups = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    route = token_identity_router([5, 5, 5, 5, 7, 7], [0, 0, 0, 1, 1, 1], groups, vocab_size=10)
    assert route[5] == 0  # experts 0 and 1 serve 3 of id 5's tokens, 2 and 3 serve 1: the lowest of the best, 0
    assert route[7] == 2  # both tokens are B: experts 2 and 3 tie at 2, the lowest is 2
    # an unseen id: over all training tokens experts 0, 1 serve 3 and 2, 3 serve 3: all tie -> expert 0
    assert route[9] == 0 and route[0] == 0


def test_token_identity_accuracy_in_routing_terms():
    from mose.routing_eval import token_identity_accuracy

    groups = TAX.config_kwargs(4)["skill_groups"]  # perception 0,1 (vehicles 0, traffic_cones 1), prediction 2, planning 3
    sid = TAX.id
    # training: token 11 always labels vehicles (perception), token 12 trajectory (planning), token 13 traffic_cones
    train = ([11, 11, 12, 12, 13], [sid("vehicles"), sid("vehicles"), sid("trajectory"), sid("trajectory"), sid("traffic_cones")])
    # held out: 11 as vehicles (hit, hit), 11 as trajectory (coarse miss: expert 0 is not planning's; fine miss),
    # 12 as agent_intent (expert 3 is not prediction's 2: misses), 13 as barriers (coarse: token 13's expert is 0,
    # the lowest of perception's tied 0 and 1: hit; fine: traffic_cones' expert 1, and barriers' group is [1]: hit)
    heldout = ([11, 11, 12, 13], [sid("vehicles"), sid("trajectory"), sid("agent_intent"), sid("barriers")])
    acc = token_identity_accuracy(train, heldout, TAX, groups, num_experts=4, vocab_size=20)
    assert acc["coarse_tokens"] == acc["fine_tokens"] == 4
    assert acc["coarse_accuracy"] == pytest.approx(2 / 4)  # tokens 1 and 4
    assert acc["fine_accuracy"] == pytest.approx(2 / 4)  # vehicles -> expert 0 (hit), barriers -> expert 1 (hit)
