"""oneDNN's copies around a CPU convolution: the rule from shapes, its plan line, and the resident set it predicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fewshot_cli.memory.onednn import ConvCopies, copies_bytes, in_use
from fewshot_cli.memory.step_tracker import StepTracker

MiB = 1024**2
aten = torch.ops.aten


def test_forward_copies_are_the_larger_of_input_and_weights_or_output() -> None:
    x, w = torch.empty(2, 4, 8, 8), torch.empty(16, 4, 1, 1)
    out = torch.empty(2, 16, 8, 8)
    assert copies_bytes(aten.conv2d.default, (x, w), out) == out.nbytes  # widening: the output's copy
    assert copies_bytes(aten.conv2d.default, (out, w.transpose(0, 1)), x) == out.nbytes + w.nbytes  # narrowing
    assert copies_bytes(aten.relu.default, (x,), x) == 0


def test_backward_copies_are_the_gradient_the_input_and_the_weights() -> None:
    grad, x, w = torch.empty(2, 16, 8, 8), torch.empty(2, 4, 8, 8), torch.empty(16, 4, 1, 1)
    assert copies_bytes(aten.convolution_backward.default, (grad, x, w), None) == grad.nbytes + x.nbytes + w.nbytes


def test_a_convolution_raises_the_traced_peak_by_its_copies() -> None:
    if not in_use():
        pytest.skip("torch here has no oneDNN")
    conv = nn.Conv2d(8, 32, 1, bias=False)
    tracker = StepTracker()
    tracker.track_external(conv)
    copies = ConvCopies(tracker)
    with tracker, copies, torch.inference_mode():
        conv(torch.zeros(4, 8, 32, 32))
    out = 4 * 32 * 32 * 32 * 4
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    traced = sum(size for kind, size in peak.items() if kind != "Total")
    # at the peak the input, the weights and the output are live; the output's copy comes on top
    assert copies.peak == traced + out


MEASURE = """
import ctypes, json, sys, torch
from fewshot_cli.memory.measure import rss_peak_bytes
ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # freed tensors go back to the system, as under a budget
import psutil
proc, out = psutil.Process(), {}
for name, (cin, cout) in {"widening": (16, 64), "narrowing": (64, 16)}.items():
    conv = torch.nn.Conv2d(cin, cout, 1, bias=False)
    x = torch.randn(16, cin, 56, 56)
    with torch.inference_mode():
        conv(x)
        rss_peak_bytes(reset=True)
        y = conv(x)
        out[name] = rss_peak_bytes() - proc.memory_info().rss
    del x, y  # the next pair's measure starts from nothing of this one's
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak")
def test_the_rule_matches_the_resident_set_a_convolution_adds_beyond_its_output() -> None:
    if not in_use():
        pytest.skip("torch here has no oneDNN")
    done = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    measured = json.loads(done.stdout)
    for name, (cin, cout) in {"widening": (16, 64), "narrowing": (64, 16)}.items():
        x, w = torch.empty(16, cin, 56, 56), torch.empty(cout, cin, 1, 1)
        rule = copies_bytes(aten.conv2d.default, (x, w), torch.empty(16, cout, 56, 56))
        assert abs(measured[name] - rule) <= 0.1 * rule, (name, measured[name] / MiB, rule / MiB)
