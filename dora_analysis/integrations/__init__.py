"""Training frameworks, watched as they train: the decomposition computed while a model learns.

* :mod:`.live`: framework-free; :class:`~.live.LiveDecomposition` measures a snapshot of live
  weights with the same plan, engine and metrics as ``analyze`` and keeps ``decomposition.csv``.
  The built-in trainer uses it.
* :mod:`.hf`: :class:`~.hf.DecompositionCallback`, a ``transformers.TrainerCallback``
  (imports transformers; TRL's trainers subclass ``Trainer`` and take it too).
"""
