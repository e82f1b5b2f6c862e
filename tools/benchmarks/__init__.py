"""The subcommands of ``tools/benchmark.py``, one module per subject: ``layers``,
``sweep``, ``detectors``, ``training`` (``iteration`` and ``hooks``) and ``export``;
``timing``, ``memory`` and ``cli`` hold what they share."""
