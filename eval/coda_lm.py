"""`mose eval coda`: CODA-LM corner-case reasoning — questions, generation, judging, scores.

    mose eval coda --annotations DIR --images DIR (--model CKPT | --predictions FILE) --out DIR
                   [--judge-url URL --judge-model NAME [--judge-key-env OPENAI_API_KEY]] [--official-prompts CODA_LM_CHECKOUT]

``--annotations`` is a CODA-LM split folder (or a LLaVA-format question list) with ``--images`` the image root,
or a ScenePool directory whose rows carry CODA-style qa (e.g. held-out simulator scenes). Written to ``--out``:

- ``questions.jsonl``: every question (id, task, question text, image used, reference, class, box);
  ``region_images/``: the copies with the red box drawn;
- ``predictions.jsonl`` (with ``--model``): answers keyed by question id, appended batch by batch (resumable);
- ``judge_cache.jsonl``: the judge's replies by request hash (a re-run asks nothing twice);
  ``judgements.jsonl``: per question: rating, status (ok / unparseable / failed), the official parse rule that
  read it, ``lenient_only`` / ``out_of_range`` flags, reply, error;
- ``scores.json`` (+ ``scores.png``): judge scores per task and official region class, each as ``mean_rating``
  (1-10, the official scripts' number) and ``score`` (x 10, the published scale), over judged items and with
  failures as 1; final score; offline BLEU-4 / ROUGE-L / CIDEr-D and object recall; every count; ``partial``;
  the prompts used (own or official, with a hash) and the judge (URL, model; the key is never written).

Predictions: our JSONL matched by id (``<annotation file stem>:general``, ``<stem>:region:<key>``,
``<stem>:suggestion``, as questions.jsonl lists them), or a folder of the official submission files read by the
official rules (eval/coda_official.py); ``--convert official|ours`` writes the other format and stops. A
prediction for an unknown id, a duplicate id or a malformed line stops the run with an error naming file and
line (or, with ``--skip-invalid``, is skipped and counted). Questions without a prediction are an error naming
how many, unless ``--allow-partial`` (then they score 1 in ``score_failures_as_1`` and every output says partial).

The judge: an item failing after its retries is counted and the run goes on (exit 0, a warning); only an
unreachable endpoint stops sending (exit 1); the same command then resumes from the cache.

The same run from Python, without argparse (the command builds these options from its arguments)::

    result = evaluate(CodaEvalOptions(annotations="runs/pool", model="runs/ckpt", out="runs/coda"))
    result.scores["offline"], result.judge_endpoint_down, result.exit_code
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

from datasets_cfg.schema import SchemaError
from eval.coda_official import CodaPredictionsError  # noqa: F401 (re-exported: raised by both modules)


def load_predictions(path: str | os.PathLike, question_ids, skip_invalid: bool = False) -> tuple[dict[str, str], dict]:
    """{question id: answer} from a JSONL of {"question_id", "answer"}; plus counts of what was skipped and why."""
    path = Path(path)
    if not path.is_file():
        raise CodaPredictionsError(f"{path}: predictions file not found")
    known = set(question_ids)
    out, skipped, errors = {}, Counter(), []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CodaPredictionsError(f"{where}: malformed JSON ({e.msg})", "malformed JSON") from None
            if not isinstance(rec, dict) or "question_id" not in rec or not isinstance(rec["question_id"], (str, int)):
                raise CodaPredictionsError(f"{where}: field 'question_id': expected a string id", "missing field")
            if not isinstance(rec.get("answer"), str):
                raise CodaPredictionsError(f"{where}: field 'answer': expected a string, got {rec.get('answer')!r:.60}", "wrong type")
            qid = str(rec["question_id"])
            if qid not in known:
                raise CodaPredictionsError(f"{where}: field 'question_id': expected an id of the evaluated questions, got unknown id {qid!r}", "unknown id")
            if qid in out:
                raise CodaPredictionsError(f"{where}: field 'question_id': expected each id once, got {qid!r} again", "duplicate id")
            out[qid] = rec["answer"]
        except CodaPredictionsError as e:
            if not skip_invalid:
                raise CodaPredictionsError(e.args[0]) from None
            skipped[e.args[1]] += 1
            errors.append(e.args[0])
    return out, {"skipped": sum(skipped.values()), "skipped_by_reason": dict(skipped), "first_errors": errors[:20]}


def plot_scores(scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judge = scores["judge_scores"]
    tasks = [t for t in ("general", "region", "suggestion") if t in judge]
    classes = list(judge.get("region", {}).get("per_class", {}))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    for ax, names, vals, title in (
        (axes[0], tasks, [judge[t] for t in tasks], "CODA-LM tasks"),
        (axes[1], classes, [judge["region"]["per_class"][c] for c in classes], "region perception per class"),
    ):
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [v["score"] or 0 for v in vals], 0.4, label="over judged items")
        ax.bar([i + 0.2 for i in x], [v["score_failures_as_1"] or 0 for v in vals], 0.4, label="failures as 1")
        ax.set_xticks(list(x), names, rotation=20)
        ax.set_ylim(0, 100)
        ax.set_ylabel("score = mean rating (1-10) x 10")
        ax.set_title(title + (" — PARTIAL (predictions missing)" if scores["partial"]["partial"] else ""))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    from common.atomic import save_figure

    save_figure(fig, path, dpi=100)


@dataclass(frozen=True)
class CodaEvalOptions:
    """Every option of `mose eval coda`, with the command's defaults (field = option name with `_` for `-`).

    Exactly one of `model` (a checkpoint to generate answers with) and `predictions` (a JSONL to score); `judge_url`
    and `judge_model` go together (no judge: offline metrics only)."""

    annotations: str | os.PathLike  # CODA-LM split folder (or LLaVA-format question list), or a ScenePool directory
    out: str | os.PathLike  # output folder
    model: str | os.PathLike | None = None  # transformers VLM checkpoint (local folder)
    predictions: str | os.PathLike | None = None  # JSONL of {"question_id", "answer"}
    images: str | os.PathLike | None = None  # image root holding val/images/ and test/images/ (CODA-LM annotations only)
    split: str | None = None  # default: the annotation folder's name
    official_prompts: str | os.PathLike | None = None  # a checkout of DLUT-LYZ/CODA-LM: its question and judge prompts
    box_encoding: str = "draw"  # "draw" (red rectangle on the image) or "text" (normalised)
    batch_size: int = 4
    max_new_tokens: int = 512
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    judge_url: str | None = None  # OpenAI-compatible endpoint base URL
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"  # environment variable holding the API key (never logged or written)
    judge_timeout: float = 60.0  # seconds per request
    judge_retries: int = 4  # retries per item on transient errors
    judge_backoff: float = 1.0  # first retry delay in seconds (doubles each retry)
    judge_workers: int = 4  # parallel requests
    judge_cache: str | os.PathLike | None = None  # default: OUT/judge_cache.jsonl
    skip_invalid: bool = False  # skip and count bad scenes / predictions instead of stopping
    strict_import: bool = False  # CODA-LM annotation files: every check (`mose import coda --strict`); default: what the evaluation reads
    allow_partial: bool = False  # score even when predictions are missing (or the file is empty); every output says "partial"
    region_extended: bool = False  # also our wider region view (every category, class "other") under judge_scores.region_extended
    convert: str | None = None  # "ours" or "official": write the predictions in that format to OUT and stop (no judge, no scores)

    def __post_init__(self):
        if (self.model is None) == (self.predictions is None):
            raise ValueError("CodaEvalOptions: expected exactly one of model and predictions")
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("CodaEvalOptions: judge_url and judge_model go together")
        if self.convert not in (None, "ours", "official"):
            raise ValueError(f"CodaEvalOptions: convert: expected None, 'ours' or 'official', got {self.convert!r}")
        if self.box_encoding not in ("draw", "text"):
            raise ValueError(f"CodaEvalOptions: box_encoding: expected 'draw' or 'text', got {self.box_encoding!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CodaEvalOptions":
        """The options of a parsed `mose eval coda` command line."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class CodaEvalResult:
    """What a run computed: `scores` is what scores.json holds (or, with `convert`, what was converted);
    `judge_endpoint_down` when the judge could not be reached (the offline metrics are still there); `exit_code`
    is the command's (1 then, else 0)."""

    scores: dict
    judge_endpoint_down: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.judge_endpoint_down else 0


def evaluate(options: CodaEvalOptions) -> CodaEvalResult:
    """The whole run (module doc: the files written to `options.out`)."""
    from common.atomic import write_json, write_jsonl
    from datasets_cfg.sources.coda_lm import ImportReport
    from eval.coda_prompts import load_official_prompts, own_prompts
    from eval.coda_questions import QuestionBuilder, rows_from
    from eval.coda_scores import SCALE, clean, judge_scores, offline_scores

    out = Path(options.out)
    prompts = load_official_prompts(options.official_prompts) if options.official_prompts else own_prompts()
    report = ImportReport()
    rows, root = rows_from(options.annotations, options.images, options.split, options.skip_invalid, report, strict=options.strict_import)
    builder = QuestionBuilder(prompts, out, box_encoding=options.box_encoding, skip_invalid=options.skip_invalid,
                              lenient=root is None and not options.strict_import, need_images=options.model is not None)
    questions = builder.build(rows, root)
    if not questions:
        raise CodaPredictionsError(f"{options.annotations}: no question to evaluate")
    write_jsonl(out / "questions.jsonl", questions)

    if options.model:
        from eval.coda_generate import Generator

        pred_path = out / "predictions.jsonl"
        Generator(options.model, options.batch_size, options.max_new_tokens, options.device, options.dtype).run(questions, pred_path)
    else:
        pred_path = Path(options.predictions)
    order = scene_order(options.annotations, options.split, questions)
    if pred_path.is_dir():
        from eval.coda_official import is_official, load_official_predictions

        if not is_official(pred_path):
            raise CodaPredictionsError(f"{pred_path}: expected a predictions JSONL, or a folder with the official files "
                                       "general_perception_answer.jsonl / driving_suggestion_answer.jsonl / region_perception_answer.jsonl")
        predictions, pred_report = load_official_predictions(pred_path, questions, order), {"format": "official", "skipped": 0}
    else:
        predictions, pred_report = load_predictions(pred_path, [q["question_id"] for q in questions], options.skip_invalid)
        pred_report["format"] = "ours"
    if options.convert:
        return _convert(options, questions, predictions, order, pred_report)
    missing = len(questions) - sum(q["question_id"] in predictions for q in questions)
    if missing and not options.allow_partial:
        by_task = Counter(q["task"] for q in questions if q["question_id"] not in predictions)
        raise CodaPredictionsError(f"{pred_path}: {missing} of {len(questions)} questions have no prediction ("
                                   + ", ".join(f"{t} {n}" for t, n in sorted(by_task.items())) + "); pass --allow-partial "
                                   "(CodaEvalOptions.allow_partial) to score what is there, marked partial")

    scores = {
        "partial": {"partial": missing > 0, "missing_predictions": missing, "questions": len(questions)},
        "scale": SCALE,  # judge_scores: mean_rating (1-10, official) and score (x 10, published) side by side
        "prompts": prompts.describe() | {"box_encoding": options.box_encoding},
        "inputs": {"annotations": str(options.annotations), "model": None if options.model is None else str(options.model),
                   "predictions": str(pred_path), "annotation_files_skipped": dict(report.skipped), "questions_skipped": dict(builder.skipped_),
                   "import_mode": "strict" if options.strict_import else "lenient", "annotation_warnings": dict(report.warnings),
                   "question_warnings": dict(builder.warnings_),
                   "predictions_skipped": pred_report},
        "counts": dict(Counter(q["task"] for q in questions)),
        "judge": None,
        "judge_scores": None,
    }
    code = 0
    if options.judge_url:
        from eval.coda_judge import JudgeClient, judgement_record

        key = os.environ.get(options.judge_key_env) or None
        if key is None:
            print(f"note: ${options.judge_key_env} is not set; sending no Authorization header", file=sys.stderr)
        client = JudgeClient(options.judge_url, options.judge_model, key, timeout=options.judge_timeout, max_retries=options.judge_retries,
                             backoff=options.judge_backoff, cache_path=options.judge_cache or out / "judge_cache.jsonl",
                             workers=options.judge_workers)
        items = [(q["question_id"], prompts.messages(q["task"], q["reference"], predictions[q["question_id"]]))
                 for q in questions if q["question_id"] in predictions]
        judgements = client.judge_many(items)
        write_jsonl(out / "judgements.jsonl", [judgement_record(qid, judgements[qid]) for qid, _ in items])
        scores["judge"] = client.describe()
        scores["judge_scores"] = judge_scores(questions, predictions, judgements, region_extended=options.region_extended)
        failed = [j for j in judgements.values() if j.status == "failed"]
        if client.endpoint_down_:
            errs = [j.error for j in failed if j.attempts]
            print(f"mose eval coda: error: the judge endpoint {client.public_url_} cannot be reached ({len(failed)} item(s) not judged; "
                  f"last error: {errs[-1] if errs else 'n/a'}). Offline metrics are still written; run the same command again to "
                  "resume (replies already received are cached).", file=sys.stderr)
            code = 1
        elif failed:
            print(f"mose eval coda: warning: {len(failed)} item(s) failed after retries (counted as failed; last error: "
                  f"{failed[-1].error}); a re-run asks only those again.", file=sys.stderr)
    scores["offline"] = offline_scores(questions, predictions)
    scores = clean(scores)
    write_json(out / "scores.json", scores)
    if scores["judge_scores"]:
        plot_scores(scores, out / "scores.png")
    return CodaEvalResult(scores, judge_endpoint_down=code != 0)


def scene_order(annotations, split, questions: list[dict]) -> list[str]:
    """The scene of each official integer id: a CODA-LM split folder's .json file stems in sorted name order
    (stage1_eval_batch.py:177, all files, also ones our import skipped); otherwise the sorted scene ids."""
    path = Path(annotations)
    if path.is_dir() and not (path / "pool.json").is_file():
        from datasets_cfg.sources.coda_lm import split_dir

        folder = split_dir(path, split or path.stem)
        names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))
        if names:
            return [n[: -len(".json")] for n in names]
    return sorted({q["scene_id"] for q in questions})


def _convert(options: CodaEvalOptions, questions, predictions, order, pred_report) -> CodaEvalResult:
    from common.atomic import write_jsonl

    out = Path(options.out)
    if options.convert == "official":
        from eval.coda_official import write_official_predictions

        paths = write_official_predictions(out / "official_predictions", questions, predictions, order)
    else:
        path = out / "predictions_ours.jsonl"
        write_jsonl(path, [{"question_id": q["question_id"], "answer": predictions[q["question_id"]]} for q in questions if q["question_id"] in predictions])
        paths = [path]
    return CodaEvalResult({"converted": {"to": options.convert, "from": pred_report["format"], "predictions": len(predictions),
                                         "files": [str(p) for p in paths]}})


def _print_summary(scores: dict) -> None:
    if "converted" in scores:
        c = scores["converted"]
        print(f"converted {c['predictions']} predictions ({c['from']} -> {c['to']}): " + ", ".join(c["files"]))
        return
    js = scores.get("judge_scores") or {}
    if scores["partial"]["partial"]:
        print(f"PARTIAL: {scores['partial']['missing_predictions']} of {scores['partial']['questions']} questions have no prediction "
              "(--allow-partial); these scores are not comparable with full runs")
    print(f"prompts: {scores['prompts']['source']} ({scores['prompts']['origin']}), box encoding: {scores['prompts']['box_encoding']}")
    fmt = lambda v: "  n/a" if v is None else f"{v:5.2f}"  # noqa: E731
    for task in ("general", "region", "suggestion"):
        off = scores["offline"].get(task)
        if off is None:
            continue
        line = (f"{task:<11} n={off['n']:<5} missing={off['missing']:<4} "
                f"BLEU-4 {fmt(off['bleu4'])}  ROUGE-L {fmt(off['rouge_l'])}  CIDEr-D {fmt(off['cider_d'])}")
        if task in js:
            j = js[task]
            line += (f" | judge mean {fmt(j['mean_rating'])} /10 = score {fmt(j['score'])} (failures as 1: {fmt(j['score_failures_as_1'])}; "
                     f"judged {j['judged']}, unparseable {j['unparseable']}, failed {j['failed']}, lenient-only {j['lenient_only']}, "
                     f"out of 1-10 {j['out_of_range']}" + (f", dropped by the official region table {j['dropped']['questions']}" if task == "region" else "") + ")")
        print(line)
    if "final" in js:
        print(f"final       mean {fmt(js['final']['mean_rating'])} /10 = score {fmt(js['final']['score'])} "
              f"(failures as 1: {fmt(js['final']['score_failures_as_1'])})")
    if js:
        print("scale: mean = the official scripts' 1-10 mean; score = mean x 10, the published tables' scale")
    rec = scores["offline"]["object_recall"]
    print(f"object recall {fmt(rec['recall'])} precision {fmt(rec['precision'])} over {rec['scenes']} scenes")
    wf = rec.get("well_formed")
    if wf:
        print(f"  well-formed answers only: recall {fmt(wf['recall'])} precision {fmt(wf['precision'])} over {wf['scenes']} scenes "
              f"({wf['degenerate']} of {wf['answers']} answers degenerate)")


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="CODA-LM split folder (or LLaVA-format question list), or a ScenePool directory")
    parser.add_argument("--images", help="image root holding val/images/ and test/images/ (CODA-LM annotations only)")
    parser.add_argument("--split", help="split name (default: the annotation folder's name)")
    parser.add_argument("--out", required=True, help="output folder")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="transformers VLM checkpoint (local folder) to generate answers with")
    src.add_argument("--predictions", help='JSONL of {"question_id", "answer"} with our ids ("test_0029:general", "test_0029:region:1", '
                     '"test_0029:suggestion": <annotation file stem>:<task>[:<region key>], as questions.jsonl lists them), or a folder '
                     "with the official files (general_perception_answer.jsonl, driving_suggestion_answer.jsonl, "
                     "region_perception_answer[_w_label].jsonl: integer question_id in sorted-file order, region answers by position "
                     "within their class)")
    parser.add_argument("--official-prompts", metavar="DIR", help="a checkout of DLUT-LYZ/CODA-LM: use its question and judge prompts")
    parser.add_argument("--box-encoding", choices=("draw", "text"), default="draw", help="region box: red rectangle on the image, or normalised text")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--judge-url", help="OpenAI-compatible endpoint base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    parser.add_argument("--judge-model", help="judge model name, e.g. gpt-4o-2024-05-13 (the CODA-LM README's judge)")
    parser.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (never logged or written)")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--judge-retries", type=int, default=4, help="retries per item on transient errors")
    parser.add_argument("--judge-backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each retry)")
    parser.add_argument("--judge-workers", type=int, default=4, help="parallel requests")
    parser.add_argument("--judge-cache", help="judge reply cache (default: OUT/judge_cache.jsonl)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip and count bad scenes / predictions instead of stopping")
    parser.add_argument("--strict-import", action="store_true", help="CODA-LM annotation files: check every field as `mose import coda "
                        "--strict` does (default: what the evaluation reads; the rest counted as warnings in scores.json)")
    parser.add_argument("--allow-partial", action="store_true", help="score even when predictions are missing (default: an error naming "
                        "how many); every output is marked partial")
    parser.add_argument("--region-extended", action="store_true", help="also report our wider region view (every category, unknown ones "
                        "in class 'other'); the region score stays the official table's")
    parser.add_argument("--convert", choices=("ours", "official"), help="write the predictions in that format (OUT/predictions_ours.jsonl, "
                        "or OUT/official_predictions/ with the three official files) and stop: no judge, no scores")


def run(args) -> int:
    from eval.coda_prompts import PromptError

    if bool(args.judge_url) != bool(args.judge_model):
        print("mose eval coda: error: --judge-url and --judge-model go together", file=sys.stderr)
        return 2
    try:
        result = evaluate(CodaEvalOptions.from_args(args))
    except (SchemaError, CodaPredictionsError, PromptError, FileNotFoundError, ValueError) as e:
        print(f"mose eval coda: error: {e}", file=sys.stderr)
        return 1
    if "converted" in result.scores:
        _print_summary(result.scores)
        return 0
    _print_summary(result.scores)
    print(f"wrote {Path(args.out) / 'scores.json'}")
    return result.exit_code
