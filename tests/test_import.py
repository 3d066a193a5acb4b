import subprocess
import sys

from golden_cases import ROOT


def test_import_needs_numpy_only():
    """`import refimpl` loads NumPy and the standard library, nothing heavier (sentencepiece is lazy)."""
    code = ("import sys, refimpl; heavy = {'torch', 'transformers', 'numba', 'cupy', 'scipy', 'safetensors', "
            "'sentencepiece', 'tokenizers', 'gguf', 'regex'}; print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_public_classes():
    import refimpl

    for name in ("LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification", "OpenLlamaModel",
                 "OpenLlamaForCausalLM", "OpenLlamaForSequenceClassification", "OPTModel", "OPTForCausalLM",
                 "OPTForSequenceClassification", "OPTForQuestionAnswering", "load", "load_tokenizer"):
        assert hasattr(refimpl, name), name


# --- the seam between refimpl and accel, held over the import graph ---------------------------------------------------

import ast  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402


def imports_of(path):
    """(module named, line, enclosing function or None) for every import statement of a file, relative ones
    resolved against its package."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - child.level + 1]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module
                found.append((name, child.lineno, function))
            visit(child, inner)

    visit(tree, None)
    return found


def python_files(folder):
    for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
        for name in sorted(names):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def test_refimpl_reaches_accel_only_through_accel_package():
    """No refimpl module imports accel by name; the one way in is refimpl.accel_package() (refimpl/__init__.py),
    which load(backend="numba" | "cuda") and the CLI's inspect / bench / compile notice call."""
    for path in python_files("refimpl"):
        for name, line, _ in imports_of(path):
            assert name.split(".")[0] not in ("accel", "refimpl_accel"), f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
        if path.endswith(os.path.join("refimpl", "__init__.py")):
            source = open(path, encoding="utf-8").read()
            assert source.count("importlib.import_module(ACCEL)") == 1


def test_import_refimpl_does_not_import_accel():
    code = "import sys, refimpl; print(sorted(m for m in sys.modules if m.split('.')[0] in ('accel', 'refimpl_accel')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_accels_layers_import_downward():
    """accel's layout: the cpu and cuda backends share formats, packing, kv_cache, plan, models, generate; neither
    backend imports the other's kernels, except that cuda uploads the host Weight the one packer makes
    (accel.cpu.linear.Weight); nothing in accel imports the tests' support code."""
    for path in python_files("accel"):
        rel = os.path.relpath(path, ROOT)
        for name, line, _ in imports_of(path):
            assert not name.startswith(("support", "tests")), f"{rel}:{line} imports {name}"
            if rel.startswith(os.path.join("accel", "cpu")):
                assert not name.startswith("accel.cuda"), f"{rel}:{line} imports {name}"
            if rel.startswith(os.path.join("accel", "cuda")) and name.startswith("accel.cpu"):
                assert name == "accel.cpu.linear", f"{rel}:{line} imports {name}"


def test_accel_is_imported_by_its_installed_name_only():
    """accel/ is installed as refimpl_accel (pyproject.toml); a bare `import accel` (which works from the repository
    root only) would load every module a second time under another name."""
    for folder in ("tests", "bench", "golden", "docs", "accel", "refimpl"):
        for path in python_files(folder):
            for name, line, _ in imports_of(path):
                if not path.startswith(os.path.join(ROOT, "accel")):  # relative imports there resolve to "accel."
                    assert name.split(".")[0] != "accel", f"{os.path.relpath(path, ROOT)}:{line} imports {name}"


def test_pyproject_installs_every_package_folder():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setup = tomllib.load(f)["tool"]["setuptools"]
    found = set()
    for top, name in (("refimpl", "refimpl"), ("accel", "refimpl_accel")):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                rel = os.path.relpath(folder, os.path.join(ROOT, top))
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    assert set(setup["packages"]) == found
    assert setup["package-dir"] == {"refimpl_accel": "accel"}


def test_the_two_backends_have_the_same_module_names():
    cpu = {n for n in os.listdir(os.path.join(ROOT, "accel", "cpu")) if n.endswith(".py")}
    cuda = {n for n in os.listdir(os.path.join(ROOT, "accel", "cuda")) if n.endswith(".py")}
    shared = {"__init__.py", "ops.py", "linear.py", "attention.py", "forward.py"}
    assert shared <= cpu and shared <= cuda
