import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tiger_fast/__init__.py

# Triton kernels run on the CPU through the interpreter when there is no GPU.  This must be set
# before triton is imported anywhere, hence here.
if not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        os.environ["TRITON_INTERPRET"] = "1"

# Keep HF/sentence-transformers fully offline: models come from installed packages only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_intraop_thread():
    """Tests use small tensors: extra intra-op threads only add contention (tiny-model tests ran
    10-20x slower with 2 threads on a busy 2-core runner).  Tests that compare thread counts set
    them explicitly."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
