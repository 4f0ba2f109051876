"""Questions for the three tasks: own and official prompts, drawn and text boxes, ScenePool (simulator-style) input,
and bad scenes (missing images, boxes outside the image, duplicate question ids)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from datasets_cfg.schema import ScenePool, new_row
from datasets_cfg.sources.coda_lm import CodaFormatError, read_split
from eval.coda_prompts import PromptError, load_official_prompts, own_prompts
from eval.coda_questions import QuestionBuilder
from tests.coda_lm_fixtures import coda_tree, make_image, official_checkout, sim_pool
from tests.coda_lm_fixtures import pool_qa as _qa


@pytest.fixture()
def root(tmp_path):
    return coda_tree(tmp_path / "coda")


def _mini(root):
    return read_split(root / "CODA-LM/Mini", root, "Mini", progress=False)


def test_questions_from_coda_split(root, tmp_path):
    qs = QuestionBuilder(own_prompts(), tmp_path / "out").build(_mini(root))
    by_id = {q["question_id"]: q for q in qs}
    assert [q["task"] for q in qs].count("general") == 2 and [q["task"] for q in qs].count("region") == 5
    assert [q["task"] for q in qs].count("suggestion") == 2 and len(by_id) == 9
    g = by_id["test_0001:general"]
    assert g["reference"].startswith("Summary one") and g["image"] == str(root / "test/images/0001.jpg")
    assert "seven categories" in g["question"]
    # vehicles, vulnerable_road_users, traffic lights, other objects (general) + traffic_cone, dog (regions)
    assert g["annotated_classes"] == sorted(["vehicle", "vru", "traffic_light", "miscellaneous", "traffic_cone"])
    r = by_id["test_0002:region:3"]
    assert (r["category"], r["class"], r["box"], r["reference"]) == ("truck", "vehicle", [30.0, 20.0, 10.0, 10.0], "A truck parked; pass wide.")
    assert by_id["test_0002:suggestion"]["reference"].startswith("Slow down two")


def test_region_box_drawn_red_width_2_on_a_copy(root, tmp_path):
    qs = QuestionBuilder(own_prompts(), tmp_path / "out").build(_mini(root))
    q = next(q for q in qs if q["question_id"] == "test_0001:region:1")  # box [10, 5, 20, 30] -> x 10..30, y 5..35
    assert q["image"].startswith(str(tmp_path / "out/region_images/")) and "red rectangle" in q["question"]
    px = np.asarray(Image.open(q["image"]).convert("RGB")).astype(int)
    red = lambda p: p[0] > p[2] + 30 and p[0] > p[1] + 50  # noqa: E731  (JPEG blurs edges; the background is blue)
    for x, y in [(10, 20), (11, 20), (29, 20), (30, 20), (20, 5), (20, 6), (20, 34), (20, 35)]:  # PIL draws width 2 inwards
        assert red(px[y, x]), (x, y, px[y, x])
    for x, y in [(9, 20), (12, 20), (28, 20), (31, 20), (20, 4), (20, 7), (20, 33), (20, 36)]:  # exactly 2 px wide
        assert not red(px[y, x]), (x, y, px[y, x])
    for x, y in [(15, 20), (20, 20), (25, 20), (4, 20), (40, 20), (20, 1), (20, 42)]:  # inside and outside: unchanged
        assert abs(px[y, x] - [40, 120, 200]).max() < 30, (x, y, px[y, x])
    orig = np.asarray(Image.open(root / "test/images/0001.jpg").convert("RGB")).astype(int)
    assert abs(orig[20, 10] - [40, 120, 200]).max() < 20  # the source image is untouched


def test_region_box_as_normalised_text(root, tmp_path):
    qs = QuestionBuilder(own_prompts(), tmp_path / "out", box_encoding="text").build(_mini(root))
    q = next(q for q in qs if q["question_id"] == "test_0001:region:1")
    # [10, 5, 20, 30] in a 64x48 image -> <10/64, 5/48, 30/64, 35/48>
    assert "<0.156, 0.104, 0.469, 0.729>" in q["question"] and q["image"] == str(root / "test/images/0001.jpg")
    assert not (tmp_path / "out/region_images").exists()


def test_official_prompts_from_a_checkout(root, tmp_path):
    ck = official_checkout(tmp_path / "CODA-LM-repo")
    p = load_official_prompts(ck)
    assert p.source == "official" and p.describe()["origin"] == str(ck.resolve())
    assert not any(ck.rglob("EXECUTED"))  # parsed, never run
    qs = {q["question_id"]: q for q in QuestionBuilder(p, tmp_path / "out").build(_mini(root))}
    assert qs["test_0001:general"]["question"] == "FAKE official general question."
    assert qs["test_0001:suggestion"]["question"] == "FAKE official suggestion question."
    assert qs["test_0001:region:1"]["question"] == "FAKE official region question: the red rectangle."
    text = {q["question_id"]: q for q in QuestionBuilder(p, tmp_path / "o2", box_encoding="text").build(_mini(root))}
    assert text["test_0001:region:1"]["question"] == "FAKE describe this object <0.156, 0.104, 0.469, 0.729> please."

    m = p.messages("general", "REF", "PRED")
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert m[0]["content"].startswith("FAKE official judge for stage 1") and m[2]["content"] == "scene high reasoning. Rating: [[8]]"
    assert m[4]["content"] == "scene low reasoning. Rating: [[2]]"
    assert m[5]["content"] == ("[The Start of Reference Text]\nREF\n[The End of Reference Text]\n\n"
                               "[The Start of Prediction Text]\nPRED\n[The End of Prediction Text]")
    assert p.messages("suggestion", "R", "P")[1]["content"].startswith("[The Start of Reference Text]\nsugg high ref")
    assert len(p.messages("region", "R", "P")) == 2
    assert load_official_prompts(ck / "evaluation").describe()["sha256"] == p.describe()["sha256"]  # the evaluation/ folder works too


def test_texts_with_braces_are_not_reformatted():
    m = own_prompts().messages("region", "ref {prediction} {}", "pred {reference}")
    assert "ref {prediction} {}" in m[-1]["content"] and "pred {reference}" in m[-1]["content"]


def test_official_prompt_errors(tmp_path):
    ck = official_checkout(tmp_path / "ck", with_box_text=False)
    with pytest.raises(PromptError, match="no region question with a box placeholder"):
        load_official_prompts(ck).question("region", "<0, 0, 1, 1>")
    (ck / "evaluation/scene_few_shot/low.json").unlink()
    with pytest.raises(PromptError, match="low.json: missing; stage1_eval_batch.py names it"):
        load_official_prompts(ck)
    (ck / "evaluation/stage2_eval_batch.py").write_text("class X:\n    pass\n")
    with pytest.raises(PromptError, match=r"stage1_eval_batch.py|stage2_eval_batch.py: field 'self.system_prompt'"):
        load_official_prompts(ck)
    (ck / "convert2vqa.py").unlink()
    with pytest.raises(PromptError, match=r"convert2vqa.py: missing; expected the official CODA-LM file"):
        load_official_prompts(ck)
    with pytest.raises(PromptError, match="not a directory"):
        load_official_prompts(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# a ScenePool with CODA-style qa (as the simulator corpus produces)


def test_questions_from_a_simulator_pool(tmp_path):
    pool = ScenePool.load(sim_pool(tmp_path))
    qs = {q["question_id"]: q for q in QuestionBuilder(own_prompts(), tmp_path / "out").build([s.row for s in pool], pool.root)}
    assert set(qs) == {"s1:general", "s1:region:0", "s1:suggestion", "s2:general"}
    assert qs["s1:general"]["image"] == str(pool.root / "images/s1.png") and qs["s1:general"]["question"] == own_prompts().questions["general"]
    assert qs["s2:general"]["reference"] == "A truck merges. Cones close a lane."
    assert qs["s2:general"]["annotated_classes"] == ["traffic_cone", "vehicle"]
    assert qs["s1:region:0"]["class"] == "vehicle" and qs["s1:region:0"]["box"] == [10.0, 10.0, 20.0, 15.0]


def _row(sid, image, qa):
    return new_row(sid, "sim", "x", images=[{"frame": 0, "camera": "front", "path": str(image)}], qa=qa)


def test_bad_scenes_error_or_are_counted(tmp_path):
    img = make_image(tmp_path / "a.jpg")
    good = _row("ok", img, [_qa("ok:general", "general", "fine")])
    cases = {
        "missing image": (_row("m", tmp_path / "gone.jpg", [_qa("m:general", "general", "x")]), "field 'images\\[0\\].path': expected an existing image file"),
        "box outside image": (_row("b", img, [_qa("b:region:1", "region", "x", "car", (50, 40, 30, 30))]), "expected a box inside the 64x48 image"),
        "duplicate id": (_row("d", img, [_qa("ok:general", "general", "dup")]), "expected question ids unique across scenes"),
        "missing field": (_row("n", img, [_qa("n:region:1", "region", "x", "car")]), "expected \\[x, y, w, h\\] or a pre-drawn image"),
    }
    for kind, (bad, message) in cases.items():
        with pytest.raises(CodaFormatError, match=message):
            QuestionBuilder(own_prompts(), tmp_path / "out").build([good, bad])
        b = QuestionBuilder(own_prompts(), tmp_path / "out", skip_invalid=True)
        qs = b.build([good, bad])
        assert [q["question_id"] for q in qs] == ["ok:general"] and dict(b.skipped_) == {kind: 1}, kind


def test_llava_region_uses_the_predrawn_image(root, tmp_path):
    make_image(root / "test/images_w_boxes/0001_object_2.jpg", color=(1, 2, 3))
    recs = [{"id": "Test_regional_0", "image": "test/images_w_boxes/0001_object_2.jpg",
             "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A dog."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    rows = read_split(tmp_path / "llava.json", root, "Test", progress=False)
    (q,) = QuestionBuilder(own_prompts(), tmp_path / "out").build(rows)
    assert q["image"] == str(root / "test/images_w_boxes/0001_object_2.jpg") and q["box"] == [] and q["class"] == "other"
