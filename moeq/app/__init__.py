"""The ``moeq`` command line application: training, recipe comparison, checkpoints, data."""
