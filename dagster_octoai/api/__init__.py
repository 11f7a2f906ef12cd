"""The client layer: OctoAI's wire contract and the HTTP clients that speak it. No Dagster.

- :mod:`~dagster_octoai.api.models`: requests and answers, validated as the API validates them
  (shared by the client, the Dagster layer's run config and the server).
- :mod:`~dagster_octoai.api.errors`: the one exception hierarchy (the storage errors too).
- :mod:`~dagster_octoai.api.batch`: some images: :class:`ImageBatch`, and ``responses_of``,
  the one reader of an answer, a list of answers or a batch.
- :mod:`~dagster_octoai.api.images`: image inputs to base64, format sniffing, thumbnails.
- :mod:`~dagster_octoai.api.client`: :class:`OctoAIClient` and :class:`AsyncOctoAIClient`.
- :mod:`~dagster_octoai.api.edges`: a local Canny edge map for ControlNet.

Nothing is imported here, so the server can load the models without the HTTP client.
"""
