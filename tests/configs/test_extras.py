"""Optional dependencies: the core imports without them, and a missing one names its extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from configs.extras import EXTRAS, MissingExtraError, import_extra


@pytest.mark.parametrize(("module", "extra"), [("mlflow", "mlflow"), ("nvidia.dali.fn", "dali"), ("ray.train", "ray"),
                                               ("deepspeed", "deepspeed")])
def test_missing_dependency_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch, module: str,
                                                      extra: str) -> None:
    # A None entry in sys.modules makes `import` fail, as if the package were not installed.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=rf"install the extra '{extra}': pip install 'resnet-train\[{extra}\]'"):
        import_extra(module)


def test_only_declared_optional_dependencies_are_looked_up() -> None:
    with pytest.raises(KeyError, match="'numpy' is not an optional dependency"):
        import_extra("numpy")


def test_core_packages_import_without_any_heavy_dependency() -> None:
    blocked = ", ".join(repr(m) for m in EXTRAS)
    code = (
        "import sys\n"
        f"for name in ({blocked},): sys.modules[name] = None\n"
        "import configs, data_pipeline, trainer, launch.cli, launch.orchestration.local\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_train_checks_the_extras_its_config_needs_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert main(["train", "launch.runs_dir=/nonexistent/runs"]) == 2
    assert "pip install 'resnet-train[mlflow]'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["train", "tracking.enabled=false"]) == 2
    assert "pip install 'resnet-train[ray]'" in capsys.readouterr().err
