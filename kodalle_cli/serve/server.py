"""``kodalle serve`` itself: the listening socket, the run and the reranker loaded once,
the app served by uvicorn until Ctrl+C."""

from __future__ import annotations

import socket

from kodalle_cli.configs import ServeConfig
from kodalle_cli.errors import KodalleError, warn
from kodalle_cli.serve.checks import is_loopback


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (taken port, unknown address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        raise KodalleError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                           + (f" (is another server using the port? try --port {port + 1})"
                              if getattr(exc, "errno", None) == 98 else "")) from None
    sock.setblocking(False)
    return sock


def serve(config: ServeConfig) -> None:
    """``kodalle serve``: load the run once, then serve the page until Ctrl+C."""
    import uvicorn

    from kodalle_cli.device import pick_device, pick_dtype
    from kodalle_cli.runs import load_run, resolve
    from kodalle_cli.serve.app import create_app
    from kodalle_cli.serve.jobs import JobQueue

    device = pick_device(config.device)  # a wrong --device or --precision: before loading
    pick_dtype(config.precision, device)
    sock = listen(config.host, config.port)  # a taken port: said before the model loads
    if not is_loopback(config.host):
        warn(f"--host {config.host}: the page is served to every machine that can reach "
             "this one, with no password; anyone there can run the model and see every "
             "image it makes (the default, 127.0.0.1, keeps it to this machine)")
    jobs = None
    try:
        run = load_run(config.checkpoint, "cpu", runs_dir=config.runs_dir,
                       backbone=config.backbone, vqgan=config.vqgan).ready_to_sample()
        reranker = None
        if config.reranker is not None:
            from kodalle_cli.rerank.rank import load_reranker

            reranker = load_reranker(config.reranker, device=device)
        try:
            run_dir = resolve(run.source).run
        except KodalleError:
            run_dir = None
        jobs = JobQueue(run, config.out, reranker=reranker, reranker_path=config.reranker,
                        run_dir=run_dir, batch_size=config.batch_size, device=config.device,
                        precision=config.precision)
        app = create_app(jobs, loopback_only=is_loopback(config.host))
        port = sock.getsockname()[1]
        shown = f"[{config.host}]" if ":" in config.host else config.host
        print(f"kodalle serve: {run.source} at http://{shown}:{port}/ (images under "
              f"{config.out}/; Ctrl+C stops)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                               timeout_graceful_shutdown=2))
        server.run(sockets=[sock])
    finally:
        if jobs is not None:
            jobs.stop()
        sock.close()
