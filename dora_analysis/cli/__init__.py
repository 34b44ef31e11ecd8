"""The command-line entry points, one module per command, side by side.

Each module parses its arguments, calls the library, prints and writes; none imports another,
and whatever two of them share lives in the library below (``dora_analysis.outputs``,
``dora_analysis.tables``). Heavy imports happen after parsing, so every ``--help`` is instant.
"""
