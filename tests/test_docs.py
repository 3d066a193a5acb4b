"""The docs cannot drift from the code: every ```python block in docs/ runs, every link resolves, the figures rebuild.

- The ```python blocks of each docs/*.md file run in order, in one namespace, in a fresh Python process (a block
  may monkeypatch refimpl, as oracle.md's broken port does). The working directory mirrors the repository root
  (a temporary folder of symlinks to its entries), so "golden/models/..." resolves as for a reader in the root,
  and a file a block writes (oracle.md writes port.safetensors) lands in the temporary folder, not in the checkout.
  A failing block is reported by file and first line; the traceback's line numbers are the Markdown file's.
  Blocks that are not meant to run are marked ```text or ```console, never ```python. Each block also pastes into a
  plain interactive Python prompt (no blank line inside a def or loop, a blank line after one).
- Every relative link and image in docs/*.md and README.md names a file that exists (and a heading, for #anchors).
- Every `refimpl/FILE.py` `name()` reference names a function or class defined in that file; every link to the
  transformers source names the v4.46.3 tag and, where transformers is installed, a class or function in that file.
- docs/make_figures.py, re-run into a temporary folder, writes the committed docs/figures/*.svg byte for byte.

Run one file's blocks by hand:  python tests/test_docs.py docs/llama.md   (from the repository root)
"""
from __future__ import annotations

import ast
import codeop
import glob
import importlib.util
import os
import re
import subprocess
import sys
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MARKDOWN = DOCS + [os.path.join(ROOT, "README.md")]
FIGURES = os.path.join(ROOT, "docs", "figures")
TRANSFORMERS_URL = "https://github.com/huggingface/transformers/blob/"
TRANSFORMERS_TAG = "v4.46.3"

# Files whose python blocks do not run yet, with the reason. strict: the test fails once they do run, so the entry
# is removed then.
NOT_RUNNABLE = {}


# --- Markdown parsing ---------------------------------------------------------------------------------------------


def fenced_blocks(text):
    """[(language, first code line number (1-based), code)] for every ``` fence at the start of a line."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if language is None:
            if stripped.startswith("```"):
                language, start, lines = stripped[3:].strip() or "plain", number + 1, []
        elif stripped == "```":
            blocks.append((language, start, "\n".join(lines) + "\n"))
            language = None
        else:
            lines.append(line)
    if language is not None:
        raise ValueError(f"a ``` fence opened at line {start - 1} is never closed")
    return blocks


def python_blocks(path):
    with open(path, encoding="utf-8") as f:
        return [(start, code) for language, start, code in fenced_blocks(f.read()) if language == "python"]


def prose(text):
    """The text with fenced blocks blanked (line numbers kept), so code is not read as links."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
NAME_REF = re.compile(r"`([\w./-]+\.py)` `([\w.]+)(?:\(\))?`")


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    with open(path, encoding="utf-8") as f:
        headings = [m.group(1) for m in re.finditer(r"^#+ (.+)$", prose(f.read()), re.M)]
    seen, out = {}, set()
    for h in headings:
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def defined_names(path):
    """Every class and function of a Python file: simple names and dotted qualified names (Class.method, f.inner)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(child.name)
                names.add(prefix + child.name)
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return names


# --- running a file's blocks ------------------------------------------------------------------------------------


def run_blocks(path):
    """Run the python blocks of one Markdown file in order in one namespace; 0 if all pass."""
    shown = os.path.relpath(path, ROOT)
    namespace = {"__name__": "__docs__"}
    for start, code in python_blocks(path):
        try:
            exec(compile("\n" * (start - 1) + code, shown, "exec"), namespace)
        except BaseException:  # noqa: B036 - report any failure with the block it came from
            traceback.print_exc()
            print(f"\n{shown}: the ```python block starting at line {start} failed", file=sys.stderr)
            return 1
    return 0


def mirror_of_root(folder):
    for entry in os.listdir(ROOT):
        os.symlink(os.path.join(ROOT, entry), os.path.join(folder, entry))
    return folder


# --- tests ------------------------------------------------------------------------------------------------------


def doc_params():
    for path in DOCS:
        name = os.path.basename(path)
        marks = [pytest.mark.xfail(reason=NOT_RUNNABLE[name], strict=True)] if name in NOT_RUNNABLE else []
        yield pytest.param(path, id=name, marks=marks)


@pytest.mark.parametrize("path", list(doc_params()))
def test_python_blocks_run(path, tmp_path):
    if not python_blocks(path):
        pytest.skip("no python blocks")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, os.path.abspath(__file__), path], cwd=mirror_of_root(tmp_path),
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]


def test_block_extraction_finds_the_walkthroughs():
    """The extractor sees the walkthroughs' blocks, with their Markdown line numbers."""
    blocks = python_blocks(os.path.join(ROOT, "docs", "llama.md"))
    assert len(blocks) >= 10
    with open(os.path.join(ROOT, "docs", "llama.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    for start, code in blocks:
        assert lines[start - 2].strip() == "```python" and lines[start - 1] == code.splitlines()[0]


def repl_errors(code):
    """Lines at which the plain Python prompt would raise a SyntaxError if `code` were pasted into it, line by line.

    This is what code.InteractiveConsole does, without running anything: a blank line ends a def or loop, and a
    statement typed right after an indented block (with no blank line between) is an error.
    """
    errors, buffer = [], []
    for number, line in enumerate(code.splitlines() + [""], 1):
        buffer.append(line)
        try:
            if codeop.compile_command("\n".join(buffer), "<stdin>", "single") is not None:
                buffer = []
        except (SyntaxError, ValueError, OverflowError):
            errors.append(number)
            buffer = []
    return errors


@pytest.mark.parametrize("path", list(doc_params()))
def test_python_blocks_paste_into_an_interactive_prompt(path):
    bad = [f"line {start + n - 1}" for start, code in python_blocks(path) for n in repl_errors(code)]
    assert not bad, f"{os.path.basename(path)}: pasted into a Python prompt, a SyntaxError at " + ", ".join(bad)


def test_repl_errors_finds_what_the_prompt_rejects():
    assert repl_errors("def f():\n    a = 1\n\n    return a\n") == [4]
    assert repl_errors("for i in range(2):\n    x = i\ny = 1\n") == [3]
    assert repl_errors("for i in range(2):\n    x = i\n\ny = [1,\n     2]\n") == []


def test_fenced_blocks_reports_language_and_line():
    text = "a\n```python\nx = 1\n```\n```text\nnot run\n```\n```\nplain\n```\n"
    assert fenced_blocks(text) == [("python", 3, "x = 1\n"), ("text", 6, "not run\n"), ("plain", 9, "plain\n")]


@pytest.mark.parametrize("path", MARKDOWN, ids=[os.path.relpath(p, ROOT) for p in MARKDOWN])
def test_relative_links_resolve(path):
    with open(path, encoding="utf-8") as f:
        text = prose(f.read())
    broken = []
    for _, target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(resolved):
            broken.append(f"{target}: no such file")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{os.path.relpath(path, ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("path", MARKDOWN, ids=[os.path.relpath(p, ROOT) for p in MARKDOWN])
def test_code_references_name_real_functions(path):
    """`refimpl/ops.py` `rms_norm()` must name a function or class in that file; so must transformers links."""
    with open(path, encoding="utf-8") as f:
        text = prose(f.read())
    bad = []
    for file, name in NAME_REF.findall(text):
        if file.startswith("refimpl/"):
            source = os.path.join(ROOT, file)
            if not os.path.isfile(source):
                bad.append(f"{file}: no such file")
            elif name not in defined_names(source):
                bad.append(f"{file} defines no {name}")
    for label, target in LINK.findall(text):
        ref = NAME_REF.fullmatch(label.strip())
        if ref and not target.startswith("http"):  # [`refimpl/llama.py` `attention()`](../refimpl/llama.py)
            resolved = os.path.relpath(os.path.normpath(os.path.join(os.path.dirname(path), target)), ROOT)
            if resolved != ref.group(1):
                bad.append(f"[{label}] links to {target}")
        if target.startswith(TRANSFORMERS_URL):
            bad.extend(check_transformers_link(label, target))
    assert not bad, f"{os.path.relpath(path, ROOT)}: " + "; ".join(bad)


def check_transformers_link(label, target):
    tag, _, rest = target[len(TRANSFORMERS_URL):].partition("/")
    if tag != TRANSFORMERS_TAG:
        return [f"{target}: link to tag {TRANSFORMERS_TAG}, not {tag}"]
    ref = NAME_REF.fullmatch(label.strip())
    if not ref:
        return []
    file, name = ref.groups()
    relative = rest.partition("#")[0]
    if not relative.startswith("src/transformers/") or os.path.basename(relative) != os.path.basename(file):
        return [f"[{label}] links to {target}"]
    spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return []  # transformers is not installed: the name cannot be checked here
    source = os.path.join(list(spec.submodule_search_locations)[0], relative[len("src/transformers/"):])
    if not os.path.isfile(source):
        return [f"{target}: not in the installed transformers"]
    return [] if name in defined_names(source) else [f"{relative} defines no {name}"]


def test_figures_rebuild_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "docs", "make_figures.py"), "--out", str(tmp_path)],
                   cwd=ROOT, check=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    committed = sorted(os.listdir(FIGURES))
    assert sorted(os.listdir(tmp_path)) == committed
    for name in committed:
        with open(os.path.join(FIGURES, name), "rb") as a, open(os.path.join(tmp_path, name), "rb") as b:
            assert a.read() == b.read(), f"docs/figures/{name} differs from what make_figures.py writes"


def test_figures_are_small_and_embedded():
    names = sorted(os.listdir(FIGURES))
    assert names and all(n.endswith(".svg") for n in names)
    total = sum(os.path.getsize(os.path.join(FIGURES, n)) for n in names)
    assert total < 200_000, f"figures take {total} bytes"
    text = "".join(open(p, encoding="utf-8").read() for p in DOCS)
    assert not [n for n in names if f"figures/{n}" not in text], "a figure no doc shows"


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(run_blocks(os.path.abspath(sys.argv[1])))
