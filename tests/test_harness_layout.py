"""The test suite's own house plan, read from the source with ast: the native-required switch
TSGB_REQUIRE_NATIVE is read in one place (tests/conftest.py), and every op test file
(tests/test_op_*.py) goes through conftest's require_native, so a missing tsgb_ext._C skips
it, or fails it when TSGB_REQUIRE_NATIVE=1 (the last test checks that switch itself)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
KEY = "TSGB_" + "REQUIRE_NATIVE"  # spelt in two parts: this file does not read it
SKIP_DIRS = {".git", "build", "dist", "node_modules", "__pycache__", ".eggs"}


def _python_files():
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def _reads_switch(path):
    """Lines where the source names TSGB_REQUIRE_NATIVE as a string (an environment key);
    docstrings and comments that mention it are longer strings, not counted."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and n.value == KEY]


def test_require_native_switch_read_only_in_conftest():
    conftest = os.path.join(TESTS, "conftest.py")
    bad = [f"{os.path.relpath(p, ROOT)}:{line}" for p in _python_files() if p != conftest
           for line in _reads_switch(p)]
    assert not bad, "TSGB_REQUIRE_NATIVE read outside tests/conftest.py: " + ", ".join(bad)
    assert _reads_switch(conftest), "tests/conftest.py no longer reads TSGB_REQUIRE_NATIVE"


OP_TESTS = sorted(f for f in os.listdir(TESTS) if f.startswith("test_op_") and f.endswith(".py"))


@pytest.mark.parametrize("name", OP_TESTS)
def test_op_test_files_call_require_native(name):
    tree = ast.parse(open(os.path.join(TESTS, name), encoding="utf-8").read())
    calls = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
             and getattr(n.value.func, "id", None) == "require_native"]
    assert calls, f"tests/{name} does not call conftest's require_native() at module level"


def test_require_native_skips_or_fails(monkeypatch):
    """The switch itself: without the compiled ops (or without a named op) require_native
    skips, and fails under TSGB_REQUIRE_NATIVE=1; with them it does nothing."""
    import conftest
    import tsgb_ext
    conftest.require_native()  # this run has the compiled ops, or this module was skipped
    for flag, outcome in ((False, pytest.skip.Exception), (True, pytest.fail.Exception)):
        monkeypatch.setattr(conftest, "REQUIRE_NATIVE", flag)
        with pytest.raises(outcome, match="without no_such_op"):
            conftest.require_native("no_such_op")
        with monkeypatch.context() as m:
            m.setattr(tsgb_ext, "native_available", lambda *a, **k: False)
            with pytest.raises(outcome, match="not available"):
                conftest.require_native()
