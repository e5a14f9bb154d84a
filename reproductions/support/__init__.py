"""What the reproductions share: their machinery and statistics, importable
without running a script.

A script run as `python reproductions/x.py` has `reproductions/` first on
`sys.path` and imports `support`; the tests import
`reproductions.support` from the repository root. The modules import each
other relatively, so both names work.

* `backends`: one process per Keras backend, and what ran them.
* `ssd`, `ssd_statistics`, `ssd_figures`: the SSD partial-batch reproduction.
* `center_loss_torch`, `center_loss_keras`, `center_loss_statistics`: the
  center-loss reproduction.
* `d_fine`: keras-hub's D-FINE at a tiny size (the audit's D-FINE numbers
  and `tests/integrations/test_d_fine.py`).
"""
