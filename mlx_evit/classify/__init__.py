"""``mlx_evit.classify``: the classifier's public names, and ``python -m mlx_evit.classify``.

Python::

    from mlx_evit.classify import Classifier

    clf = Classifier.load("efficientvit_b1.r224_in1k")  # or weights="path/to/checkpoint"
    for result in clf.classify_files(["cat.jpg", "dog.png"], top_k=3):
        print(result.file, [(p.label, round(p.score, 3)) for p in result.top_k])

Command line (``python -m mlx_evit.classify --help``, or ``mlx-evit-classify``)::

    python -m mlx_evit.classify cat.jpg photos/ --recursive --format json

The library is :mod:`mlx_evit.classifier`, the command line
:mod:`mlx_evit.cli.classify`; this package re-exports both.
"""

from ..classifier import (
    DEFAULT_MODEL,
    IMAGE_EXTENSIONS,
    Classification,
    Classifier,
    ClassifierError,
    ImageFailure,
    Prediction,
    expand_inputs,
)
from ..cli.classify import CSV_COLUMNS, FORMATS, build_parser, main

from ..classifier import __all__ as _library_names

__all__ = [*_library_names, "CSV_COLUMNS", "FORMATS", "build_parser", "main"]
