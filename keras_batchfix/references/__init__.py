"""Reference implementations the package is checked against.

Written apart from the package's losses, in PyTorch or NumPy, after the peers'
code (ssd.pytorch / torchvision for the multibox loss, the center-loss
report's PyTorch layer). The tests, reproductions and benchmarks compare
against them; a user can too. Importing a module here needs its framework
(torch) installed; this package itself imports nothing.
"""
