"""Reference networks.

The torch definitions for graphfold's training recipes (``resnet_cifar``, ``mobilenetv2``,
``vgg``; each in a plain and a foldable form) need the ``train`` extra. Import them from their
modules; this package imports nothing on its own so that its other scripts stay independent.
"""
