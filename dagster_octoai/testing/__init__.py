"""What users import in their own tests, and nothing else.

- :mod:`~dagster_octoai.testing.plugin`: the pytest fixtures ``octoai_server`` and
  ``octoai_server_factory`` (a local OctoAI-compatible server), registered by the
  package's ``pytest11`` entry point.
- :mod:`~dagster_octoai.testing.seaweedfs`: :class:`SeaweedFS`, a real S3 server on
  loopback, with the ``seaweedfs`` and ``s3_bucket`` fixtures.
- :mod:`~dagster_octoai.testing.server`: ``sample_image_b64`` for the image fields.

The repository's own test infrastructure (PostgreSQL, ``dagster dev``, the token scanner)
is in ``devtools/``, not here.
"""
