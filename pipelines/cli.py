"""The `mose` command (console script `mose = "pipelines.cli:main"`; also `python -m pipelines.cli`, e.g. under a launcher).

Each subcommand lives in its own module that defines `add_arguments(parser)` and `run(args) -> int`;
the module is imported only when that subcommand runs, so `mose --help` imports nothing heavy. The registry names
modules of every package by string, which is why it lives in the application layer: nothing imports `pipelines`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from mose import __version__

# (command words) -> (module, one-line help). Groups ("eval", "import") are built from the first word.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("pipelines.demo", "run the whole pipeline end to end on simulator scenes and write a report"),
    ("simulate",): ("datasets_cfg.sim.corpus", "generate real and synthetic driving scenes with highway-env"),
    ("import", "navsim"): ("datasets_cfg.sources.navsim", "convert OpenScene/NAVSIM log pickles into a ScenePool"),
    ("import", "coda"): ("datasets_cfg.sources.coda_lm", "convert CODA-LM annotation JSON into a ScenePool"),
    ("pool",): ("datasets_cfg.pool_cli", "summarise a ScenePool directory"),
    ("skills",): ("datasets_cfg.skill_annotation", "annotate a pool's QA items and scenes with skills and report coverage"),
    ("presets",): ("mose.presets", "list model presets with total and activated parameter counts"),
    ("curate",): ("pipelines.curate", "select scenes for training (random, coreset, uncertainty, mosaic, sead, plan)"),
    ("train",): ("training.cli", "run the training stages (align, router pretraining, skill tuning)"),
    ("plan",): ("eval.plan_cli", "plan every scene of a pool with a checkpoint and write NAVSIM predictions"),
    ("eval", "navsim"): ("eval.navsim.cli", "score trajectories with the standalone NAVSIM PDMS/EPDMS scorer"),
    ("eval", "coda"): ("eval.coda_lm", "CODA-LM corner-case reasoning: generate, judge, score"),
}

GROUP_HELP = {
    "import": "convert a real dataset format into a ScenePool",
    "eval": "evaluate a model or predictions",
}


class _LazyCommand:
    """Defers the subcommand module import until its arguments are needed."""

    def __init__(self, module: str):
        self.module = module

    def load(self):
        try:
            return importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name and self.module.startswith(exc.name) or exc.name == self.module:
                return None  # not built yet
            raise


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mose", description="MoSE: skill-routed MoE VLMs for driving, with data curation.")
    parser.add_argument("--version", action="version", version=f"mose {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, (module, help_text) in COMMANDS.items():
        if len(words) == 1:
            target = sub
        else:
            if words[0] not in groups:
                gp = sub.add_parser(words[0], help=GROUP_HELP[words[0]])
                groups[words[0]] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            target = groups[words[0]]
        p = target.add_parser(words[-1], help=help_text, description=help_text)
        p.set_defaults(_command=_LazyCommand(module), _words=words)
        # Only the module of the command actually invoked is imported, to add its arguments.
        if _invoked(argv, words):
            mod = p.get_default("_command").load()
            if mod is not None:
                mod.add_arguments(p)
    return parser


def _invoked(argv: list[str], words: tuple[str, ...]) -> bool:
    positional = [a for a in argv if not a.startswith("-")]
    return tuple(positional[: len(words)]) == words


def _strip_launcher_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher passes `--local_rank=N` (or `--local-rank N`) before the subcommand; torchrun and
    accelerate use the LOCAL_RANK environment variable. Move the flag into the environment so every launcher works."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        for flag in ("--local_rank", "--local-rank"):
            if a == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                i += 2
                break
            if a.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
                i += 1
                break
        else:
            out.append(a)
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _strip_launcher_rank(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 0 if not argv else 2
    mod = args._command.load()
    if mod is None:
        print(f"mose {' '.join(args._words)}: not built yet (module {args._command.module} is missing).", file=sys.stderr)
        return 2
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
