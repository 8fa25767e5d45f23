"""Imports run downward only: exvideo <- preprocessing, pipelines <- orchestration <- experiments, benchmarks.

Every import statement of the project's packages is read from the source (function-level imports included), so a
lazy import cannot hide an upward dependency. Private names (a leading underscore) stay inside their package;
pipelines' stages (train, generate, evaluate) count as packages of their own for that rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from exvideo.local_cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"exvideo": 0, "preprocessing": 1, "pipelines": 1, "orchestration": 2, "experiments": 3, "benchmarks": 3}


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipelines" and len(parts) > 1 else parts[0]


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every absolute import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    problems = []
    for top, layer in LAYER.items():
        for path in sorted((root / top).rglob("*.py")):
            own = package_of(".".join(path.relative_to(root).with_suffix("").parts))
            for line, module, names in imports(path):
                target = module.split(".")[0]
                if target not in LAYER or target == top:
                    if target != top or package_of(module) == own:
                        continue
                elif LAYER[target] >= layer:
                    problems.append(f"{path.relative_to(root)}:{line}: {top} (layer {layer}) imports {module} "
                                    f"(layer {LAYER[target]}): imports must run downward")
                    continue
                private = [name for name in names if name.startswith("_") and name != "__version__"]
                private += [part for part in module.split(".") if part.startswith("_") and part != "__init__"]
                if private:
                    problems.append(f"{path.relative_to(root)}:{line}: imports private {', '.join(private)} of "
                                    f"{package_of(module)}")
    return problems


def test_imports_run_downward_and_private_names_stay_home():
    assert violations(ROOT) == []


@pytest.mark.parametrize("where, source, expected", [
    ("preprocessing", "from orchestration.spec import load_spec\n", "imports must run downward"),
    ("pipelines/generate", "def f():\n    import preprocessing.run\n", "imports must run downward"),
    ("preprocessing", "from exvideo.unet import _helper\n", "imports private _helper of exvideo"),
    ("pipelines/train", "from pipelines.evaluate.metrics import _scale\n", "imports private _scale of pipelines.evaluate"),
])
def test_the_walk_catches_each_kind(tmp_path, where, source, expected):
    (tmp_path / where).mkdir(parents=True)
    (tmp_path / where / "bad.py").write_text(source)
    (tmp_path / where / "fine.py").write_text(f"from {where.replace('/', '.')}.bad import _own\n")
    (problem,) = violations(tmp_path)
    assert problem.startswith(f"{where}/bad.py:") and expected in problem


def test_reading_a_config_imports_neither_torch_nor_mlflow():
    """Processes that only read configs and specs stay light: Ray Train's controller unpickles the training config,
    `exvideo run` checks a spec (and submits it to a cluster) before any stage runs, and the ground floor is what
    every package imports first. Importing torch, diffusers and MLflow costs a new process ~15 s on a 2-core machine,
    on the critical path of every training run."""
    import subprocess
    import sys

    light = ["exvideo.config", "exvideo.console", "exvideo.families", "exvideo.speed_options", "pipelines.train",
             "pipelines.train.config", "preprocessing.config", "pipelines.generate.params", "pipelines.generate.config",
             "pipelines.evaluate.config", "orchestration.spec"]
    # Loading a spec validates every stage's section and its cross-stage checks, which read the model's family.
    spec = f"orchestration.spec.load_spec({str(ROOT / 'configs' / 'demo.yaml')!r}, ['model={ROOT}'])"
    probe = (f"import sys\nfor name in {light!r}:\n    __import__(name)\nimport orchestration.spec\n"
             f"print({spec}.model_family)\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'mlflow', 'transformers'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["svd", "[]"]


def test_the_cli_refuses_a_bad_spec_or_a_missing_model_without_the_model_libraries(tmp_path):
    """`exvideo run`, a stage command and the demo refuse what they can check in their config (a bad value, a missing
    input, a Ray cluster that does not answer) before they import torch, diffusers, MLflow or Ray (seconds on a small
    machine), and make no folder for a run they refuse."""
    import subprocess
    import sys

    (tmp_path / "corpus.json").write_text("[]")
    spec = {"workdir": str(tmp_path / "work"), "corpus": str(tmp_path / "corpus.json")}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "model": str(tmp_path), "train": {"max_steps": 0}}))
    (tmp_path / "no-model.yaml").write_text(yaml.safe_dump({**spec, "model": str(tmp_path / "missing")}))
    nobody = f"127.0.0.1:{free_port()}"  # a port nothing listens on: no cluster answers there
    (tmp_path / "no-cluster.yaml").write_text(yaml.safe_dump({**spec, "model": str(tmp_path), "ray_address": nobody}))
    commands = [["run", str(tmp_path / "bad.yaml")], ["run", str(tmp_path / "no-model.yaml")],
                ["train", "--set", f"svd_dir={tmp_path}", "--set", "shards=x", "--set", "lr=-1"],
                ["demo", "--set", f"workdir={tmp_path / 'work'}", "--set", "seed=-1"],
                ["preprocess", "--set", f"input={tmp_path / 'corpus.json'}", "--set", f"output={tmp_path / 'work'}",
                 "--set", f"model={tmp_path / 'missing'}"],
                ["generate", "--set", f"input={tmp_path / 'corpus.json'}", "--set", f"output={tmp_path / 'work'}",
                 "--set", f"model={tmp_path}", "--set", f"adapter={tmp_path / 'none.safetensors'}"],
                ["run", str(tmp_path / "no-cluster.yaml")],
                ["train", "--set", f"svd_dir={tmp_path}", "--set", "shards=x", "--set", f"ray_address=ray://{nobody}",
                 "--set", f"storage_path={tmp_path / 'work'}"]]
    probe = (f"import sys\nfrom orchestration.cli import main\nfor argv in {commands!r}:\n    print(main(argv))\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'mlflow', 'ray'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2"] * len(commands) + ["[]"], done.stdout + done.stderr
    errors = done.stderr.splitlines()
    assert "train.max_steps: Input should be greater than or equal to 1 (got 0)" in errors[0]
    assert f"model directory {tmp_path / 'missing'} does not exist" in errors[1]
    assert "lr: Input should be greater than 0" in errors[2]
    assert "seed: Input should be greater than or equal to 0" in errors[3]
    assert f"preprocess: error: model {tmp_path / 'missing'} does not exist (model: local" in errors[4]
    assert f"generate: error: adapter {tmp_path / 'none.safetensors'} does not exist (adapter: " in errors[5]
    assert f"run: error: no Ray cluster answers at {nobody} (" in errors[6]
    assert f"train: error: no Ray cluster answers at ray://{nobody} (" in errors[7]
    assert not (tmp_path / "work").exists()
