"""`neoxconv parity A B` and the `--verify` flag: prove a conversion on the stored files.

* :mod:`.sides` -- one side per format (NeoX reference on the stored shards, transformers, Meta
  reference), each streamed one layer group at a time;
* :mod:`.run` -- :func:`run_parity` (logits + numerics config check) and :func:`logits_for`;
* :mod:`.report` -- :func:`render_report` (tables) and :func:`save_report` (JSON);
* :mod:`.verify` -- :func:`verifier`, the ``after_write`` hook of ``--verify``.
"""

from .report import render_report, save_report
from .run import logits_for, run_parity
from .sides import NUMERIC_FIELDS
from .verify import REPORT_NAME, check_verify_target, failed_dir, verifier

__all__ = ["NUMERIC_FIELDS", "REPORT_NAME", "check_verify_target", "failed_dir", "logits_for", "render_report",
           "run_parity", "save_report", "verifier"]
