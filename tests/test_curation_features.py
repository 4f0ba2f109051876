"""curation/features.py: metadata, ego dynamics, agent/map sets, planner inputs, caching, image embeddings."""
import numpy as np
import pytest

from curation.features import (ArrayPool, FeatureError, agent_set, as_column, cached, check_finite, column_matrix, ego_dynamics,
                               image_embeddings, map_set, metadata_onehot, planner_inputs, resolve_features, scene_features)
from datasets_cfg.schema import Scene, ScenePool, new_row
from tests.curation_helpers import scene_row


def _row(sid="a", heading=0.0, agents=(), lanes=(), **kw):
    t = [-0.5, 0.0, 0.5]
    ego = {"t": t, "x": [0.0, 10.0, 20.0], "y": [0.0, 0.0, 0.0], "heading": [heading, heading, heading + 0.3],
           "speed": [4.0, 5.0, 6.0], "accel": [1.0, 1.0, -2.0], "accel_lat": [0.0, 0.5, -0.5], "yaw_rate": [0.0, 0.0, 0.6]}
    ag = {k: [] for k in ("frame", "track_id", "category", "x", "y", "heading", "length", "width", "height", "vx", "vy")}
    for f, tid, x, y, vx, vy in agents:
        for k, v in (("frame", f), ("track_id", tid), ("category", "vehicle"), ("x", x), ("y", y), ("heading", 0.0), ("length", 4.0),
                     ("width", 2.0), ("height", 1.5), ("vx", vx), ("vy", vy)):
            ag[k].append(v)
    lanes = [{"id": f"l{i}", "kind": "lane", "centerline": c, "polygon": [], "speed_limit": 10.0, "on_route": True} for i, c in enumerate(lanes)]
    return new_row(sid, "unit", "train", current_index=1, ego=ego, agents=ag, map={"lanes": lanes, "areas": [], "route": [l["id"] for l in lanes]}, **kw)


def test_metadata_onehot_and_ego_dynamics():
    pool = ScenePool.from_rows([_row("a", weather="rainy", lighting="night"), _row("b", weather="sunny"), _row("c")])
    X, names = metadata_onehot(pool, ("weather", "lighting"))
    assert names == ["weather=<unknown>", "weather=rainy", "weather=sunny", "lighting=<unknown>", "lighting=night"]
    assert X.tolist() == [[0, 1, 0, 0, 1], [0, 0, 1, 1, 0], [1, 0, 0, 1, 0]]
    D, dn = ego_dynamics(pool)
    d = dict(zip(dn, D[0]))
    assert d["speed_mean"] == pytest.approx(5.0) and d["speed_std"] == pytest.approx(np.std([4, 5, 6]))
    assert d["accel_std"] == pytest.approx(np.std([1, 1, -2])) and d["accel_lat_std"] == pytest.approx(np.std([0, 0.5, -0.5]))
    assert d["cum_abs_yaw"] == pytest.approx(0.3) and d["accel_lat_abs_max"] == pytest.approx(0.5)


def test_agent_and_map_sets_are_in_the_frames_ego_frame():
    # ego at (10, 0) heading +y at the current frame; an agent 10 m north moving north at 3 m/s is 10 m ahead
    row = _row(heading=np.pi / 2, agents=[(1, "v", 10.0, 10.0, 0.0, 3.0), (0, "w", 0.0, 0.0, 0.0, 0.0)],
               lanes=[[[10.0, -20.0], [10.0, 100.0]]])
    scene = Scene(row)
    a = agent_set(scene)
    np.testing.assert_allclose(a, [[10.0, 0.0, 3.0, 0.0, 0.0, -1.0, 4.0, 2.0]], atol=1e-9)  # heading 0 -> -90° in ego frame
    row["agents"]["heading"][0] = np.pi / 2
    np.testing.assert_allclose(agent_set(Scene(row))[0, 4:6], [1.0, 0.0], atol=1e-9)
    m = map_set(scene, radius=12.0, spacing=5.0)
    # the lane runs along the ego's +x axis: points every 5 m from -20 m ... within 12 m of the ego
    np.testing.assert_allclose(m[:, 0], [-10.0, -5.0, 0.0, 5.0, 10.0], atol=1e-9)
    np.testing.assert_allclose(m[:, 1:], [[0.0, 1.0, 0.0]] * 5, atol=1e-9)


def test_planner_inputs_and_nan_errors():
    scene = Scene(scene_row("p", speed=10.0, agents=[("a", 30.0, 0.0, 5.0, 0.0)]))
    x = planner_inputs(scene)
    assert x.shape == (12 + 4 + 4 + 16 + 16,)
    hist = x[:12].reshape(4, 3)
    np.testing.assert_allclose(hist[:, 0], [-15.0, -10.0, -5.0, 0.0], atol=0.05)  # 10 m/s, oldest first
    np.testing.assert_allclose(x[36:52].reshape(8, 2)[:, 0], 5.0 * np.arange(1, 9), atol=0.05)  # route at v·t ahead
    np.testing.assert_allclose(x[20:24], [30.0, 0.0, 5.0, 0.0], atol=1e-6)  # the only agent, nearest first
    X = np.ones((3, 2))
    X[2, 1] = np.nan
    with pytest.raises(FeatureError, match="scene 'c': feature 'speed' is nan"):
        check_finite(X, ["a", "b", "c"], ["x", "speed"])
    pool = ArrayPool(["a", "b"], {"emb": [[1.0, 2.0], [np.inf, 0.0]]})
    with pytest.raises(FeatureError, match="scene 'b': feature 'emb\\[0\\]' is inf"):
        column_matrix(pool, "emb")
    with pytest.raises(FeatureError, match="expected an array, a pool column name or one of"):
        resolve_features(pool, 5)
    with pytest.raises(KeyError, match="no column 'nope'"):
        resolve_features(pool, "nope")


def test_cached_features_and_columns(tmp_path):
    pool = ScenePool.from_rows([scene_row(f"s{i}", log=f"l{i}", speed=5.0 + i) for i in range(3)])
    pool.save(tmp_path / "p")
    pool = ScenePool.load(tmp_path / "p")
    calls = []

    def compute():
        calls.append(1)
        return scene_features(pool)

    X1, n1 = cached(pool, "scene", compute)
    X2, n2 = cached(pool, "scene", compute)
    assert len(calls) == 1 and np.array_equal(X1, X2) and n1 == n2
    cached(pool, "scene", compute, config={"radius": 30})
    assert len(calls) == 2 and len(list((tmp_path / "p" / "features").glob("scene-*.npy"))) == 2
    sub = pool.select_ids(["s0", "s1"])
    cached(sub, "scene", lambda: scene_features(sub))
    assert len(list((tmp_path / "p" / "features").glob("scene-*.npy"))) == 3  # other ids, other key
    with_col = as_column(pool, "scene_vec", X1)
    np.testing.assert_allclose(column_matrix(with_col, "scene_vec"), X1)
    Z, _, desc = resolve_features(with_col, "scene_vec")
    assert desc == "column:scene_vec" and np.allclose(Z.mean(0), 0, atol=1e-6)
    assert n1[n1.index("speed_mean")] == "speed_mean" and X1[:, n1.index("speed_mean")].tolist() == pytest.approx([5.0, 6.0, 7.0], abs=0.2)


def test_image_embeddings_from_a_tiny_siglip(tmp_path):
    import torch
    from PIL import Image
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 image_size=32, patch_size=8))
    rows = []
    rng = np.random.default_rng(0)
    for i in range(3):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        r = scene_row(f"s{i}", log=f"l{i}")
        r["images"] = [{"frame": 3, "camera": "CAM_F0", "path": f"images/{i}.png"}]
        rows.append(r)
    pool = ScenePool.from_rows(rows, root=tmp_path)
    E, names = image_embeddings(pool, model, batch_size=2, progress=False)
    assert E.shape == (3, 16) and names[0] == "img_0"
    im = np.asarray(Image.open(tmp_path / "images" / "1.png").convert("RGB").resize((32, 32), Image.BILINEAR), np.float32) / 255.0
    x = (torch.from_numpy(im).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        ref = model(pixel_values=x).pooler_output[0].numpy()
    np.testing.assert_allclose(E[1], ref, rtol=1e-4, atol=1e-5)
    Em, _ = image_embeddings(pool, model, pooling="mean", progress=False)
    assert not np.allclose(Em, E)
    rows[2]["images"] = []
    with pytest.raises(FeatureError, match="scene 's2': feature 'images' has no image"):
        image_embeddings(ScenePool.from_rows(rows, root=tmp_path), model, progress=False)
