"""Test and development infrastructure of this repository; not part of the package.

- :mod:`devtools.postgres`: a private PostgreSQL cluster for the reliability suite.
- :mod:`devtools.dagster_dev`: runs ``dagster dev`` for the browser test and ``make dev``.
- :mod:`devtools.secrets`: finds a token, plain or encoded, wherever it may have leaked.
"""
