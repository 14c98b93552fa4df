"""The systemd unit files (nst-daemon.service, nst-daemon@.service, and for a farm of GPU machines
nst-ray-head.service and nst-ray-worker.service); packaged so a pip install ships them."""
