"""The compiler does not carry its lab: the core imports none of the lab's packages, the
project's hard dependencies are torch alone, and nothing in the core imports
``adacorr_compile.lab`` at module level (DESIGN.md section 2, "The compiler does not carry
its lab")."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from adacorr_compile.extras import LAB_PACKAGES, LabMissing, require_lab

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adacorr_compile"
# what installing the core must not bring, and what importing / using it must not load
LAB_MODULES = ("matplotlib", "skimage", "tqdm", "diffusers", "safetensors", "adacorr_compile.lab")

# Runs in a fresh interpreter: imports torch first (torch.hub itself imports tqdm where it is
# installed: that is torch's, not ours), then the package, compiles a model defined here with
# the adacorr backend, runs two steps, and reports the modules loaded after torch.
_CORE_ONLY = r"""
import json, sys
import torch
before = set(sys.modules)
import adacorr_compile
from adacorr_compile.calibrate import load_options


class Block(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x, cond):
        return x + self.mlp(self.norm(x) + cond[:, None])


class Net(torch.nn.Module):
    def __init__(self, dim=16, depth=3):
        super().__init__()
        self.t_embed = torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList([Block(dim) for _ in range(depth)])

    def forward(self, hidden_states, timestep):
        cond = self.t_embed(timestep.float()[:, None] / 1000.0)
        x = hidden_states
        for block in self.blocks:
            x = block(x, cond)
        return x


torch.manual_seed(0)
model = Net().eval()
compiled = torch.compile(model, backend="adacorr", options={"lowering": "eager"})
x = torch.randn(2, 4, 16)
with torch.no_grad():
    for t in (999.0, 500.0):
        out = compiled(hidden_states=x, timestep=torch.full((2,), t))
        ref = model(hidden_states=x, timestep=torch.full((2,), t))
stats = adacorr_compile.stats(compiled)
print(json.dumps({"new": sorted(set(sys.modules) - before), "regions": stats["totals"]["regions"],
                  "close": bool(torch.allclose(out, ref, atol=1e-5))}))
"""


def _top(name: str) -> str:
    return name.partition(".")[0]


def test_core_imports_and_compiles_without_the_lab():
    proc = subprocess.run([sys.executable, "-c", _CORE_ONLY], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["regions"] == 3 and report["close"]
    loaded = [m for m in report["new"]
              if any(m == lab or m.startswith(lab + ".") for lab in LAB_MODULES)]
    assert loaded == [], f"the core loaded the lab's modules: {loaded}"


def test_core_dependencies_are_torch_alone_and_the_extras_name_the_lab():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["torch>=2.11"]
    extras = project["optional-dependencies"]
    lab = {req.split(">")[0].split("=")[0] for req in extras["lab"]}
    assert lab == set(LAB_PACKAGES.values())  # the extra and the names require_lab reports agree
    assert "adacorr_compile[lab,export,bench,serve]" in extras["test"]
    assert any(req.startswith("onnx>") for req in extras["export"])
    assert "cache-dit>=1.5" in extras["bench"]


def _module_level_imports(path: Path) -> list[str]:
    """Modules a file imports at module level (absolute names; relative ones resolved)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in tree.body:  # module level only: lazy imports inside functions are allowed
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return names


def _lab_only(name: str, path: Path) -> bool:
    """``name`` is the lab's: its subpackage, or a package of the lab extra (numpy is also the
    export extra's: onnxruntime's runner in ``export/`` takes it)."""
    if name.startswith("adacorr_compile.lab"):
        return True
    return _top(name) in LAB_PACKAGES and not (_top(name) == "numpy" and "export" in path.relative_to(PACKAGE).parts)


def test_core_never_imports_the_lab_at_module_level():
    core = [p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts]
    assert len(core) > 20
    offenders = {str(p.relative_to(ROOT)): [n for n in _module_level_imports(p) if _lab_only(n, p)] for p in core}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_lab_imports_the_core_modules_not_the_facade():
    """``import adacorr_compile`` then ``adacorr_compile.stats`` goes through ``__init__`` (a cycle
    when ``__init__`` grows); the lab names the module (``adacorr_compile.api``)."""
    lab = list((PACKAGE / "lab").rglob("*.py"))
    bad = {}
    for path in lab:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "adacorr_compile" for a in node.names):
                bad.setdefault(str(path.relative_to(ROOT)), []).append(node.lineno)
            if isinstance(node, ast.ImportFrom) and (node.module == "adacorr_compile" or (node.level == 2 and not node.module)
                                                     or (node.level == 1 and not node.module and path.parent == PACKAGE)):
                bad.setdefault(str(path.relative_to(ROOT)), []).append(node.lineno)
    assert bad == {}


def test_require_lab_names_the_missing_package_and_the_extra():
    require_lab("a test", ["json"])  # importable: nothing raised
    with pytest.raises(LabMissing, match=r'a test needs the lab extra \(no_such_pkg_h1 not installed\): '
                                         r'pip install "adacorr_compile\[lab\]"'):
        require_lab("a test", ["no_such_pkg_h1"])


def test_cli_without_the_lab_exits_with_the_install_command(capsys, monkeypatch):
    """With a lab package missing, ``adacorr demo`` and ``adacorr calibrate --model reference-dit``
    stop before any work with a usage error (exit 2) naming ``pip install "adacorr_compile[lab]"``."""
    import importlib.util

    from adacorr_compile.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    for argv in (["demo", "--steps", "2"], ["calibrate", "--model", "reference-dit", "--steps", "2"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "scikit-image not installed" in err and 'pip install "adacorr_compile[lab]"' in err, err


def test_cli_tiny_family_without_diffusers_names_the_lab_extra(capsys, monkeypatch):
    """``adacorr inspect --model dit`` builds the tiny family from diffusers: without it, one
    usage line naming the family and the extra; ``--model plain`` (torch alone) still runs."""
    from adacorr_compile.cli import main

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers: ModuleNotFoundError; find_spec: None
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--model", "dit"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert '--model dit needs the lab extra (diffusers not installed): pip install "adacorr_compile[lab]"' in err, err
    assert main(["inspect", "--model", "plain"]) == 0
    assert "guarded" in capsys.readouterr().out.lower()
