"""The merge methods, one small file each; importing this package registers them in this order (`merge --list`).

``lines`` comes last: its ``base`` option may name any method registered before it.
"""
from . import task_arithmetic, mean, ties, dare, dare_ties, breadcrumbs, breadcrumbs_ties, della  # noqa: F401  sparse family
from . import tsv, iso_c, iso_cts, consensus, wudi  # noqa: F401
from . import lines  # noqa: F401  (last)
from . import regmean, fisher  # noqa: F401  data-aware (after lines: its base must merge from the files alone)
