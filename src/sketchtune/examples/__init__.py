"""Models and data for the runnable examples in ``examples/`` (importable from LightningCLI configs).

- :mod:`sketchtune.examples.digits`: scikit-learn's bundled 8x8 digits (no download):
  a wide MLP and a small CNN on upsampled digits.
- :mod:`sketchtune.examples.sequences`: a generated long-sequence classification
  task and a Transformer encoder classifier.
"""
