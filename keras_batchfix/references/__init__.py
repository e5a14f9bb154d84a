"""Reference implementations keras-batchfix is checked against.

The tests, reproductions and benchmarks import them from here
(`keras_batchfix.references.torch_multibox`, ...); `import keras_batchfix`
does not import them.

Written apart from the package's losses, in PyTorch or NumPy, after the peers'
code (ssd.pytorch / torchvision for the multibox loss, the center-loss
report's PyTorch layer). The tests, reproductions and benchmarks compare
against them; a user can too. `machine.cpu_name()` names the hardware in
their outputs. Importing a module here needs its framework (torch) installed;
this package itself imports nothing.
"""
