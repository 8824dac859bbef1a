"""The CPU conv kernels are compiled once per instruction set (baseline, AVX2, AVX-512;
csrc/cpu/cpu_isa.h) and the widest the CPU has is used: every copy this machine can run is
checked on the conv and fused conv -> BN configurations of tests/test_op_conv2d.py and
tests/test_op_conv2d_bn.py; the ISA choice's errors and its environment variable."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tsgb_ext
from conftest import require_native
from op_harness import HALF_DTYPES

require_native()

from test_op_conv2d import CONV_CFGS, check_conv  # noqa: E402
from test_op_conv2d_bn import check_conv_bn  # noqa: E402


def _cpu_isas():
    """The instruction sets this CPU and build run the CPU conv kernels with."""
    found, before = [], torch.ops.tsgb_ext.cpu_isa()
    for isa in ("default", "avx2", "avx512"):
        try:
            torch.ops.tsgb_ext.cpu_isa(isa)
            found.append(isa)
        except RuntimeError:
            pass
    torch.ops.tsgb_ext.cpu_isa(before)
    return found


@pytest.mark.parametrize("isa", _cpu_isas())
def test_conv_rules_every_cpu_isa(isa):
    """Every configuration, both dense layouts, all dtypes and the fused BN + activation rule,
    with the kernels of one instruction set."""
    before = torch.ops.tsgb_ext.cpu_isa(isa)
    try:
        assert torch.ops.tsgb_ext.cpu_isa() == isa
        for i, cfg in enumerate(CONV_CFGS):
            for lay in ("contiguous", "channels_last"):
                c = dict(cfg, lx=lay, ly=lay, lg=lay)
                check_conv(dict(c, seed=i), "cpu", torch.float32)
                if i % 3 == 0:
                    for dt in HALF_DTYPES + [torch.float64]:
                        check_conv(dict(c, seed=i + 1), "cpu", dt)
                if i % 4 == 0:
                    check_conv_bn(i, "cpu", torch.float32, lay, i % 3)
    finally:
        torch.ops.tsgb_ext.cpu_isa(before)


def test_cpu_isa_choice_errors():
    with pytest.raises(RuntimeError, match="expected one of"):
        torch.ops.tsgb_ext.cpu_isa("sse9")
    before = torch.ops.tsgb_ext.cpu_isa("auto")  # the widest this CPU runs
    try:
        assert torch.ops.tsgb_ext.cpu_isa() == _cpu_isas()[-1]
    finally:
        torch.ops.tsgb_ext.cpu_isa(before)


_ISA_CHILD = """
import json, warnings
import torch
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    import tsgb_ext
    x = torch.randn(1, 2, 6, 6)
    y = torch.nn.functional.conv2d(x, torch.randn(3, 2, 3, 3))
    torch.ops.tsgb_ext.conv2d_backward(torch.randn_like(y), x, y, [3, 3], [1, 1], [0, 0],
                                       [1, 1], 1, 1e-10)  # a kernel run: the ISA is chosen
    active = torch.ops.tsgb_ext.cpu_isa()
print(json.dumps({"active": active, "warnings": [[w.category.__name__, str(w.message)]
                                                  for w in seen if "TSGB_CPU_ISA" in str(w.message)]}))
"""


def test_cpu_isa_env_bad_value_is_one_python_warning():
    """TSGB_CPU_ISA=garbage: one Python RuntimeWarning naming the variable, the value and the
    accepted values, the best instruction set runs, and nothing is printed on stderr."""
    env = dict(os.environ, TSGB_CPU_ISA="garbage")
    root = os.path.dirname(os.path.dirname(os.path.abspath(tsgb_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "python"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _ISA_CHILD], env=env, capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1, out
    category, message = out["warnings"][0]
    assert category == "RuntimeWarning"
    for part in ("TSGB_CPU_ISA", "'garbage'", "'auto'", "'default'", "'avx2'", "'avx512'"):
        assert part in message, message
    assert out["active"] == _cpu_isas()[-1]  # ignored: the widest this CPU runs
