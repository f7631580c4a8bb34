"""`python -m recare ...`: see `recare.cli`."""

from recare.cli import main

raise SystemExit(main())
