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
