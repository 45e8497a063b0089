"""keras_cspine.utils: the glibc malloc setting that keeps tf.data training out of the kernel."""

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import ctypes, ctypes.util, resource
    import numpy as np
    from keras_cspine.utils import keep_freed_memory

    def faults():  # minor page faults of 40 allocate-touch-free cycles of 4 MB
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(40):
            block = np.ones(1 << 19)  # 4 MB, touched
            del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-1, 128 * 1024)  # what tf.data sets
    faults()
    before = faults()
    applied = keep_freed_memory()
    faults()
    after = faults()
    print(applied, before, after)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_a_page_fault_storm():
    out = subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True,
                         text=True).stdout.split()  # fmt: skip
    applied, before, after = out[0] == "True", int(out[1]), int(out[2])
    assert applied
    assert before > 40 * 500  # every 4 MB block (1,024 pages) faulted in afresh
    assert after < before / 20  # now reused
