"""A minimal stand-in for torchvision, just enough for singd 0.0.5's test suite.

The registry's torchvision does not import with the CPU torch wheel; singd's tests only
need ``datasets.MNIST`` and three transforms. MNIST-format files (``*-idx?-ubyte.gz``)
are read from ``$KFAC_TN_MNIST_DIR`` (e.g. Debian's ``dataset-fashion-mnist``).
"""

from torchvision import datasets, transforms  # noqa: F401
