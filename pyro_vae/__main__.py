"""``python -m pyro_vae`` is the ``pyro-vae`` command."""

import sys

from .cli import main

sys.exit(main())
