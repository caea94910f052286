"""``python -m llmstack.cli`` (what torchrun launches): the ``llmstack`` command."""

import sys

from llmstack.cli.main import main

sys.exit(main())
