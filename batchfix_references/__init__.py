"""Reference implementations keras-batchfix is checked against.

A package of its own, beside `keras_batchfix` (installed with it), so that
the tests, reproductions and benchmarks import the same references without
editing `sys.path`, and the package under test never imports them.

Written apart from the package's losses, in PyTorch or NumPy, after the peers'
code (ssd.pytorch / torchvision for the multibox loss, the center-loss
report's PyTorch layer). The tests, reproductions and benchmarks compare
against them; a user can too. Importing a module here needs its framework
(torch) installed; this package itself imports nothing.
"""
