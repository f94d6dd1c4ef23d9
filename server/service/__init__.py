"""The service: what people and the Blender add-on talk to, on top of :mod:`server.pipeline`.

- :mod:`.cli` — the ``one2345`` command; :mod:`.serve` — ``one2345 serve``, the HTTP server process (bind, token,
  ready line, signals); :mod:`.app` — the FastAPI app (routes, limits, errors), :mod:`.schemas` — its response
  models and error envelope, :mod:`.guard` — authentication, body size and whole multipart forms before the routes.
- :mod:`.jobs` — the job store on disk, the worker that runs the pipeline, review and the size limit.
- :mod:`.weights_api` — the weights' state and their download as a job.

May import everything below it (pipeline, stages, common); nothing below imports it.
"""
