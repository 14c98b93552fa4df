# Sourced by scripts/demo and scripts/test: create or reuse the virtual environment .venv at the
# repository root and install the project into it (editable, with the test extra). Re-installs
# only when pyproject.toml changed since the last install.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "setting up $venv (PyTorch is large: the first time takes a few minutes)" >&2
  "$python" -m venv "$venv" || { echo "cannot create a virtual environment: install python3-venv (Debian/Ubuntu: sudo apt-get install python3-venv)" >&2; exit 1; }
fi
stamp="$venv/.nst-installed"
want=$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "$root[test]" >&2
  echo "$want" > "$stamp"
fi
