"""Per-token skill labels, prompt masking, collators for LLaVA- and Qwen2-VL-style processors, the sampler."""
import numpy as np
import pytest
import torch

from datasets_cfg.schema import ScenePool
from datasets_cfg.skill_items import pool_items
from mose.skill_data import (IGNORE, AlignmentError, SkillCollator, SkillDataError, build_skill_dataset, encode_item,
                             expand_over_images)
from mose.skill_sampler import SkillBalancedSampler, item_skill_matrix
from mose.skills import Taxonomy
from tests.skill_fixtures import driving_row, llava_processor, qwen2vl_processor, train_tokenizer, write_image

TAX = Taxonomy.load()


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rows = [driving_row(f"s{i}", image=write_image(d / f"s{i}.png", size=(40 + 12 * i, 36 + 8 * i), seed=i), lane_change=i % 2 == 1)
            for i in range(3)]
    ds, rep = pool_items(ScenePool.from_rows(rows), TAX)
    assert not rep.skips
    return ds


@pytest.fixture(scope="module")
def llava():
    return llava_processor()


@pytest.fixture(scope="module")
def qwen():
    return qwen2vl_processor()


def runs(skill_labels):
    """Maximal runs of equal skill label: [(label, first token, end token)]."""
    out = []
    for i, s in enumerate(skill_labels):
        if out and out[-1][0] == s and out[-1][2] == i:
            out[-1][2] = i + 1
        else:
            out.append([s, i, i + 1])
    return out


def merged_spans(item):
    """The item's spans with neighbours of the same skill merged: what a run of equal token labels covers."""
    out = []
    for sp in item["spans"]:
        if out and out[-1][2] == sp["skill"] and out[-1][1] == sp["start"]:
            out[-1][1] = sp["end"]
        else:
            out.append([sp["start"], sp["end"], sp["skill"]])
    return out


@pytest.mark.parametrize("kind", ["hierarchical", "single"])
def test_token_skill_labels_decode_to_their_segments(items, llava, kind):
    tok = llava.tokenizer
    for item in [it for it in items if it["kind"] == kind]:
        enc = encode_item(item, llava, TAX)
        labelled = [r for r in runs(enc["skill_labels"]) if r[0] != IGNORE]
        expected = merged_spans(item)
        assert len(labelled) == len(expected), item["item_id"]
        for (skill_id, a, b), (s, e, name) in zip(labelled, expected):
            assert TAX.names[skill_id] == name
            # the tokens of the run decode to the characters of the span (a space between sentences travels
            # with the next word's token, so compare without the edge whitespace)
            assert tok.decode(enc["input_ids"][a:b]).strip() == item["target"][s:e].strip()
        # and together the runs are the whole answer, character for character
        assert "".join(tok.decode(enc["input_ids"][a:b]) for _, a, b in labelled) == item["target"]


def test_prompt_masking_and_labels(items, llava):
    tok = llava.tokenizer
    item = items[0]
    enc = encode_item(item, llava, TAX)
    ids, labels, skills = enc["input_ids"], enc["labels"], enc["skill_labels"]
    first = next(i for i, l in enumerate(labels) if l != IGNORE)
    # everything before the answer is the prompt (its text ends with the assistant header) and is masked
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n") and item["prompt"] in tok.decode(ids[:first])
    assert all(s == IGNORE for s in skills[:first])
    # labelled tokens are exactly the answer and the end-of-turn token; labels equal the ids there
    lab_pos = [i for i, l in enumerate(labels) if l != IGNORE]
    assert tok.decode([ids[i] for i in lab_pos]) == item["target"] + "<|im_end|>"
    assert all(labels[i] == ids[i] for i in lab_pos)
    assert skills[lab_pos[-1]] == IGNORE and tok.decode(ids[lab_pos[-1] + 1:]) == "\n"  # the trailing newline is not learnt
    counts = np.bincount([s for s in skills if s != IGNORE], minlength=len(TAX))
    assert enc["skill_counts"] == counts.tolist()
    assert enc["length"] == len(ids) + 16 - 1  # one <image> placeholder -> (32 / 8)^2 = 16 tokens


def test_bad_items_are_counted_or_raise(items, llava, tmp_path):
    bad = [dict(items[1], item_id="unknown", spans=[{"start": 0, "end": 3, "skill": "teleporting"}]),
           dict(items[1], item_id="outside", spans=[{"start": 0, "end": 10_000, "skill": "vehicles"}]),
           dict(items[1], item_id="noimage", images=[str(tmp_path / "missing.png")]),
           dict(items[0], item_id="long")]
    ds, rep = build_skill_dataset([items[1], *bad], llava, TAX, max_length=200)
    assert len(ds) == 1 and ds[0]["item_id"] == items[1]["item_id"]
    assert rep.skipped == {"unknown skill": 1, "span outside target": 1, "missing image": 1, "too long": 1}
    assert "item long:" in rep.skipped_examples["too long"][0] and "> max_length 200" in rep.skipped_examples["too long"][0]
    with pytest.raises(SkillDataError, match="item unknown: unknown skill 'teleporting'"):
        build_skill_dataset(bad[:1], llava, TAX, strict=True)
    with pytest.raises(SkillDataError, match="no image processor"):
        encode_item(items[0], train_tokenizer("llava"), TAX)


def check_batch(batch, feats, img_id, tokens_per_image):
    B = len(feats)
    ids, labels, skills, mask = batch["input_ids"], batch["labels"], batch["skill_labels"], batch["attention_mask"]
    assert labels.shape == skills.shape == ids.shape and ids.shape[0] == B
    for b, f in enumerate(feats):
        real = mask[b].bool()
        is_img = (ids[b] == img_id) & real
        assert int(is_img.sum()) == tokens_per_image[b]
        assert (labels[b][is_img] == IGNORE).all() and (skills[b][is_img] == IGNORE).all()
        assert (labels[b][~real] == IGNORE).all() and (skills[b][~real] == IGNORE).all()
        keep = real & ~is_img
        # outside the image run the sequence is the pre-tokenised one, with its labels unchanged
        pre = torch.tensor(f["input_ids"])
        pre_keep = pre != img_id
        assert torch.equal(ids[b][keep], pre[pre_keep])
        assert torch.equal(labels[b][keep], torch.tensor(f["labels"])[pre_keep])
        assert torch.equal(skills[b][keep], torch.tensor(f["skill_labels"])[pre_keep])
        assert int(real.sum()) == f["length"]
        lab = labels[b] != IGNORE
        assert torch.equal(labels[b][lab], ids[b][lab])


def test_llava_collator(items, llava):
    ds, _ = build_skill_dataset(items, llava, TAX)
    feats = [ds[i] for i in range(4)]
    batch = SkillCollator(llava)(feats)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    check_batch(batch, feats, llava.image_token_id, [16] * 4)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_qwen2vl_collator_with_image_sizes(items, qwen, padding_side):
    qwen.tokenizer.padding_side = padding_side
    ds, _ = build_skill_dataset(items, qwen, TAX)
    hier = [ds[i] for i in range(len(ds)) if ds[i]["kind"] == "hierarchical"]
    feats = hier + [ds[1]]
    batch = SkillCollator(qwen)(feats)
    grid = batch["image_grid_thw"]
    per_image = (grid.prod(-1) // 4).tolist()  # merge_size 2 -> 4 patches per token
    assert len(set(per_image)) > 1  # the images differ in size, so do their token counts
    check_batch(batch, feats, qwen.image_token_id, per_image)
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    qwen.tokenizer.padding_side = "right"


def test_alignment_is_checked():
    ids, labels, skills = [5, 9, 9, 6], [IGNORE, IGNORE, IGNORE, 6], [IGNORE, IGNORE, IGNORE, 3]
    assert expand_over_images(ids, labels, skills, [5, 9, 9, 9, 9, 6], 9) == ([IGNORE] * 5 + [6], [IGNORE] * 5 + [3])
    with pytest.raises(AlignmentError, match="token 3 is 7"):
        expand_over_images(ids, labels, skills, [5, 9, 9, 7], 9)
    with pytest.raises(AlignmentError, match="became 1"):
        expand_over_images(ids, labels, skills, [5, 9, 6], 9)
    with pytest.raises(AlignmentError, match="extra"):
        expand_over_images(ids, labels, skills, [5, 9, 9, 6, 6], 9)


def test_region_box_is_drawn(items, llava):
    region = next(it for it in items if it["task"] == "region")
    im = np.asarray(SkillCollator(llava).load_image(region["images"][0], region["box"]))
    x, y, w, h = (int(v) for v in region["box"])
    assert (im[y, x:x + w] == [255, 0, 0]).all() and (im[y:y + h, x] == [255, 0, 0]).all()
    plain = np.asarray(SkillCollator(llava, draw_boxes=False).load_image(region["images"][0], region["box"]))
    assert not (plain[y, x:x + w] == [255, 0, 0]).all()


def test_map_cache_and_num_proc(items, llava, tmp_path):
    a, _ = build_skill_dataset(items, llava, TAX, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.glob("skill-tokens-*.arrow"))
    assert len(files) == 1 and a.cache_files and a.cache_files[0]["filename"].endswith(files[0])
    b, _ = build_skill_dataset(items, llava, TAX, cache_dir=tmp_path)  # read back
    assert b.cache_files[0]["filename"] == a.cache_files[0]["filename"] and b["input_ids"] == a["input_ids"]
    c, _ = build_skill_dataset(items, llava, TAX, num_proc=2)
    assert c["skill_labels"] == a["skill_labels"]


def test_sampler_hits_target_distribution():
    rng = np.random.default_rng(0)
    n = 300
    counts = np.zeros((n, len(TAX)), int)
    # skewed pool: 80 % perception-only items, 15 % mostly prediction, 5 % mostly planning
    for i in range(n):
        counts[i, TAX.id("vehicles")] = rng.integers(20, 60) if i % 20 < 16 else rng.integers(0, 10)
        if 16 <= i % 20 < 19:
            counts[i, TAX.id("agent_intent")] = rng.integers(20, 60)
        if i % 20 == 19:
            counts[i, TAX.id("trajectory")] = rng.integers(20, 60)
    P, names = item_skill_matrix(counts, TAX, "coarse")
    P = P / P.sum(1, keepdims=True)
    before = P.mean(0)
    assert before[0] > 0.8  # unbalanced: perception dominates
    target = {"perception": 0.4, "prediction": 0.3, "planning": 0.3}
    s = SkillBalancedSampler(counts.tolist(), TAX, target, level="coarse", num_samples=20_000, random_state=3)
    assert s.kl_ < 1e-6 and all(abs(s.expected_[k] - v) < 1e-3 for k, v in target.items())
    drawn = np.fromiter(iter(s), int)
    achieved = P[drawn].mean(0)
    np.testing.assert_allclose(achieved, [0.4, 0.3, 0.3], atol=0.02)
    assert (s.weights_ > 0).all()  # every item stays reachable
    assert np.array_equal(drawn, np.fromiter(iter(SkillBalancedSampler(counts.tolist(), TAX, target, num_samples=20_000, random_state=3)), int))
    # fine level, uniform over the leaves present
    f = SkillBalancedSampler(counts.tolist(), TAX, level="fine", num_samples=20_000, random_state=1)
    Pf, fnames = item_skill_matrix(counts, TAX, "fine")
    got = (Pf / Pf.sum(1, keepdims=True))[np.fromiter(iter(f), int)].mean(0)
    for k in ("vehicles", "agent_intent", "trajectory"):
        assert abs(got[fnames.index(k)] - 1 / 3) < 0.03
    with pytest.raises(ValueError, match="no item has tokens"):
        SkillBalancedSampler(counts.tolist(), TAX, {"barriers": 1.0}, level="fine")
    with pytest.raises(ValueError, match="not coarse skills"):
        SkillBalancedSampler(counts.tolist(), TAX, {"vehicles": 1.0}, level="coarse")


def test_sampler_on_a_built_dataset(items, llava):
    ds, rep = build_skill_dataset(items, llava, TAX)
    P, _ = item_skill_matrix(ds["skill_counts"], TAX, "coarse")
    P = P / P.sum(1, keepdims=True)
    # prediction tokens only occur inside hierarchical items, so a uniform target is out of reach here: the
    # sampler gets as close as the items allow (KL) and its draws follow the expectation it reports
    s = SkillBalancedSampler(ds, TAX, {"perception": 1, "prediction": 1, "planning": 1}, num_samples=5000, random_state=0)
    got = P[np.fromiter(iter(s), int)].mean(0)
    np.testing.assert_allclose(got, [s.expected_[k] for k in s.skills_], atol=0.02)
    t = np.full(3, 1 / 3)
    kl = lambda a: float(np.sum(t * np.log(t / a)))  # noqa: E731
    assert s.kl_ == pytest.approx(kl(np.array([s.expected_[k] for k in s.skills_])), rel=1e-6)
    assert s.kl_ < kl(P.mean(0)) - 0.01  # closer than drawing items uniformly
    assert sum(rep.tokens_per_skill.values()) == int(np.sum(ds["skill_counts"]))


def test_tiny_preset_tokenizer_processor_and_forward(items):
    """The locally trained tokenizer lines up with the tiny preset's ids, and a collated batch trains it."""
    from mose.presets import build_preset, preset_config
    from mose.skill_tokenizer import llava_processor_for, train_chat_tokenizer

    cfg = preset_config("tiny", **TAX.config_kwargs(4))
    text = cfg.get_text_config(decoder=True)
    tok = train_chat_tokenizer(items["target"], text.vocab_size, image_token_id=cfg.base_config.image_token_id)
    assert len(tok) == text.vocab_size and tok.convert_tokens_to_ids("<image>") == cfg.base_config.image_token_id
    assert (tok.pad_token_id, tok.eos_token_id) == (text.pad_token_id, text.eos_token_id)
    proc = llava_processor_for(cfg, tok)
    ds, rep = build_skill_dataset(items, proc, TAX)
    assert not rep.skipped
    batch = SkillCollator(proc)([ds[i] for i in range(3)])
    assert int((batch["input_ids"][0] == cfg.base_config.image_token_id).sum()) == cfg.base_config.image_seq_length
    model = build_preset("tiny", **TAX.config_kwargs(4))
    skills = batch.pop("skill_labels")
    out = model(**batch, skill_labels=skills)
    assert torch.isfinite(out.loss) and out.router_stats["skill_loss"].shape == (len(cfg.moe_layer_indices),)
    with pytest.raises(ValueError, match="expects image_token_id"):
        llava_processor_for(cfg, train_tokenizer("llava"))
