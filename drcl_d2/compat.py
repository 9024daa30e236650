"""The one place where drcl_d2 patches a third-party package.

lvis==0.5.3 (the only LVIS API on PyPI) calls ``np.float`` in ``lvis/eval.py``; the alias was
removed in NumPy 1.24, so LVIS evaluation crashes under NumPy 2. The upstream fix was never
released. ``np.float`` was always the builtin ``float`` (float64 in ``astype``), so restoring the
alias reproduces the original behaviour exactly. It is added only when missing.
"""
import numpy as np

if "float" not in np.__dict__:
    # numpy's module __getattr__ raises for the removed alias; a real attribute short-circuits it.
    np.float = float  # type: ignore[attr-defined]
