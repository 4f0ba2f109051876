import json
import subprocess
import sys

from mose import __version__
from pipelines.cli import COMMANDS, main


def test_help_lists_every_subcommand_without_heavy_imports():
    code = "import sys; from pipelines.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass\nprint(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for words in COMMANDS:
        assert words[0] in out
    assert out.strip().splitlines()[-1] == "[]"  # nothing heavy imported for --help


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"mose {__version__}"


def test_missing_module_says_not_built(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, ("demo",), ("eval.no_such_module_here", "x"))
    assert main(["demo"]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_pool_summary(tmp_path, capsys):
    from datasets_cfg.schema import ScenePool
    from tests.test_schema import turning_row

    ScenePool.from_rows([turning_row("a"), {**turning_row("b"), "source": "synthetic", "qa": []}]).save(tmp_path / "p")
    assert main(["pool", str(tmp_path / "p"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scenes"] == 2 and info["by_source"] == {"real": 1, "synthetic": 1}
    assert info["qa_by_task"] == {"region": 1} and info["by_weather"] == {"rainy": 2}


def test_pool_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["pool", str(tmp_path / "missing")]) == 2
    assert "mose pool: error:" in capsys.readouterr().err
    (tmp_path / "bad" / "scenes").mkdir(parents=True)
    (tmp_path / "bad" / "pool.json").write_text("{not json")
    assert main(["pool", str(tmp_path / "bad")]) == 2
    assert "mose pool: error:" in capsys.readouterr().err


def test_deepspeed_launcher_local_rank_is_moved_to_env(monkeypatch, capsys):
    from pipelines.cli import _strip_launcher_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _strip_launcher_rank(["--local_rank=3", "train", "--config", "c.yaml"]) == ["train", "--config", "c.yaml"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert _strip_launcher_rank(["--local-rank", "1", "pool", "x"]) == ["pool", "x"] and os.environ["LOCAL_RANK"] == "1"
