"""benchmarks/prebuilt_info.py: the record that decides whether gpu_check.sh may use a prebuilt
tsgb_ext._C instead of building (another torch build, Python or source tree must be refused)."""
import contextlib
import io
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import prebuilt_info  # noqa: E402


def _run(*args):
    """prebuilt_info's command line, in this process: (exit status, what it printed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = prebuilt_info.main(list(args))
    return rc, buf.getvalue()


@pytest.fixture
def prebuilt(tmp_path):
    so = tmp_path / "tsgb_ext" / prebuilt_info.so_name()
    so.parent.mkdir()
    so.write_bytes(b"not really a shared object")
    rc, out = _run("write", str(tmp_path), prebuilt_info.src_hash())
    assert rc == 0, out
    return tmp_path


def test_check_accepts_a_matching_record(prebuilt):
    rec = prebuilt_info.read(str(prebuilt / prebuilt_info.INFO))
    assert rec["torch_git_version"] == torch.version.git_version
    assert rec["ext_suffix"] in prebuilt_info.so_name()
    rc, out = _run("check", str(prebuilt))
    assert rc == 0 and "matches" in out, out


@pytest.mark.parametrize("key,value,message", [
    ("torch_git_version", "0" * 40, "torch git_version"),
    ("ext_suffix", ".cpython-99-x86_64-linux-gnu.so", "extension suffix"),
    ("src_hash", "0123456789abcdef", "sources changed"),
])
def test_check_refuses_another_build(prebuilt, key, value, message):
    path = prebuilt / prebuilt_info.INFO
    rec = prebuilt_info.read(str(path))
    rec[key] = value
    path.write_text("".join(f"{k}={v}\n" for k, v in rec.items()))
    rc, out = _run("check", str(prebuilt))
    assert rc == 3 and "NOT USABLE" in out and message in out, out


def test_check_refuses_a_missing_file(tmp_path):
    rc, out = _run("check", str(tmp_path))
    assert rc == 3 and "device_prebuild.sh" in out, out


def test_write_refuses_sources_changed_during_the_build(tmp_path):
    rc, out = _run("write", str(tmp_path), "ffffffffffffffff")
    assert rc == 3 and "changed during the build" in out, out
    assert not (tmp_path / prebuilt_info.INFO).exists()


def test_src_hash_follows_the_sources(tmp_path):
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("setup()\n")
    src = tmp_path / "csrc" / "cpu" / "a.cpp"
    src.write_text("int a;\n")
    (tmp_path / "csrc" / "notes.txt").write_text("not a source\n")
    h0 = prebuilt_info.src_hash(str(tmp_path))
    (tmp_path / "csrc" / "notes.txt").write_text("changed, still not a source\n")
    assert prebuilt_info.src_hash(str(tmp_path)) == h0
    src.write_text("int b;\n")
    assert prebuilt_info.src_hash(str(tmp_path)) != h0
