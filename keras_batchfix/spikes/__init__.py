"""The spike monitor: a callback (`monitor`), how it records each step
(`recording`), the NumPy analysis of the recorded steps (`analysis`, with the
batch-size exponent in `exponent`) and its outputs (`report`).
`keras_batchfix.SpikeMonitor` is `monitor.SpikeMonitor`."""
