"""The merge methods, one small file each; importing this package registers them in this order (`merge --list`).

``lines`` comes after every data-free method: its ``base`` option may name any method registered before it. The
data-aware methods (run by their own commands, not by the file-only driver) come after it, so lines cannot nest them.
"""
from . import task_arithmetic, mean, ties, dare, dare_ties, breadcrumbs, breadcrumbs_ties, della  # noqa: F401  sparse family
from . import tsv, iso_c, iso_cts, consensus, wudi  # noqa: F401
from . import lines  # noqa: F401  (last of the data-free methods)
from . import regmean, fisher  # noqa: F401  data-aware (after lines: its base must merge from the files alone)
from . import adamerging  # noqa: F401  data-aware: `tvtool eval adamerging`
