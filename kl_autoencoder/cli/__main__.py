"""``python -m kl_autoencoder.cli`` (as ``accelerate launch -m kl_autoencoder.cli train ...`` runs it)."""

import sys

from .main import main

sys.exit(main())
