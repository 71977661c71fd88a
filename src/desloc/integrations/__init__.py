"""Integrations of desloc's methods with other training frameworks.

* :mod:`desloc.integrations.transformers`: a Hugging Face ``transformers.Trainer`` that trains
  with any desloc method under ``torchrun`` (``pip install "desloc[hf]"``).

Nothing here is imported by ``desloc`` itself: each integration imports its framework, which
only the users of that integration need installed.
"""
