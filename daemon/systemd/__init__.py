"""The systemd unit files (nst-daemon.service, nst-daemon@.service); packaged so a pip install ships them."""
