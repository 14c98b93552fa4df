"""`nst serve` and `nst status`: added to the `nst` command by nst_core.cli."""

from __future__ import annotations

import json
import logging
import signal
import sys

from ..errors import ParamError
from . import limits
from .client import ServiceClient, ServiceUnavailable, candidate_sockets, user_socket_path

EXIT_OK, EXIT_UNREACHABLE = 0, 1


def add_parsers(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the local job service (GIMP and other local clients send jobs to it)",
        description="Keep VGG-19 warm on the device(s) and run jobs from local clients over a Unix socket "
                    "(docs/PROTOCOL.md). Interactive jobs run before batch jobs.")
    serve.add_argument("--socket", metavar="PATH", default=None,
                       help="socket path (default: $NST_SOCKET, else $XDG_RUNTIME_DIR/nst/nst.sock, "
                            "else /tmp/nst-$UID/nst.sock); its folder must be yours and closed to others")
    serve.add_argument("--device", default="auto",
                       help="device(s), comma-separated, one worker each: auto, cpu, cuda, cuda:N, mps (default: auto)")
    serve.add_argument("--cluster", metavar="ADDRESS", default=None,
                       help="run the jobs on the GPUs of the Ray cluster whose head is at ADDRESS (auto, or "
                            "HOST:PORT), one worker per GPU, instead of on --device; needs the [cluster] extra")
    serve.add_argument("--cluster-resource", metavar="NAME", default="GPU",
                       help="what a cluster worker takes on a node: GPU (default), or a custom Ray resource")
    serve.add_argument("--idle-exit", type=float, default=0, metavar="SECONDS",
                       help="exit after this long with no job and no client (default 0: never)")
    serve.add_argument("--group", metavar="NAME", default=None,
                       help="make the socket 0660 and owned by this group, which this user must be in (default: "
                            "0600, this user only). Other users' jobs then send pixels: the service reads and "
                            "writes no file for them")
    serve.add_argument("--max-queue", type=int, default=64, metavar="N",
                       help="jobs that may wait; more are answered 'busy' (default: 64)")
    serve.add_argument("--on-stop", choices=("finish", "cancel"), default="finish",
                       help="on SIGTERM, let the running job finish (default) or cancel it")
    serve.add_argument("--request-timeout", type=float, default=limits.REQUEST_TIMEOUT, metavar="SECONDS",
                       help="a new connection must say hello, and any request must arrive whole once begun, "
                            f"within this time (default: {limits.REQUEST_TIMEOUT:g}; payloads get a second more "
                            f"per {limits.PAYLOAD_RATE >> 20} MiB)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                       help="what to log on stderr (default: info)")
    serve.set_defaults(func=cmd_serve)

    status = subparsers.add_parser(
        "status", help="show the job service's device, queue, running job and cache",
        description="Ask the job service for its state: the one clients use (the GIMP plug-in too): "
                    "$NST_SOCKET; else the system service's socket ($NST_SYSTEM_SOCKET, else "
                    "/run/nst-daemon/nst.sock), then your own (as for serve). Says which sockets it tried and "
                    "why each failed. Exit 0 when one answers, 1 when none does.")
    status.add_argument("--socket", metavar="PATH", default=None, help="ask this socket only")
    status.add_argument("--json", action="store_true", help="print the status message as JSON")
    status.set_defaults(func=cmd_status)


def cmd_serve(args) -> int:
    from .scheduler import Scheduler
    from .server import ServiceServer

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s nst serve: %(levelname)s %(message)s")
    path = args.socket or user_socket_path()
    devices = [d.strip() for d in args.device.split(",") if d.strip()] or ["auto"]
    if not args.request_timeout > 0:
        raise ParamError("request_timeout", f"must be above 0, got {args.request_timeout:g}")
    if args.cluster:
        from .cluster import check_address, check_resource

        for name, why in (("cluster", check_address(args.cluster)),
                          ("cluster_resource", check_resource(args.cluster_resource))):
            if why:
                raise ParamError(name, why)
    scheduler = Scheduler(devices=devices, max_queue=args.max_queue, cluster=args.cluster,
                          cluster_resource=args.cluster_resource)
    server = ServiceServer(path, scheduler, mode=0o660 if args.group else 0o600, group=args.group,
                           idle_exit=args.idle_exit, on_stop=args.on_stop, request_timeout=args.request_timeout)

    def on_signal(signum, frame):
        logging.getLogger("nst_core.service").info("%s received: stopping", signal.Signals(signum).name)
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    server.serve_forever()
    return EXIT_OK


def cmd_status(args) -> int:
    candidates = [(args.socket, "--socket")] if args.socket else candidate_sockets()
    failed = []  # (path, what, ServiceUnavailable)
    for path, what in candidates:
        try:
            st = ServiceClient(path, timeout=5.0, client_name="nst status").status()
            break
        except ServiceUnavailable as e:
            failed.append((path, what, e))
    else:
        if len(failed) == 1:
            print(f"nst: {failed[0][2].message}. Start one with `nst serve`.", file=sys.stderr)
        else:
            print("nst: no Neural Style service answers. Tried:", *_tried(failed), "Start one with `nst serve`.",
                  sep="\n", file=sys.stderr)
        return EXIT_UNREACHABLE
    if failed:
        print("nst: tried first:", *_tried(failed), sep="\n", file=sys.stderr)
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    print(format_status(st))
    return EXIT_OK


def _tried(failed) -> list[str]:
    return [f"  {path} ({what}): {e.details.get('reason', e.message)}" for path, what, e in failed]


def format_status(st: dict) -> str:
    lines = [f"service   {st.get('socket')} (pid {st.get('pid')}, up {_duration(st.get('uptime', 0))}, "
             f"{st.get('server')}, protocol {st.get('protocol')})"]
    cluster = st.get("cluster")
    if cluster:
        lines.append(f"cluster   {cluster['address']}: {cluster['workers']} worker(s) on {cluster['nodes']} node(s) "
                     f"offering {cluster['resource']}" + ("" if cluster["workers"] else "; jobs wait for a worker"))
    for w in st.get("workers", []):
        job = w.get("running")
        doing = "idle" if not job else (
            f"running {job['job_id']} ({job['priority']}, {job.get('client') or '?'}): step {job['step']}/"
            f"{job['total']}, size {job['size']}, {_duration(job['elapsed'])}")
        lines.append(f"device    {w['device']}: {doing}")
        cache = w.get("cache") or {}
        if "style_targets" in cache:
            nets = cache.get("networks") or []
            lines.append(f"cache     {len(nets)} network(s) loaded{': ' + '; '.join(nets) if nets else ''}; "
                         f"{cache['style_targets']} style target(s), {cache.get('style_target_hits', 0)} hit(s), "
                         f"{cache.get('style_target_misses', 0)} miss(es)")
    q = st.get("queue", {})
    lines.append(f"queue     {q.get('interactive', 0)} interactive, {q.get('batch', 0)} batch (max {q.get('max')})")
    for j in q.get("jobs", []):
        lines.append(f"          {j['job_id']} {j['priority']} from {j.get('client') or '?'}, "
                     f"waiting {_duration(j['waited'])}")
    jobs = st.get("jobs", {})
    lines.append(f"jobs      {jobs.get('done', 0)} done, {jobs.get('failed', 0)} failed, "
                 f"{jobs.get('cancelled', 0)} cancelled")
    lines.append(f"clients   {st.get('clients', 0)}")
    mem = st.get("memory_budget")
    if mem:
        lines.append(f"requests  {mem['used'] / 2**20:.1f} MiB of pixels held, of {mem['total'] / 2**20:.0f} MiB allowed")
    idle = st.get("idle_exit") or 0
    lines.append(f"idle exit {'never' if not idle else _duration(idle)}")
    return "\n".join(lines)


def _duration(seconds) -> str:
    seconds = float(seconds or 0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
