"""`python -m seg3d_fast ...` (also what torchrun runs: `torchrun --nproc_per_node=N -m seg3d_fast train ...`)."""
import sys

from .cli import main

sys.exit(main())
