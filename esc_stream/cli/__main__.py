"""`python -m esc_stream.cli`: the same as `esc-video`."""

import sys

from . import main

sys.exit(main())
