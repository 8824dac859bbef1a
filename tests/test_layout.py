"""The package's house plan: imports point one way (cli -> data / evaluation / viz -> core, io
-> convert, ops), nothing imports cli, no module imports another module's private name, there
is no import cycle, no function is longer than 80 lines, backend capabilities are declared on
one base class and never probed, and each module has one import path. Read from the source
with ast (nothing is imported), except the checks that need the objects themselves (the public
reader lives in the library layer, the backends' classes, the deprecated shims warn)."""
import ast
import os

import pytest

PKG = "tsgb_ext"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PKG)

# layer of each top-level part (a module may import only from its own part or lower layers)
LAYERS = {"cli": 4, "data": 3, "evaluation": 3, "viz": 3, "core": 2, "io": 2, "convert": 1,
          "ops": 0}


def _modules():
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))
                name = rel[:-3].replace(os.sep, ".")
                if name.endswith(".__init__"):
                    name = name[: -len(".__init__")]
                out[name] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _resolve(mod, level, target):
    """Absolute name of a (possibly relative) import in module ``mod``."""
    if level == 0:
        return target
    is_pkg = MODULES[mod].endswith("__init__.py")
    parts = mod.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(mod):
    """(imported module, imported name or None, line) for every import of tsgb_ext code."""
    tree = ast.parse(open(MODULES[mod], encoding="utf-8").read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PKG:
                    out.append((a.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, node.level, node.module or "")
            if base.split(".")[0] != PKG:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:
                    out.append((sub, None, node.lineno))
                else:
                    out.append((base, a.name, node.lineno))
    return out


def _part(mod):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def test_layout_has_the_planned_parts():
    for part in LAYERS:
        assert f"{PKG}.{part}" in MODULES or os.path.exists(os.path.join(ROOT, part + ".py")), part


def test_imports_point_one_way():
    bad = []
    for mod in MODULES:
        src = _part(mod)
        if src is None or src not in LAYERS:
            continue
        for target, _, line in _imports(mod):
            dst = _part(target)
            if dst is None or dst not in LAYERS or dst == src:
                continue
            if LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{mod}:{line} imports {target} ({src} -> {dst})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_nothing_imports_cli():
    bad = sorted({f"{mod}:{line} imports {t}" for mod in MODULES if _part(mod) != "cli"
                  for t, _, line in _imports(mod) if _part(t) == "cli"})
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for mod in MODULES:
        for target, name, line in _imports(mod):
            if name is None or not name.startswith("_") or name.startswith("__") or name == "_C":
                continue  # (_C: the compiled extension module, loaded by ops/)
            if target != mod:
                bad.append(f"{mod}:{line} imports private {name} from {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ importing its own submodules is how packages expose names
    for m in graph:
        graph[m] = {t for t in graph[m] if not (MODULES[m].endswith("__init__.py")
                                                and t.startswith(m + "."))}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(graph[m]):
            visit(t)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_map_reader_and_store_are_library_code_not_cli():
    import tsgb_ext
    from tsgb_ext import io
    for obj in (tsgb_ext.open_maps, io.open_maps, io.MapStore, io.MapSet):
        assert obj.__module__.startswith("tsgb_ext.io."), obj
        assert not obj.__module__.startswith("tsgb_ext.cli"), obj
    assert "tsgb_ext.cli._store" not in MODULES


CAPABILITIES = ("supports_fusion", "supports_conv_relu", "supports_max_pool", "reuses_memory")
HOOKS_PKG = os.path.join(os.path.dirname(ROOT), "python", "tsgb_hooks")


def _sources():
    """(name, path) of every module of tsgb_ext and tsgb_hooks."""
    out = sorted(MODULES.items())
    for f in sorted(os.listdir(HOOKS_PKG)):
        if f.endswith(".py"):
            out.append((f"tsgb_hooks.{f[:-3]}", os.path.join(HOOKS_PKG, f)))
    return out


def test_capabilities_are_declared_not_probed():
    """A backend's optional ops are read as properties of its class (tsgb_hooks.Backend), never
    probed with getattr / hasattr."""
    bad = []
    for mod, path in _sources():
        for n in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                    and n.func.id in ("getattr", "hasattr") and len(n.args) >= 2
                    and isinstance(n.args[1], ast.Constant) and n.args[1].value in CAPABILITIES):
                bad.append(f"{mod}:{n.lineno} {n.func.id}(..., {n.args[1].value!r})")
    assert not bad, "\n".join(bad)


def test_both_backends_declare_every_capability_on_one_base_class():
    import tsgb_hooks
    from tsgb_hooks.backend import Backend
    from tsgb_ext.core import backend
    assert isinstance(backend.HOOKS, Backend) and backend.HOOKS is tsgb_hooks.BACKEND
    for cap in CAPABILITIES:
        assert isinstance(getattr(Backend, cap), property), cap
        assert getattr(backend.HOOKS, cap) is False, cap
    if backend.native_available():
        native = backend.native_backend()
        assert isinstance(native, Backend)
        assert all(getattr(native, cap) is True for cap in CAPABILITIES)


def test_one_import_path_per_module():
    """No import hook gives a module a second name: the package has no meta-path finder, and
    the only other spellings are the deprecated flat modules of MOVED, each a module that
    warns (DeprecationWarning) and hands on the module itself."""
    import importlib
    import sys
    import warnings

    import tsgb_ext
    src = open(MODULES[PKG], encoding="utf-8").read()
    assert "meta_path" not in src and "MetaPathFinder" not in src
    assert not [f for f in sys.meta_path if type(f).__module__.startswith(PKG)]
    shims = {m.rpartition(".")[2] for m in MODULES if m.count(".") == 1
             and "alias(__name__" in open(MODULES[m], encoding="utf-8").read()}
    assert shims == set(tsgb_ext.MOVED)
    for old, new in tsgb_ext.MOVED.items():
        if old == "captum" and importlib.util.find_spec("captum") is None:
            continue
        sys.modules.pop(f"{PKG}.{old}", None)
        tsgb_ext.__dict__.pop(old, None)
        with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
            mod = importlib.import_module(f"{PKG}.{old}")
        assert mod is importlib.import_module(new)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert importlib.import_module(new).__name__ == new  # the new spelling is quiet


def test_the_docs_teach_only_the_new_spellings():
    import re

    import tsgb_ext
    root = os.path.dirname(ROOT)
    docs = [os.path.join(root, "README.md")] + [
        os.path.join(root, "docs", f) for f in sorted(os.listdir(os.path.join(root, "docs")))
        if f.endswith(".md")]
    flat = "|".join(tsgb_ext.MOVED)
    pattern = re.compile(rf"tsgb_ext\.({flat})\b|from tsgb_ext import [\w, ]*\b({flat})\b")
    bad = []
    for path in docs + [p for _, p in sorted(MODULES.items())]:
        for i, line in enumerate(open(path, encoding="utf-8"), 1):
            if pattern.search(line) and "deprecated" not in line.lower():
                bad.append(f"{os.path.relpath(path, root)}:{i}: {line.strip()}")
    # the shims name themselves in their one docstring line
    bad = [b for b in bad if not b.startswith(tuple(f"tsgb_ext/{m}.py" for m in tsgb_ext.MOVED))]
    assert not bad, "\n".join(bad)


def test_names_are_not_used_twice_for_different_things():
    from tsgb_ext.cli import _common, demo, explain
    from tsgb_ext.core import backend
    from tsgb_ext.evaluation import benchmarks
    assert _common.BACKENDS is backend.BACKENDS
    assert not hasattr(benchmarks, "list_images") or benchmarks.list_images.__module__ == \
        "tsgb_ext.io.images"
    for mod in (demo, explain):  # one integer-argument parser, in _common
        src = open(mod.__file__, encoding="utf-8").read()
        assert "def _int_at_least" not in src and "def _positive_top_k" not in src
        assert "ArgumentTypeError(f\"must be an integer" not in src


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_function_longer_than_80_lines(mod):
    """(Was 120 lines; issue 22 lowered it.)"""
    tree = ast.parse(open(MODULES[mod], encoding="utf-8").read())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{mod}: " + ", ".join(long)


def test_private_methods_are_called_only_inside_their_module():
    """The Captum adapter (and every other module) uses the explainer's public methods:
    ``relevance`` for per-element relevance, not ``TSGB._explain``."""
    bad = []
    for mod, path in sorted(MODULES.items()):
        if mod == "tsgb_ext.core.explainer":
            continue
        for n in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if (isinstance(n, ast.Attribute) and n.attr in ("_explain", "_run")
                    and not (isinstance(n.value, ast.Name) and n.value.id == "self")):
                bad.append(f"{mod}:{n.lineno} .{n.attr}")
    assert not bad, "\n".join(bad)


def test_the_captum_adapter_is_the_public_relevance():
    import inspect

    import torch

    import tsgb_ext
    captum = pytest.importorskip("tsgb_ext.evaluation.captum")
    assert "explainer.relevance(" in inspect.getsource(captum.TSGBAttribution.attribute)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 5)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ex = tsgb_ext.TSGB(net, backend="hooks")
    rel = ex.relevance(x, [1, 3])
    assert rel.shape == x.shape
    torch.testing.assert_close(rel.sum(1, keepdim=True), ex.attribute(x, [1, 3]))
    torch.testing.assert_close(ex.relevance(x, lambda logits: logits.argmax(1, keepdim=True)),
                               ex.relevance(x))
    with pytest.raises(ValueError, match="one class per sample"):
        ex.relevance(x, torch.zeros(2, 2, dtype=torch.long))
