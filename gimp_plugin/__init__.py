"""The GIMP 3 plug-in (neural-style/neural-style.py) and its installer (`nst gimp install`)."""
