"""``kodalle serve``: a local page to try a trained model. Caption in, images streamed back.

The model (and the reranker, when given) is loaded once. Requests never run the model
themselves: ``POST /api/jobs`` checks the request and puts a job in a queue; one worker
thread (:class:`~kodalle_cli.serve.jobs.JobQueue`) takes the jobs in order and runs
:func:`kodalle_cli.sample.sample` on each, so one generation runs at a time while the server
stays responsive. Each image is published as soon as it is decoded; the page follows a job
through server-sent events.

Endpoints (JSON unless said otherwise; every error is ``{"error": "..."}`` with a 4xx)::

    GET    /                                 the page (kodalle_cli/static/)
    GET    /api/info                         checkpoint, defaults, limits, reranker, queue
    GET    /api/attributes                   the run's attributes for the picker ([] if none)
    POST   /api/caption   {"attributes"}     a caption built from picked attributes
    POST   /api/encode    {"caption"}        token counts and the tokenizer's warnings
    POST   /api/prompts   the picture's bytes (image/png, image/jpeg or image/webp)
                                             -> 201 {"id", "url", "rows", ...}: an image
                                             prompt, fitted to the model's image size
    GET    /api/prompts/ID.png               that image prompt as the model sees it
    POST   /api/jobs      {"caption", "n", "seed", "top_k", "top_p", "temperature",
                           "cond_scale", "rank", "keep", "init_image", "init_rows"}
                                             -> 202 {"id", ...}; rank "perplexity" is
                                             --rank perplexity, init_image a prompt's id
    GET    /api/jobs/ID                      the job: state, queue position, progress, images
    DELETE /api/jobs/ID                      cancel it (waiting or running)
    GET    /api/jobs/ID/events               the job as server-sent events, until it ends
    GET    /api/jobs/ID/images/I.png         image I (generation order) of the job
    GET    /api/jobs/ID/grid.png             the grid, once the job is done
    GET    /api/jobs/ID/prompt.png           its image prompt: kept rows, the rest faded

Safety: a request names files only by job id and image number, never by path; every file
a request reads or writes is under ``--out`` (``OUT/<job id>/<caption slug>/``, written by
:mod:`kodalle_cli.output`). The page's own files are read once at start-up. Bound to a
loopback address (the default), requests must name a loopback host (no DNS rebinding), and
POSTs must be ``application/json`` (an image prompt: ``image/png``, ``image/jpeg`` or
``image/webp``; a cross-site form can send none of these without a preflight, which is never
allowed). Uploaded image prompts are at most 10 MiB and 40 megapixels, decoded and re-saved
as PNG under ``OUT/prompts/`` (the last 100 are kept).

The package: :mod:`.checks` (limits and request validation), :mod:`.jobs` (the job queue
and its worker thread), :mod:`.picker` (the attribute picker), :mod:`.app` (the routes and
the loopback-only middleware), :mod:`.server` (the socket and the command).
"""

from kodalle_cli.serve.server import serve

__all__ = ["serve"]
