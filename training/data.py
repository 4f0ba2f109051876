"""Each stage's data: its curation manifest -> the pool's scenes -> skill-dataset items -> tokenised dataset.

    manifest (<data.manifests>/<stage>.jsonl, curation.selection.Selection)
      -> pool.select_ids(ids)                          datasets_cfg/schema.py
      -> pool_items(..., kinds)                        datasets_cfg/skill_items.py (hierarchical / single QA items),
         kept in <run.output_dir>/skill_items/<stage>.jsonl  datasets_cfg/skill_dataset.py (+ <stage>.header.json)
      -> keep items whose skills lie under `roots`, single items of `tasks`
      -> build_skill_dataset(items, processor)         mose/skill_data.py (labels, per-token skill labels)

Every check runs for every stage before any training starts (`prepare_stage_data`): a missing or corrupt manifest, a
manifest naming ids that are not in the pool, a manifest with no rows, a stage left with no item: `ConfigError`
naming the config file, the key and the reason.

The stage's items are a file a person can open (datasets_cfg/skill_dataset.py): `<run.output_dir>/skill_items/
<stage>.jsonl` with its header `<stage>.header.json` (beside the run's processor/ and cache/, outside the stage's own
folder, which only training writes). When the file's fingerprint equals that of the current inputs (the pool's
selected rows and root, the manifest's ids, the taxonomy's content, max_images / kinds, the item builder's code) the
items are read from it; else (missing, stale, unreadable) they are built and the file written.
The stage's report says which: `report["skill_items"]["status"]` is "reused", "built" or "rebuilt" (with "why"),
and the runner logs it. The roots / tasks filter runs after, on the file's items (changing it needs no rebuild).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Sampler

from mose.skills import Taxonomy
from training.config import ConfigError, StageConfig, TrainConfig


@dataclass
class StageTrainingData:
    """One training stage's data: its manifest, the scene ids it selects, the skill dataset built from them
    (untokenised items, then the tokenised dataset after `tokenise_stages`) and what was kept and skipped."""

    stage: str
    manifest: Path
    scene_ids: list[str]
    dataset: object  # datasets.Dataset from build_skill_dataset
    report: dict = field(default_factory=dict)  # what was kept and skipped, per step of the way

    def __len__(self) -> int:
        return len(self.dataset)


def read_manifest(cfg: TrainConfig, stage: str, pool_ids: set[str], pool_path: str) -> tuple[Path, list[str]]:
    """The stage manifest's ids, checked against the pool."""
    from curation.selection import Selection, SelectionError

    key = f"stages.{stage}.manifest" if cfg.stages[stage].manifest else "data.manifests"
    path = cfg.manifest_path(stage)
    try:
        sel = Selection.read(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"{cfg.source}: {key}: manifest of stage {stage!r} not found: {exc} "
                          f"(make it with `mose curate --plan PLAN.yaml --out DIR`)") from None
    except (SelectionError, ValueError, KeyError) as exc:
        raise ConfigError(f"{cfg.source}: {key}: manifest of stage {stage!r} is not a valid selection manifest: {exc}") from None
    if not sel.ids:
        raise ConfigError(f"{cfg.source}: {key}: manifest {path} of stage {stage!r} selects no scene (empty stage)")
    missing = [i for i in sel.ids if i not in pool_ids]
    if missing:
        raise ConfigError(f"{cfg.source}: {key}: manifest {path} names {len(missing)} scene id(s) not in the pool "
                          f"{pool_path} (data.pool), e.g. {missing[:5]}; was it made from another pool?")
    return path, list(sel.ids)


def items_path(cfg: TrainConfig, stage: str) -> Path:
    """Where the stage's skill dataset is kept: `<run.output_dir>/skill_items/<stage>.jsonl`."""
    return Path(cfg.run.output_dir) / "skill_items" / f"{stage}.jsonl"


def stage_items(pool, ids: list[str], st: StageConfig, taxonomy: Taxonomy, max_images: int, path: str | Path | None = None):
    """Skill-dataset items of the stage's scenes, filtered by the stage's kinds / roots / tasks. -> (Dataset, report).

    With `path`: the items are read from that skill-dataset file when its fingerprint matches, else built and
    written there (`report["skill_items"]` says which); without it they are built in memory."""
    from datasets_cfg.skill_dataset import cached_skill_items, item_inputs, items_dataset
    from datasets_cfg.skill_items import pool_items

    kinds = tuple(st.items.kinds)

    def build():
        built, rep = pool_items(pool.select_ids(ids), taxonomy, max_images=max_images, kinds=kinds)
        return built, rep.as_dict()

    if path is None:
        built, rep = build()
        items, status = items_dataset(built), None
    else:
        rows, rep, status = cached_skill_items(path, item_inputs(pool, taxonomy, ids=ids, max_images=max_images, kinds=kinds), build)
        items = items_dataset(rows)
    report = {"items_built": len(items), "items": rep}
    if status is not None:
        report["skill_items"] = status
    roots, tasks = st.items.roots, st.items.tasks
    if roots is not None or tasks is not None:
        allowed = set(roots or [])

        def keep(item) -> bool:
            if roots is not None and not all(taxonomy.root_of(s) in allowed for s in item["skills"]):
                return False
            return tasks is None or item["kind"] != "single" or item["task"] in tasks

        before = Counter(f"{k}/{t}" for k, t in zip(items["kind"], items["task"]))
        items = items.filter(keep, desc=f"{st.name}: items by roots / tasks")
        after = Counter(f"{k}/{t}" for k, t in zip(items["kind"], items["task"]))
        report["filtered_out"] = {k: before[k] - after.get(k, 0) for k in before if before[k] - after.get(k, 0)}
    return items, report


def collect_stage_items(cfg: TrainConfig, taxonomy: Taxonomy, *, log=None) -> dict[str, StageTrainingData]:
    """Read and check every configured stage's manifest and build (or reuse, see the module doc) its untokenised
    items; `log(msg)` is told per stage whether its skill-dataset file was reused or built. Raises ConfigError."""
    from datasets_cfg.schema import SchemaError, ScenePool

    try:
        pool = ScenePool.load(cfg.data.pool)
    except (FileNotFoundError, SchemaError) as exc:
        raise ConfigError(f"{cfg.source}: data.pool: {exc}") from None
    pool_ids = set(pool.ids)
    out: dict[str, StageTrainingData] = {}
    for stage in cfg.stage_names():
        st = cfg.stages[stage]
        path, ids = read_manifest(cfg, stage, pool_ids, cfg.data.pool)
        items, report = stage_items(pool, ids, st, taxonomy, cfg.data.max_images, items_path(cfg, stage))
        report["scenes"] = len(ids)
        if log is not None:
            si = report["skill_items"]
            why = f"; {si['why']}" if si["why"] else ""
            log(f"[{stage}] skill items: {si['status']} {si['file']} ({report['items_built']} items){why}")
        if len(items) == 0:
            _empty(cfg, stage, path, report)
        out[stage] = StageTrainingData(stage, path, ids, items, report)
    return out


def tokenise_stages(cfg: TrainConfig, stages: dict[str, StageTrainingData], processor, taxonomy: Taxonomy, *,
                    cache_dir: str | Path | None = None) -> None:
    """Replace each stage's items by the tokenised skill dataset (labels, skill labels). Raises ConfigError if none is left."""
    from mose.skill_data import build_skill_dataset

    for stage, data in stages.items():
        ds, rep = build_skill_dataset(data.dataset, processor, taxonomy, max_length=cfg.data.max_length, cache_dir=cache_dir)
        data.report["tokenised"] = rep.as_dict()
        if len(ds) == 0:
            _empty(cfg, stage, data.manifest, data.report)
        data.report["items_used"] = len(ds)
        data.dataset = ds


def _empty(cfg: TrainConfig, stage: str, path: Path, report: dict):
    st = cfg.stages[stage]
    why = {k: v for k, v in report.items() if k not in ("items_built", "scenes")}
    raise ConfigError(f"{cfg.source}: stages.{stage}: no training item left (empty stage): {report.get('scenes')} scenes from {path} "
                      f"gave {report.get('items_built')} items of kinds {st.items.kinds} (roots {st.items.roots}, tasks "
                      f"{st.items.tasks}), none usable; {why}")


def prepare_stage_data(cfg: TrainConfig, processor, taxonomy: Taxonomy, *, cache_dir: str | Path | None = None) -> dict[str, StageTrainingData]:
    """collect_stage_items + tokenise_stages: every check for every stage, before any training."""
    stages = collect_stage_items(cfg, taxonomy)
    tokenise_stages(cfg, stages, processor, taxonomy, cache_dir=cache_dir)
    return stages


class SeededShuffleSampler(Sampler[int]):
    """A permutation per epoch from (random_state, epoch): the same order on every process and after a resume."""

    def __init__(self, n: int, random_state: int = 0):
        self.n, self.random_state, self.epoch = int(n), int(random_state), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.random_state * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_sampler(st: StageConfig, data: StageTrainingData, taxonomy: Taxonomy, seed: int):
    if st.sampler == "skill_balanced":
        from mose.skill_sampler import SkillBalancedSampler

        return SkillBalancedSampler(data.dataset["skill_counts"], taxonomy, level="coarse", num_samples=len(data), random_state=seed)
    return SeededShuffleSampler(len(data), seed)


__all__ = ["StageTrainingData", "prepare_stage_data", "collect_stage_items", "tokenise_stages", "read_manifest", "stage_items", "items_path", "make_sampler",
           "SeededShuffleSampler"]
