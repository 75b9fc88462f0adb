"""`python -m esc_stream.cuda [WEIGHTS] [--tol T]`: the FlashBias rank and bias error of each window attention."""

from .attention import _main

raise SystemExit(_main())
