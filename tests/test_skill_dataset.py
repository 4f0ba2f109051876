"""The skill-dataset file (datasets_cfg/skill_dataset.py): round trip, fingerprint, reuse or rebuild, bad files; and
training reading each stage's items from it (training/data.py)."""
from __future__ import annotations

import json

import pytest

from datasets_cfg.schema import ScenePool
from datasets_cfg.skill_dataset import (
    SkillDatasetError,
    cached_skill_items,
    fingerprint,
    header_path,
    item_inputs,
    read_skill_dataset,
    write_skill_dataset,
)
from datasets_cfg.skill_items import pool_items
from mose.skills import Taxonomy
from tests.skill_fixtures import driving_row, write_image

TAX = Taxonomy.load()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("skill_dataset")
    rows = [driving_row(f"s{i}", image=write_image(d / "img" / f"s{i}.png", seed=i), lane_change=i % 2 == 1, red_light=i != 2)
            for i in range(4)]
    ScenePool.from_rows(rows).save(d / "pool")
    return ScenePool.load(d / "pool")


def edited_taxonomy() -> Taxonomy:
    """The packaged taxonomy with one more keyword for traffic lights (a content edit, same skills)."""
    import yaml

    from mose.skills import default_path

    raw = yaml.safe_load(default_path().read_text())
    raw["skills"]["traffic_lights"]["keywords"] = list(raw["skills"]["traffic_lights"].get("keywords") or []) + ["semaphore"]
    return Taxonomy.from_dict(raw, source="edited")


def built(pool, ids=None, tax=TAX):
    items, rep = pool_items(pool if ids is None else pool.select_ids(ids), tax)
    return [dict(it) for it in items], rep.as_dict()


def test_round_trip_keeps_items_and_spans_index_the_text(pool, tmp_path):
    items, rep = built(pool)
    inputs = item_inputs(pool, TAX)
    path = write_skill_dataset(tmp_path / "items.jsonl", items, inputs, rep)
    ds = read_skill_dataset(path)
    assert ds.items == items and len(ds) == len(items) > 0
    assert ds.fingerprint == fingerprint(inputs) and ds.header["report"] == rep and ds.header["num_items"] == len(items)
    kinds = {it["kind"] for it in ds.items}
    assert kinds == {"hierarchical", "single"}
    for it in ds.items:
        # spans tile the target in order, each a non-empty piece of it, each skill a taxonomy skill
        assert it["spans"][0]["start"] == 0 and it["spans"][-1]["end"] == len(it["target"])
        for a, b in zip(it["spans"], it["spans"][1:]):
            assert a["end"] == b["start"]
        for sp in it["spans"]:
            assert it["target"][sp["start"]:sp["end"]].strip() and sp["skill"] in TAX
        assert it["images"] and all(p.endswith(".png") for p in it["images"])
    # one JSON object per line, readable without this package
    lines = path.read_text().splitlines()
    assert [json.loads(line)["item_id"] for line in lines] == [it["item_id"] for it in items]
    assert json.loads(header_path(path).read_text())["items_file"] == "items.jsonl"


def test_fingerprint_follows_every_input(pool, tmp_path):
    ids = pool.ids
    base = fingerprint(item_inputs(pool, TAX, ids=ids))
    assert fingerprint(item_inputs(ScenePool.load(pool.root), Taxonomy.load(), ids=list(ids))) == base  # same inputs, reloaded
    changed = {
        "taxonomy edit": item_inputs(pool, edited_taxonomy(), ids=ids),
        "manifest: fewer scenes": item_inputs(pool, TAX, ids=ids[:3]),
        "manifest: other order": item_inputs(pool, TAX, ids=ids[::-1]),
        "max_images": item_inputs(pool, TAX, ids=ids, max_images=2),
        "kinds": item_inputs(pool, TAX, ids=ids, kinds=("hierarchical",)),
    }
    # a pool whose rows differ (one scene's weather) under the same ids and root; the same rows saved again: no change
    def saved_again(rows, name):
        ScenePool.from_rows(rows).save(tmp_path / name)
        inputs = item_inputs(ScenePool.load(tmp_path / name), TAX, ids=ids)
        inputs["pool"]["root"] = item_inputs(pool, TAX, ids=ids)["pool"]["root"]
        return inputs

    rows = [dict(r) for r in pool.dataset]
    assert fingerprint(saved_again(rows, "same")) == base
    rows[1]["weather"] = "rainy"
    changed["pool rows"] = saved_again(rows, "edited")
    changed["pool moved"] = item_inputs(ScenePool(pool.dataset, tmp_path / "elsewhere"), TAX, ids=ids)
    prints = {k: fingerprint(v) for k, v in changed.items()}
    assert base not in prints.values() and len(set(prints.values())) == len(prints), prints


def test_unchanged_inputs_reuse_the_file_changed_ones_rebuild(pool, tmp_path):
    path = tmp_path / "stage.jsonl"
    calls = []

    def build(tax=TAX, ids=None):
        def fn():
            calls.append(1)
            return built(pool, ids, tax)
        return fn

    items, rep, st = cached_skill_items(path, item_inputs(pool, TAX), build())
    assert st["status"] == "built" and st["why"] == "missing" and path.is_file()
    again, rep2, st2 = cached_skill_items(path, item_inputs(ScenePool.load(pool.root), Taxonomy.load()), build())
    assert st2["status"] == "reused" and again == items and rep2 == rep and len(calls) == 1
    # a taxonomy edit: stale, rebuilt, and the file now holds the new fingerprint
    tax2 = edited_taxonomy()
    _, _, st3 = cached_skill_items(path, item_inputs(pool, tax2), build(tax2))
    assert st3["status"] == "rebuilt" and "stale" in st3["why"] and "taxonomy" in st3["why"]
    assert read_skill_dataset(path).fingerprint == fingerprint(item_inputs(pool, tax2))
    # a manifest change: stale again
    ids = pool.ids[:2]
    items4, _, st4 = cached_skill_items(path, item_inputs(pool, tax2, ids=ids), build(tax2, ids))
    assert st4["status"] == "rebuilt" and "scene_ids" in st4["why"] and {it["scene_id"] for it in items4} == set(ids)
    assert len(calls) == 3


def test_truncated_or_edited_file_is_a_clean_error_and_rebuilt_by_training(pool, tmp_path):
    items, rep = built(pool)
    inputs = item_inputs(pool, TAX)
    path = write_skill_dataset(tmp_path / "items.jsonl", items, inputs, rep)
    text = path.read_text()
    lines = text.splitlines(keepends=True)

    path.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # cut inside line 4
    with pytest.raises(SkillDatasetError, match=rf"{path} line 4: not a JSON item"):
        read_skill_dataset(path)
    path.write_text("".join(lines[:-1]))  # cut at a line boundary
    with pytest.raises(SkillDatasetError, match=rf"{path}: expected {len(items)} items .*got {len(items) - 1}"):
        read_skill_dataset(path)
    bad = json.loads(lines[1])
    bad["spans"][0]["end"] = len(bad["target"]) + 5
    path.write_text(lines[0] + json.dumps(bad) + "\n" + "".join(lines[2:]))
    with pytest.raises(SkillDatasetError, match=rf"{path} line 2: field 'spans'.*inside the target"):
        read_skill_dataset(path)
    edited = json.loads(lines[0])
    edited["target"] = edited["target"].upper()  # still a valid item: only the checksum tells
    path.write_text(json.dumps(edited) + "\n" + "".join(lines[1:]))
    with pytest.raises(SkillDatasetError, match="checksum"):
        read_skill_dataset(path)
    # what training calls: an unreadable file is rebuilt, and says why
    again, _, st = cached_skill_items(path, inputs, lambda: built(pool))
    assert st["status"] == "rebuilt" and st["why"].startswith("unreadable:") and "checksum" in st["why"]
    assert again == items and read_skill_dataset(path).items == items


# ----------------------------------------------------------------------------------------------
# training reads the stage's items from the file


def test_training_reuses_stage_items_until_an_input_changes(pool, tmp_path):
    import yaml

    from mose.skills import default_path
    from tests.training_helpers import tiny_config, write_manifests
    from training.data import collect_stage_items, items_path

    ids = pool.ids
    manifests = write_manifests(pool.root, tmp_path / "m", {"align": ids[:2], "router_pretrain": ids[2:], "skill_tune": ids[:3]})
    cfg = tiny_config(tmp_path / "out", pool.root, manifests)
    stages = ("align", "router_pretrain", "skill_tune")

    def collect(cfg, tax=TAX):
        logged = []
        data = collect_stage_items(cfg, tax, log=logged.append)
        return {s: d.report["skill_items"]["status"] for s, d in data.items()}, logged, data

    status, logged, first = collect(cfg)
    assert status == dict.fromkeys(stages, "built")
    assert all(items_path(cfg, s).is_file() for s in stages) and not any((tmp_path / "out" / s).exists() for s in stages)
    assert len(logged) == 3 and all("skill items: built" in m for m in logged)
    status, logged, second = collect(cfg, Taxonomy.load())
    assert status == dict.fromkeys(stages, "reused") and all("skill items: reused" in m for m in logged)
    for s in stages:
        assert second[s].dataset.to_list() == first[s].dataset.to_list()
        assert second[s].report["items"] == first[s].report["items"] and len(second[s]) > 0
    # the stage filter runs on the file's items: a new filter reuses the file
    cfg.stages["skill_tune"].items.roots = ["planning"]
    status, _, third = collect(cfg)
    assert status["skill_tune"] == "reused" and 0 < len(third["skill_tune"]) < len(second["skill_tune"])
    # a manifest change rebuilds that stage only
    write_manifests(pool.root, manifests, {"align": ids[:2], "router_pretrain": ids[2:], "skill_tune": ids[1:3]})
    status, logged, _ = collect(cfg)
    assert status == {"align": "reused", "router_pretrain": "reused", "skill_tune": "rebuilt"}
    assert any("[skill_tune] skill items: rebuilt" in m and "stale" in m for m in logged)
    # a taxonomy edit rebuilds every stage
    raw = yaml.safe_load(default_path().read_text())
    raw["skills"]["vehicles"]["description"] += " (edited)"
    (tmp_path / "skills.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    status, _, _ = collect(cfg, Taxonomy.load(tmp_path / "skills.yaml"))
    assert status == dict.fromkeys(stages, "rebuilt")
