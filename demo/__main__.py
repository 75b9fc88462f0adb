"""`python -m esc_stream.demo`: the same as `esc-video demo`."""

import sys

from . import main

sys.exit(main())
