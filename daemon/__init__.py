"""The hot-folder daemon: YAML rules, folder watching, a crash-safe job journal, systemd integration.

Run it as ``nst-daemon --config FILE`` (see `daemon.main`). It stylises files through an
in-process `nst_core.service.Scheduler` that it shares with the local job service socket.
"""
