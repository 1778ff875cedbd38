"""The machine description every benchmark and the report card print."""

import torch

from nanoseek.machine import banner, machine_info, matmul_peak, read_bandwidth


def test_machine_info_names_the_cpu_and_threads():
    m = machine_info()
    assert m["cpu"] and m["cores"] >= 1 and m["threads"] == torch.get_num_threads()
    assert m["torch"] == torch.__version__


def test_measurements_are_positive_rates():
    # tiny sizes: a check that each returns a rate in its unit, not a benchmark
    assert 1e6 < matmul_peak(torch.float32, sizes=(64,), reps=1) < 1e15
    assert 1e6 < read_bandwidth(mbytes=4, reps=1) < 1e13  # bytes/s


def test_banner_names_the_machine_without_measuring():
    text = banner(measure=False)
    assert text.startswith("machine: ") and machine_info()["cpu"] in text
    assert "GFLOP/s" not in text
