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
