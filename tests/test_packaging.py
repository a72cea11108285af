"""Packaging, checked without building anything: declared dependencies, shipped files, extras.

The wheel itself (built, installed into a fresh venv, both federations run from it) is tested in
``test_wheel.py``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
#: imported only inside a function that raises a clear "pip install ..." error without it
OPTIONAL_UNDECLARED = {"transformers"}  # text.encoder: pretrained (fedsynth.models.text)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _declared() -> set[str]:
    names = {_norm(r.name) for r in _requirements()}
    for extra in PYPROJECT["project"]["optional-dependencies"]:
        names |= {_norm(r.name) for r in _requirements(extra)}
    return names


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the fedsynth files that import it (stdlib and fedsynth left out)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "fedsynth").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "fedsynth" and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared() -> None:
    declared = _declared()
    owners = importlib.metadata.packages_distributions()
    missing = []
    for module, files in sorted(_third_party_imports().items()):
        if module in OPTIONAL_UNDECLARED:
            continue
        dists = owners.get(module)
        assert dists, f"'{module}' (imported by {sorted(files)}) is not installed here: declare it and install it"
        if not any(_norm(d) in declared for d in dists):
            missing.append(f"{module} ({', '.join(dists)}; imported by {', '.join(sorted(files))})")
    assert not missing, "imported but declared neither in dependencies nor in an extra: " + "; ".join(missing)


def test_torch_is_a_range_and_extras_split_the_backends() -> None:
    torch = next(r for r in _requirements() if r.name == "torch")
    assert not any(s.operator in ("==", "===") for s in torch.specifier), f"exact torch pin in the metadata: {torch}"
    assert "2.13.0" in torch.specifier  # the build the README and .ci/run install
    extras = {name: {_norm(r.name) for r in _requirements(name)} for name in PYPROJECT["project"]["optional-dependencies"]}
    assert {"flwr"} <= extras["flower"] and "openfl" not in extras["flower"]
    assert {"openfl", "pandas"} <= extras["openfl"] and "flwr" not in extras["openfl"]
    assert "nilearn" in extras["demo"] and "nilearn" not in {_norm(r.name) for r in _requirements()}
    assert "opacus" in extras["privacy"] and "pyradiomics-bhklab" in extras["eval"]
    assert extras["federated"] == {"fedsynth"}
    dev = next(r for r in _requirements("dev") if r.name == "fedsynth")
    assert set(dev.extras) >= {"flower", "openfl", "privacy", "eval", "demo"}
    assert {"pytest", "pytest-timeout"} <= extras["dev"]


def test_shipped_folders_resolve_and_carry_their_files() -> None:
    from fedsynth.federated.openfl.workspace import plans_dir, template_dir
    from fedsynth.resources import DATA_PACKAGES, resource_dir

    assert (ROOT / "fedsynth" / "py.typed").is_file()
    assert plans_dir() == ROOT / "plans"  # a checkout reads its own plans/ (the source of truth)
    assert (template_dir() / ".workspace").is_file() and (template_dir() / "plan" / "plan.yaml").is_file()
    assert (resource_dir("flower-site") / "start-supernode.sh").is_file()
    assert (resource_dir("flower-site") / "data.yaml").is_file()
    assert (resource_dir("flower-aggregator") / "start-superlink.sh").is_file()
    # every file of a shipped folder matches a package_data pattern of setup.py (else the wheel lacks it)
    setup = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    mapping = ast.literal_eval(next(n.value for n in setup.body if isinstance(n, ast.Assign)
                                    and getattr(n.targets[0], "id", "") == "DATA_PACKAGES"))
    assert set(mapping) == {package for package, _ in DATA_PACKAGES.values()}
    for package, folder in mapping.items():
        assert {package: folder} == {p: f for p, f in DATA_PACKAGES.values() if p == package}
        for path in (ROOT / folder).rglob("*"):
            rel = path.relative_to(ROOT / folder)
            if not path.is_file() or "__pycache__" in rel.parts or rel.name == "__init__.py":
                continue
            assert any(rel.match(pattern) for pattern in package_data[package]), \
                f"{folder}/{rel} matches no package_data pattern of {package} in setup.py"


def test_no_top_level_package_shadows_openfl_commands() -> None:
    """``fx`` imports its command modules by bare name (aggregator, collaborator, plan, ...), so a
    top-level package of that name in the checkout breaks it whenever the checkout is on sys.path."""
    openfl = pytest.importorskip("openfl")

    commands = {p.stem for p in (Path(openfl.__file__).parent / "interface").glob("*.py")}
    shadowing = [d.name for d in ROOT.iterdir() if d.name in commands and (d / "__init__.py").exists()]
    assert not shadowing, f"top-level packages {shadowing} shadow OpenFL's fx commands: remove their __init__.py"


def test_templates_command_copies_a_site_kit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsynth.cli import main
    from fedsynth.families import family_names

    assert main(["templates", "flower-site", "-o", str(tmp_path / "site")]) == 0
    script = tmp_path / "site" / "start-supernode.sh"
    assert script.is_file() and script.stat().st_mode & 0o111 and (tmp_path / "site" / "data.yaml").is_file()
    for family in family_names():  # every registered family has its OpenFL workspace
        ws = tmp_path / f"ws-{family}"
        assert main(["templates", f"openfl-{family}", "-o", str(ws)]) == 0
        assert (ws / "plan" / "plan.yaml").is_file() and (ws / ".workspace").is_file()
        assert f"family: {family}" in (ws / "plan" / "fedsynth.yaml").read_text(encoding="utf-8")
        assert not (ws / "__init__.py").exists()
    capsys.readouterr()
    assert main(["templates", "flower-site", "-o", str(tmp_path / "site")]) == 2  # not empty: refused
    assert "not an empty folder" in capsys.readouterr().err


def test_superlink_template_is_the_shipped_file_with_every_address_a_variable(tmp_path: Path) -> None:
    """``fedsynth templates flower-aggregator`` writes aggregator/flower/start-superlink.sh as is; the
    three addresses and both folders are variables whose defaults are the aggregator guide's command."""
    import os
    import subprocess

    from fedsynth.cli import main

    assert main(["templates", "flower-aggregator", "-o", str(tmp_path / "agg")]) == 0
    shipped, script = ROOT / "aggregator" / "flower" / "start-superlink.sh", tmp_path / "agg" / "start-superlink.sh"
    assert script.read_bytes() == shipped.read_bytes() and script.stat().st_mode & 0o111
    assert not re.search(r"\d+\.\d+\.\d+\.\d+:\d+", shipped.read_text(encoding="utf-8").split("exec ", 1)[1]), \
        "an address written into the command instead of a variable"
    stub = tmp_path / "bin" / "flower-superlink"  # prints its arguments instead of listening anywhere
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n', encoding="utf-8")
    stub.chmod(0o755)

    def argv(**values: str) -> list[str]:
        env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "CERTS": "/c",
               "STATE": str(tmp_path / "state"), **values}
        return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True,
                              timeout=30).stdout.split()

    def option(args: list[str], name: str) -> str:
        return args[args.index(name) + 1]

    ports = {"FLEET": "127.0.0.1:1001", "SERVERAPPIO": "127.0.0.1:1002", "CONTROL": "127.0.0.1:1003"}
    options = {"FLEET": "--fleet-api-address", "SERVERAPPIO": "--serverappio-api-address", "CONTROL": "--control-api-address"}
    args = argv(**ports)
    assert {var: option(args, opt) for var, opt in options.items()} == ports
    assert option(args, "--ssl-ca-certfile") == "/c/ca.crt" and option(args, "--database") == str(tmp_path / "state" / "superlink.db")
    guide = (ROOT / "aggregator" / "README.md").read_text(encoding="utf-8")
    defaults = argv()
    for opt in options.values():  # the defaults are the addresses of the guide's own command
        assert f"{opt} {option(defaults, opt)}" in guide, opt


def test_missing_nilearn_names_the_demo_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsynth.data.brains import load_canonical
    from fedsynth.errors import DataError

    monkeypatch.setitem(sys.modules, "nilearn", None)
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    with pytest.raises(DataError, match=r"fedsynth\[demo\]"):
        load_canonical("mni152")


@pytest.mark.parametrize("backend, module, extra", [("flower", "flwr", "flower"), ("openfl", "openfl", "openfl")])
def test_a_missing_backend_names_its_extra(backend: str, module: str, extra: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsynth.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    rc = main(["federate", backend, "-c", str(tmp_path / "c.yaml"), "--site", f"site1={tmp_path / 'a.csv'}",
               "-o", str(tmp_path / "run")])
    assert rc == 2 and f"pip install 'fedsynth[{extra}]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
