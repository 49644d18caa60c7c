"""Full-size memory and FLOPs plan of every Show-1 stage from abstract XLA compiles (``show1 plan``).

Nothing is allocated: see show1_jax/plan.py for what is measured and how XLA:CPU's figures are corrected.

    python bench/plan.py                                       # bfloat16, one device, every stage
    python bench/plan.py --devices 8 --mesh data=2,fsdp=4      # 8 virtual CPU devices
    python bench/plan.py --stages sr2 --attention-chunk none   # SR2 without attention blocks
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from show1_jax.plan import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
