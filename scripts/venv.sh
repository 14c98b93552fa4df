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
  log="$venv/nst-install.log"
  { "$venv/bin/python" -m pip install --upgrade pip && "$venv/bin/python" -m pip install -e "$root[test]"; } >"$log" 2>&1 \
    || { tail -n 30 "$log" >&2; echo "installing the project into $venv failed; the whole log is $log" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
