"""``python -m tsgb_ext.cli ...``: the ``tsgb`` command."""
import sys

from . import main

sys.exit(main())
