"""`python -m recare ...`: see `recare.cli`."""

from recare.runtime import set_process_defaults

set_process_defaults()  # first, before anything imports torch: libgomp reads OMP_WAIT_POLICY once

from recare.cli import main  # noqa: E402

raise SystemExit(main())
