"""Nothing lost: `refimpl golden -o` and `refimpl diff --json` check the output path first, refuse to overwrite
without --force, never write over a checkpoint's files, and write atomically (a failed write keeps the old file)."""
import os
import shutil

import pytest

from golden_cases import GOLDEN
from refimpl import oracle_cli, safe_write


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "llama_mha"
    shutil.copytree(os.path.join(GOLDEN, "models", "llama_mha"), folder)
    return folder


def golden(model, out, *extra):
    return oracle_cli.main(["golden", str(model), "--ids", "1,17,42", "-o", str(out), *extra])


def refused(capsys, status, message):
    """The CLI's way to refuse: exit 2 and one line on stderr that says why."""
    import re

    err = capsys.readouterr().err
    return status == 2 and re.search(message, err) is not None and err.count("\n") == 1


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_golden_never_writes_over_the_models_own_files(model, name, capsys):
    before = (model / name).read_bytes()
    for extra in ((), ("--force",)):
        assert refused(capsys, golden(model, model / name, *extra), "never writes over a checkpoint")
    assert (model / name).read_bytes() == before


def test_an_existing_pack_is_replaced_only_with_force(model, tmp_path, capsys):
    out = tmp_path / "ref.safetensors"
    assert golden(model, out) == 0
    first = out.read_bytes()
    out.write_bytes(b"an older pack")
    assert refused(capsys, golden(model, out), "exists.*--force")
    assert out.read_bytes() == b"an older pack"
    assert golden(model, out, "--force") == 0
    assert out.read_bytes() == first


@pytest.mark.parametrize("where", ["folder", "missing"])
def test_bad_output_paths_are_refused_before_any_work(model, tmp_path, where, capsys):
    out = tmp_path if where == "folder" else tmp_path / "no" / "such" / "p.safetensors"
    assert refused(capsys, golden(model, out), "is a folder" if where == "folder" else "does not exist")


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "p.bin"
    out.write_bytes(b"previous")

    def write(f):
        f.write(b"half of a new ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        safe_write.write_atomically(out, write)
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["p.bin"]


def test_diff_json_report_is_not_written_over_an_existing_file(model, tmp_path, capsys):
    ref = tmp_path / "ref.safetensors"
    assert golden(model, ref) == 0
    report = tmp_path / "r.json"
    report.write_text("keep me")
    capsys.readouterr()
    assert refused(capsys, oracle_cli.main(["diff", str(ref), str(ref), "--json", str(report)]), "--json .* exists")
    assert report.read_text() == "keep me"
    assert oracle_cli.main(["diff", str(ref), str(ref), "--json", str(report), "--force"]) == 0
    assert report.read_text().startswith("{")
