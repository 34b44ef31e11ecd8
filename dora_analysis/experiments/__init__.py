"""Studies built on the library: the paper's figure 2 reproduced, and how robust it is.

Each module trains with :mod:`dora_analysis.train`, analyses with :func:`dora_analysis.analyze`
and returns the numbers; the commands in :mod:`dora_analysis.cli` only parse and print, so a
notebook can run the same study with the same call.

* :mod:`.reproduction`: the reference configuration, ``reproduce()`` and the sign check.
* :mod:`.sensitivity`: the reference with one choice changed at a time.
"""
