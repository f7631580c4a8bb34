"""`python -m recare ...`: see `recare.cli` (the `recare` command runs the same function)."""

from recare.console import main

raise SystemExit(main())
