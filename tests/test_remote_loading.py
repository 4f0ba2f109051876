"""Loading MoSE checkpoints from outside the training code: plain transformers after `import mose` (either import
order), in a fresh process; the expected tokens come from the in-process model that wrote the checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

from tests.test_modeling import _tiny_mose, inputs_for

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = _tiny_mose().eval()
    batch = inputs_for(model.config.base_config, batch=1, seq=10)
    expected = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    model.save_pretrained(path)
    torch.save(batch, path / "batch.pt")
    return path, expected.tolist()


def _run(code: str, cwd=None, env=ENV) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


GENERATE = """
model = AutoModelForImageTextToText.from_pretrained({path!r}{extra}).eval()
batch = torch.load({batch!r})
print(type(model).__name__, model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0).tolist())
"""


@pytest.mark.parametrize("first", ["mose", "transformers"])
def test_import_mose_alone_registers_the_auto_classes(saved, first):
    path, expected = saved
    imports = ["import mose", "from transformers import AutoModelForImageTextToText"]
    if first == "transformers":
        imports.reverse()
    code = "import torch\n" + "\n".join(imports) + GENERATE.format(path=str(path), batch=str(path / "batch.pt"), extra="")
    code += "import sys\nassert 'mose.modeling' in sys.modules\n"
    name, tokens = _run(code).split(" ", 1)
    assert name == "MoSEForConditionalGeneration" and eval(tokens) == expected


def test_import_mose_before_transformers_imports_nothing_heavy():
    code = "import sys, mose\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert _run(code) == "[]"


BLOCK_PROJECT = """
import sys, importlib.abc
PROJECT = {"mose", "common", "datasets_cfg", "curation", "training", "eval", "pipelines"}
class Block(importlib.abc.MetaPathFinder):  # this process cannot import our package, however it is installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in PROJECT:
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
sys.meta_path.insert(0, Block())
try:
    import mose
    raise SystemExit("the block did not work")
except ModuleNotFoundError:
    pass
import torch
from transformers import AutoModelForImageTextToText
"""


def test_checkpoint_loads_with_trust_remote_code_without_our_package(saved, tmp_path):
    path, expected = saved
    config = __import__("json").loads((path / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "mose_config.MoSEConfig",
                                  "AutoModelForImageTextToText": "mose_modeling.MoSEForConditionalGeneration",
                                  "AutoModelForCausalLM": "mose_modeling.MoSEForConditionalGeneration"}
    code = BLOCK_PROJECT + GENERATE.format(path=str(path), batch=str(path / "batch.pt"), extra=", trust_remote_code=True")
    code += "assert type(model).__module__.startswith('transformers_modules.'), type(model).__module__\n"
    code += "assert not [m for m in sys.modules if m.split('.')[0] in PROJECT]\n"
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    name, tokens = _run(code, cwd=tmp_path, env=env).split(" ", 1)
    assert name == "MoSEForConditionalGeneration" and eval(tokens) == expected


def test_without_trust_remote_code_and_without_our_package_the_error_names_the_flag(saved, tmp_path):
    path, _ = saved
    code = BLOCK_PROJECT + f"""
try:
    AutoModelForImageTextToText.from_pretrained({str(path)!r})
except ValueError as exc:
    print("\\n", "trust_remote_code=True" in str(exc))  # after transformers' [y/N] prompt, which stdin answers with EOF
"""
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    assert _run(code, cwd=tmp_path, env=env).strip() == "True"


def test_checkpoint_code_is_the_import_closure_with_only_relative_project_imports(saved):
    import ast

    path, _ = saved
    # by hand from the sources: config -> trajectory_decoders (in a function); modeling -> config, moe,
    # trajectory_decoders; moe -> expert_dispatch; trajectory_decoders -> skill_format -> skills -> common.errors,
    # common.yaml_file (in a function) -> common.errors
    expected = {"mose_config.py", "mose_modeling.py", "mose_moe.py", "mose_expert_dispatch.py", "mose_trajectory_decoders.py",
                "mose_skill_format.py", "mose_skills.py", "common_errors.py", "common_yaml_file.py"}
    assert {p.name for p in path.glob("*.py")} == expected
    project = {"mose", "common", "datasets_cfg", "curation", "training", "eval", "pipelines"}
    for file in path.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in project, (file.name, node.module)
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert f"{node.module}.py" in expected, (file.name, node.module)
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & project, file.name


def test_a_plain_import_of_a_project_module_is_refused_with_the_file_and_line():
    from pathlib import Path

    from mose.remote_code import RemoteCodeError, _project_imports

    with pytest.raises(RemoteCodeError, match=r"fake.py:2: `import mose.skills`"):
        _project_imports("mose.fake", "import os\nimport mose.skills\n", Path("fake.py"))


def test_with_the_package_imported_its_classes_win_even_with_trust_remote_code(saved, tmp_path):
    """transformers prefers a registered class from outside transformers over the checkpoint's code
    (transformers/models/auto/auto_factory.py: `explicit_local_code`; configuration_auto.py likewise)."""
    path, expected = saved
    code = "import torch, mose\nfrom transformers import AutoConfig, AutoModelForImageTextToText\n"
    code += GENERATE.format(path=str(path), batch=str(path / "batch.pt"), extra=", trust_remote_code=True")
    code += f"""
assert type(model).__module__ == "mose.modeling", type(model).__module__
assert type(AutoConfig.from_pretrained({str(path)!r}, trust_remote_code=True)).__module__ == "mose.config"
"""
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    name, tokens = _run(code, env=env).split(" ", 1)
    assert name == "MoSEForConditionalGeneration" and eval(tokens) == expected
