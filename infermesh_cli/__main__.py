"""`python -m infermesh_cli ...`: the same as the `infermesh` script."""

import sys

from infermesh_cli.main import main

sys.exit(main())
