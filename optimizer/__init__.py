"""dd-compile build-time pipeline: distill, export, quantize, build, validate, report.

Importing this package sets OMP_WAIT_POLICY=PASSIVE (unless the user set it) before torch can be
imported: torch's busy-waiting OpenMP threads made it 30x slower on a shared 2-core machine.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
