"""`python -m bumblefast` (also what `deepspeed --module bumblefast` and `torchrun -m bumblefast` run)."""

import sys

from bumblefast.cli import main

sys.exit(main())
