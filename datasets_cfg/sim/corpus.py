"""`mose simulate`: a ScenePool of real and synthetic driving scenes rolled out in highway-env.

    mose simulate --out DIR --scenes N [--envs highway,merge,...] [--seed S] [--synthetic-fraction F]
                  [--image-size 224] [--workers K] [--scenes-per-episode 10] [--stride 1] [--image-format auto]

Layout of DIR (besides the ScenePool's pool.json and scenes/):
    sim_config.json      generation settings and generator version; a re-run must use the same ones (only
                         --scenes/--workers change) and the same generator version
    shards/<log>.json.gz the scene rows of one finished episode (written atomically after its images)
    images/<log>/NNN.png top-down renders, one per frame shown by some scene (.jpg for noisy night/rain frames)
    sim_summary.json     counts, safety flags, the real-vs-synthetic distribution distance, and the simulator's
                         warnings counted per message (`sim_warnings`; one summary line on stderr, none per step)

Episodes are planned from (seed, episode index) alone, so a re-run with a larger --scenes keeps every
finished shard and only simulates the missing episodes; the pool is the first N scenes in episode order,
written atomically. "real" scenes use highway-env's default settings; "synthetic" ones are perturbed (see
episode.PERTURBATIONS). Weather and lighting are simulated by us (drivers, render).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

from common.atomic import atomic_path, write_json
from datasets_cfg.sim.episode import DEFAULT_ENVS, EpisodeRunner, plan_episode
from datasets_cfg.sim.world import ENV_IDS

CONFIG_KEYS = ("seed", "envs", "synthetic_fraction", "scenes_per_episode", "stride", "image_size", "image_format")
FORMAT_VERSION = 1  # layout of the output directory
# What the episodes contain: bump it whenever the same settings would simulate or export different scenes,
# so a re-run refuses to mix shards of two generator versions in one pool.
# 1: initial; 2: comfortable ego driver, 5 s warm-up, connected route chains, on_route = route segments' lanes.
GENERATOR_VERSION = 2


def check_settings(scenes: int, envs, synthetic_fraction: float, image_size: int, workers: int, scenes_per_episode: int, stride: int, image_format: str) -> tuple[str, ...]:
    """Validate generation settings; returns the env names as a tuple. Raises ValueError naming the bad option."""
    if isinstance(envs, str):
        envs = [e.strip() for e in envs.split(",") if e.strip()]
    envs = tuple(envs)
    if not envs:
        raise ValueError(f"--envs: expected at least one of {sorted(ENV_IDS)}")
    unknown = [e for e in envs if e not in ENV_IDS]
    if unknown:
        raise ValueError(f"--envs: unknown environment(s) {unknown}; expected names from {sorted(ENV_IDS)}")
    if len(set(envs)) != len(envs):
        raise ValueError(f"--envs: expected distinct names, got {list(envs)}")
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes <= 0:
        raise ValueError(f"--scenes: expected a positive integer, got {scenes!r}")
    if not (isinstance(synthetic_fraction, (int, float)) and 0.0 <= synthetic_fraction <= 1.0):
        raise ValueError(f"--synthetic-fraction: expected a number in [0, 1], got {synthetic_fraction!r}")
    if not isinstance(image_size, int) or not 32 <= image_size <= 2048:
        raise ValueError(f"--image-size: expected an integer in [32, 2048] pixels, got {image_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers: expected an integer >= 1, got {workers!r}")
    if not isinstance(scenes_per_episode, int) or scenes_per_episode < 1:
        raise ValueError(f"--scenes-per-episode: expected an integer >= 1, got {scenes_per_episode!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"--stride: expected an integer >= 1 (frames between scenes), got {stride!r}")
    if image_format not in ("auto", "png", "jpg"):
        raise ValueError(f"--image-format: expected 'auto', 'png' or 'jpg', got {image_format!r}")
    return envs


# ----------------------------------------------------------------------------------------------
# one episode in a worker

_RUNNER: EpisodeRunner | None = None


def _work(task: tuple[dict, str]) -> tuple[int, int, dict]:
    """Run one planned episode, write its shard; returns (episode index, number of scenes, the simulator's warnings
    counted per message: {"counts": ..., "examples": ...}, world.capture_sim_warnings)."""
    from datasets_cfg.sim.world import capture_sim_warnings

    global _RUNNER
    cfg, out = task
    if _RUNNER is None:
        _RUNNER = EpisodeRunner()
    plan = plan_episode(cfg["seed"], cfg["index"], cfg["envs"], cfg["synthetic_fraction"], cfg["scenes_per_episode"],
                        cfg["stride"], cfg["image_size"], cfg["image_format"])
    with capture_sim_warnings() as warned:
        rows = _RUNNER.run(plan, Path(out))
    write_shard(shard_path(out, plan.log_name), rows)
    return cfg["index"], len(rows), {"counts": dict(warned.counts), "examples": warned.examples}


def shard_path(out, log_name: str) -> Path:
    return Path(out) / "shards" / f"{log_name}.json.gz"


def write_shard(path: Path, rows: list[dict]) -> None:
    """gzip'd JSON list of rows (fast level 1: map/agent numbers compress ~5x), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(json.dumps(rows).encode("utf-8"), compresslevel=1))


def read_shard(path: Path) -> list[dict]:
    try:
        return json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable episode shard ({exc}); delete it to have the episode simulated again") from None


# ----------------------------------------------------------------------------------------------


def generate(out, scenes: int, envs=DEFAULT_ENVS, seed: int = 0, synthetic_fraction: float = 0.3, image_size: int = 224,
             workers: int = 1, scenes_per_episode: int = 10, stride: int = 1, image_format: str = "auto",
             progress: bool = True) -> dict:
    """Generate (or extend) the pool in `out`; returns the summary written to out/sim_summary.json.

    The summary also reports what this call did: "episodes_simulated" and "episodes_reused".
    """
    from tqdm.auto import tqdm

    from datasets_cfg.schema import ScenePool
    from datasets_cfg.sim.stats import real_vs_synthetic
    from datasets_cfg.sim.world import SimWarnings

    envs = check_settings(scenes, envs, synthetic_fraction, image_size, workers, scenes_per_episode, stride, image_format)
    out = Path(out)
    settings = {"format_version": FORMAT_VERSION, "generator_version": GENERATOR_VERSION, "seed": int(seed), "envs": list(envs), "synthetic_fraction": float(synthetic_fraction),
                "scenes_per_episode": scenes_per_episode, "stride": stride, "image_size": image_size, "image_format": image_format}
    cfg_path = out / "sim_config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        diff = {k: (old.get(k), settings[k]) for k in settings if old.get(k) != settings[k]}
        if "generator_version" in diff:
            raise ValueError(f"{cfg_path}: this directory was made by generator version {old.get('generator_version', 1)}, this is "
                             f"version {GENERATOR_VERSION}; its finished episodes differ from what this version simulates and "
                             f"cannot be extended or mixed: use a new --out")
        if diff:
            raise ValueError(f"{cfg_path}: this directory was generated with other settings {diff} (old, new); "
                             f"re-run with the same settings to extend it, or use a new --out")
    elif (out / "pool.json").exists():
        raise ValueError(f"{out}: holds a ScenePool that was not made by `mose simulate` (no {cfg_path.name}); use a new --out")
    else:
        write_json(cfg_path, settings)

    shard_dir = out / "shards"
    counts: dict[int, int] = {}
    if shard_dir.is_dir():
        prefix, suffix = f"sim-s{seed}-e", ".json.gz"
        for p in shard_dir.glob(f"{prefix}*{suffix}"):
            counts[int(p.name[len(prefix):-len(suffix)])] = len(read_shard(p))
    reused = len(counts)
    simulated = 0
    t0 = time.perf_counter()

    def have_until(n_needed: int) -> tuple[int, list[int]]:
        """Scenes available from the leading episodes, and the missing episode indices to run next."""
        total, todo, i = 0, [], 0
        while total < n_needed:
            if i in counts:
                total += counts[i]
            else:
                todo.append(i)
                total += scenes_per_episode  # optimistic: an episode cut short by a crash yields fewer
            i += 1
        return sum(counts.get(j, 0) for j in range(i)), todo

    done_scenes, todo = have_until(scenes)
    warned = SimWarnings()  # highway-env's warnings over the episodes simulated by this call, counted (world.py)
    bar = tqdm(total=scenes, initial=min(done_scenes, scenes), desc="simulate", unit="scene", disable=not progress)
    pool = None
    max_episodes = 50 * math.ceil(scenes / scenes_per_episode) + 100
    try:
        while todo:
            if max(todo) > max_episodes:
                raise RuntimeError(f"{out}: episodes keep ending early (crashes); gave up after {max_episodes} episodes")
            tasks = [(dict(settings, index=i), str(out)) for i in todo]
            if workers > 1 and len(tasks) > 1:
                import multiprocessing as mp

                if pool is None:
                    pool = mp.get_context("spawn").Pool(min(workers, len(tasks)))
                results = pool.imap_unordered(_work, tasks)
            else:
                results = map(_work, tasks)
            for index, n, w in results:
                counts[index] = n
                warned.counts.update(w["counts"])
                for k, v in w["examples"].items():
                    warned.examples.setdefault(k, v)
                simulated += 1
                bar.update(max(0, min(n, scenes - bar.n)))
            done_scenes, todo = have_until(scenes)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    gen_seconds = time.perf_counter() - t0

    rows = []
    for i in sorted(counts):
        if len(rows) >= scenes:
            break
        rows += read_shard(shard_path(out, f"sim-s{seed}-e{i:06d}"))
    rows = rows[:scenes]
    ScenePool.from_rows(rows, root=out, where=str(shard_dir)).save(out)

    summary = {
        "num_scenes": len(rows), "settings": settings,
        "episodes_in_pool": len({json.loads(r["meta"])["log_name"] for r in rows}),
        "episodes_simulated": simulated, "episodes_reused": reused, "generation_seconds": round(gen_seconds, 3),
        "sources": dict(Counter(r["source"] for r in rows)), "environments": dict(Counter(r["location"] for r in rows)),
        "lighting": dict(Counter(r["lighting"] for r in rows)), "weather": dict(Counter(r["weather"] for r in rows)),
        "commands": dict(Counter(r["command"] for r in rows)),
        "crash": sum(r["crash"] for r in rows), "near_miss": sum(r["near_miss"] for r in rows),
        "perturbations": dict(Counter(p for r in rows for p in json.loads(r["meta"])["perturbations"])),
        "qa": dict(Counter(q["task"] for r in rows for q in r["qa"])),
        "distance": real_vs_synthetic(rows),
        "sim_warnings": warned.to_dict(),
    }
    write_json(out / "sim_summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output ScenePool directory (created or extended)")
    parser.add_argument("--scenes", required=True, type=int, help="number of scenes in the pool")
    parser.add_argument("--envs", default=",".join(DEFAULT_ENVS), help=f"comma-separated highway-env environments, from {','.join(ENV_IDS)}")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same scenes)")
    parser.add_argument("--synthetic-fraction", type=float, default=0.3, help="fraction of episodes with perturbed settings, in [0, 1]")
    parser.add_argument("--image-size", type=int, default=224, help="render width = height in pixels")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes across episodes")
    parser.add_argument("--scenes-per-episode", type=int, default=10, help="scenes cut from one episode (log)")
    parser.add_argument("--stride", type=int, default=1, help="frames (0.5 s each) between consecutive scenes of a log")
    parser.add_argument("--image-format", default="auto", choices=("auto", "png", "jpg"),
                        help="auto: PNG, JPEG for noisy night/rain/domain-shifted frames")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _warnings_line(d: dict) -> str | None:
    from datasets_cfg.sim.world import SimWarnings

    w = SimWarnings()
    w.counts.update(d.get("by_message") or {})
    return w.summary("mose simulate")


def run(args) -> int:
    try:
        summary = generate(args.out, args.scenes, args.envs, args.seed, args.synthetic_fraction, args.image_size,
                           args.workers, args.scenes_per_episode, args.stride, args.image_format, progress=not args.no_progress)
    except ValueError as exc:
        print(f"mose simulate: error: {exc}", file=sys.stderr)
        return 2
    d = summary["distance"] or {}
    print(json.dumps({k: summary[k] for k in ("num_scenes", "sources", "environments", "crash", "near_miss", "episodes_simulated", "episodes_reused")}
                     | {"mmd_real_vs_synthetic": d.get("mmd_real_vs_synthetic"), "mmd_real_vs_real_split": d.get("mmd_real_vs_real_split"),
                        "summary": str(Path(args.out) / "sim_summary.json")}, indent=2))
    line = _warnings_line(summary.get("sim_warnings") or {})
    if line:
        print(line, file=sys.stderr)
    return 0
